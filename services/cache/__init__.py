"""The cache service: tenant-isolated embeddings, retrieval and cached completions."""
