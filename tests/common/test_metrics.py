"""The Prometheus /metrics endpoint."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from services.common.metrics import start_metrics_server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_metrics_disabled_with_port_zero() -> None:
    assert start_metrics_server(0) == 0


def test_metrics_endpoint_serves_registry() -> None:
    registry = CollectorRegistry()
    requests = Counter("test_requests", "Requests seen by the test.", registry=registry)
    requests.inc(3)
    port = free_port()

    bound_port = start_metrics_server(port, registry=registry)

    assert bound_port == port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    assert "test_requests_total 3.0" in body


def test_metrics_port_in_use_fails() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            start_metrics_server(port, registry=CollectorRegistry())


@pytest.mark.parametrize("port", [-1, 65536])
def test_metrics_invalid_port_fails(port: int) -> None:
    with pytest.raises(ValueError, match="metrics port"):
        start_metrics_server(port)
