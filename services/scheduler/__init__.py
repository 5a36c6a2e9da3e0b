"""The scheduler: queues scheduled requests and places them on workers."""
