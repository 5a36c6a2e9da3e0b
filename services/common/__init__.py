"""Code shared by several tenantserve services."""
