"""The `tenantserve` command: certificates, running the stack, and a tenant client."""
