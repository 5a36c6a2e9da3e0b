"""Prometheus /metrics endpoint shared by the services.

Each service defines its own metric objects in its own ``metrics`` module;
they register in prometheus_client's default registry, which this endpoint
serves.
"""

from __future__ import annotations

import logging

import prometheus_client
from prometheus_client.registry import CollectorRegistry

logger = logging.getLogger(__name__)


def start_metrics_server(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry = prometheus_client.REGISTRY
) -> int:
    """Serve ``registry`` over HTTP at http://host:port/metrics in a daemon thread.

    Returns the bound port, or 0 when ``port`` is 0 (metrics disabled).
    Raises OSError when the port cannot be bound.
    """
    if port == 0:
        logger.info("metrics endpoint disabled (metrics_port is 0)")
        return 0
    if not 0 < port < 65536:
        raise ValueError(f"metrics port must be between 1 and 65535, or 0 to disable, got {port}")
    try:
        http_server, _thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, f"failed to bind the metrics endpoint to {host}:{port}: {exc.strerror}") from exc
    bound_port = http_server.server_port
    logger.info("metrics endpoint listening on http://%s:%d/metrics", host, bound_port)
    return bound_port
