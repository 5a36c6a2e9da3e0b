"""PyTorch inference worker: the Worker gRPC service over a paged-KV-cache Llama model."""
