"""Session fixtures shared by the test suites: a Valkey server and a whole running stack.

Each starts only when a test requests it. The stack loads the real model,
so it is started once per session and shared. Tests that share it keep to
their own tenants when they compare Redis counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.cli.stack import Stack, write_config
from services.common import certs
from services.common.valkey import ValkeyServer
from tests.e2e.support import E2E_OVERRIDES, UNCONFIGURED_TENANT


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Return the URL of a real Valkey server shared by the session. Tests use keys of their own tenants."""
    with ValkeyServer(tmp_path_factory.mktemp("valkey")) as server:
        yield server.url


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start Valkey, the worker, the scheduler and admission as processes, with certificates for every test tenant."""
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
