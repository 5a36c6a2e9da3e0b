"""Session fixtures shared by the test suites: a Valkey server and a whole running stack.

Both start only when a test asks for them. The stack loads the real model,
so it is started once per session and shared; tests that use it must not
depend on each other's Redis counters except through tenants of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common import certs
from services.common.valkey import ValkeyServer

# Tenants of the end-to-end stack. ratelimited and narrow have small limits
# so that the limit tests can fill them with 50 requests.
E2E_TENANTS: list[dict[str, Any]] = [
    {"name": "alpha"},
    {"name": "beta"},
    {"name": "gamma"},
    {"name": "ratelimited", "requests_per_minute": 20, "max_concurrent_streams": 64},
    {"name": "narrow", "requests_per_minute": 600, "max_concurrent_streams": 5},
    {"name": "canceller"},
    {"name": "metadata-probe"},
]
# Has a certificate from the stack's CA but no entry in the config.
UNCONFIGURED_TENANT = "mallory"

E2E_OVERRIDES: dict[str, Any] = {
    "tenants": E2E_TENANTS,
    # 768 blocks of 16 tokens hold 12288 tokens: enough for the largest test
    # (5 streams of up to 1024 completion tokens) without a 2048-block cache
    # in the memory of a small test machine.
    "services": {"worker_gpu": {"num_kv_blocks": 768}},
}


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real Valkey server shared by the session; tests use keys of their own tenants."""
    with ValkeyServer(tmp_path_factory.mktemp("valkey")) as server:
        yield server.url


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A running stack (Valkey, worker, scheduler, admission as processes) with certificates for every test tenant."""
    from services.cli.stack import Stack, write_config

    state_dir: Path = tmp_path_factory.mktemp("stack")
    running = Stack(write_config(state_dir, E2E_OVERRIDES))
    running.start()
    try:
        cert_dir = running.config.tls.cert_dir
        for tenant in running.config.tenants:
            certs.add_tenant(cert_dir, tenant.name)
        certs.add_tenant(cert_dir, UNCONFIGURED_TENANT)
        yield running
    finally:
        running.stop()
