"""Unit tests of the worker registry, with an injected clock for heartbeat expiry."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common.errors import InvalidArgument
from services.common.tls import secure_channel, service_channel_credentials
from services.scheduler.worker_registry import RegistrationClosed, WorkerRegistry
from tenantserve.v1 import scheduler_pb2
from tests.common.support import make_cert_dir

HEARTBEAT_TIMEOUT_SECONDS = 5.0
MODEL = "smollm2-135m-instruct"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_report(worker_id: str = "w1", **fields: Any) -> scheduler_pb2.WorkerReport:
    values: dict[str, Any] = {
        "worker_id": worker_id,
        "address": "127.0.0.1:1",
        "models": [MODEL],
        "max_batch_size": 4,
        "num_free_kv_blocks": 100,
        "num_total_kv_blocks": 100,
        "kv_block_size": 16,
    }
    values.update(fields)
    return scheduler_pb2.WorkerReport(**values)


def make_registry(cert_dir: Path, clock: FakeClock, on_change: Callable[[], None] = lambda: None) -> WorkerRegistry:
    credentials = service_channel_credentials(cert_dir, "scheduler")
    return WorkerRegistry(
        HEARTBEAT_TIMEOUT_SECONDS,
        lambda address, server_name: secure_channel(address, credentials, server_name=server_name),
        clock=clock,
        on_change=on_change,
    )


def live_workers() -> float | None:
    return REGISTRY.get_sample_value("tenantserve_scheduler_live_workers")


def run(coroutine_function: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coroutine_function())


@pytest.fixture
def cert_dir(tmp_path: Path) -> Path:
    return make_cert_dir(tmp_path)


def test_register_adds_live_worker(cert_dir: Path) -> None:
    async def scenario() -> None:
        registry = make_registry(cert_dir, FakeClock())

        handle = registry.register(make_report(), "worker-gpu")

        assert registry.get("w1") is handle
        assert handle.live
        assert registry.serves(MODEL)
        assert not registry.serves("other-model")
        assert registry.workers_for_model(MODEL) == [handle]
        assert live_workers() == 1
        await registry.close()

    run(scenario)


def test_worker_expires_without_heartbeat(cert_dir: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        registry = make_registry(cert_dir, clock)
        handle = registry.register(make_report(), "worker-gpu")

        clock.now += HEARTBEAT_TIMEOUT_SECONDS
        assert registry.expire_stale() == []

        clock.now += 0.001
        assert registry.expire_stale() == [handle]
        assert not handle.live
        assert registry.get("w1") is None
        assert not registry.serves(MODEL)
        assert live_workers() == 0
        await registry.close()

    run(scenario)


def test_refresh_extends_heartbeat(cert_dir: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        registry = make_registry(cert_dir, clock)
        handle = registry.register(make_report(), "worker-gpu")

        clock.now += HEARTBEAT_TIMEOUT_SECONDS - 1
        registry.refresh(handle, make_report(num_free_kv_blocks=42, num_running=3))
        clock.now += HEARTBEAT_TIMEOUT_SECONDS - 1

        assert registry.expire_stale() == []
        assert handle.live
        assert handle.report.num_free_kv_blocks == 42
        assert handle.report.num_running == 3
        await registry.close()

    run(scenario)


def test_refresh_after_expiry_is_aborted(cert_dir: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        registry = make_registry(cert_dir, clock)
        handle = registry.register(make_report(), "worker-gpu")
        clock.now += HEARTBEAT_TIMEOUT_SECONDS + 1
        registry.expire_stale()

        with pytest.raises(RegistrationClosed) as raised:
            registry.refresh(handle, make_report())

        assert raised.value.code == grpc.StatusCode.ABORTED
        assert "register again" in raised.value.message
        assert registry.get("w1") is None
        await registry.close()

    run(scenario)


@pytest.mark.parametrize("field, value", [("worker_id", "w2"), ("address", "127.0.0.1:2")])
def test_refresh_rejects_changed_identity(cert_dir: Path, field: str, value: str) -> None:
    async def scenario() -> None:
        registry = make_registry(cert_dir, FakeClock())
        handle = registry.register(make_report(), "worker-gpu")

        with pytest.raises(InvalidArgument) as raised:
            registry.refresh(handle, make_report(**{field: value}))

        assert raised.value.field == field
        assert handle.report.worker_id == "w1"
        await registry.close()

    run(scenario)


@pytest.mark.parametrize(
    "field, value",
    [("worker_id", ""), ("address", ""), ("models", []), ("max_batch_size", 0)],
)
def test_register_rejects_invalid_report(cert_dir: Path, field: str, value: Any) -> None:
    async def scenario() -> None:
        registry = make_registry(cert_dir, FakeClock())

        with pytest.raises(InvalidArgument) as raised:
            registry.register(make_report(**{field: value}), "worker-gpu")

        assert raised.value.field == field
        assert len(registry) == 0
        await registry.close()

    run(scenario)


def test_reregistration_replaces_previous_handle(cert_dir: Path) -> None:
    async def scenario() -> None:
        registry = make_registry(cert_dir, FakeClock())
        first = registry.register(make_report(), "worker-gpu")

        second = registry.register(make_report(), "worker-gpu")
        registry.drop(first, "registration stream ended")

        assert not first.live
        assert second.live
        assert registry.get("w1") is second
        await registry.close()

    run(scenario)


def test_drop_closes_idle_channel(cert_dir: Path) -> None:
    async def scenario() -> None:
        registry = make_registry(cert_dir, FakeClock())
        handle = registry.register(make_report(), "worker-gpu")

        registry.drop(handle, "registration stream ended")
        await registry.close()

        assert handle.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN

    run(scenario)


def test_channel_closes_after_last_release(cert_dir: Path) -> None:
    async def scenario() -> None:
        registry = make_registry(cert_dir, FakeClock())
        handle = registry.register(make_report(), "worker-gpu")
        handle.num_in_flight = 1

        registry.drop(handle, "registration stream ended")
        await registry.close()
        state_while_in_flight = handle.channel.get_state()
        registry.release(handle)
        await registry.close()

        assert state_while_in_flight != grpc.ChannelConnectivity.SHUTDOWN
        assert handle.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN

    run(scenario)


def test_on_change_runs_for_join_refresh_and_leave(cert_dir: Path) -> None:
    async def scenario() -> None:
        changes: list[int] = []
        registry = make_registry(cert_dir, FakeClock(), on_change=lambda: changes.append(len(registry)))

        handle = registry.register(make_report(), "worker-gpu")
        registry.refresh(handle, make_report())
        registry.drop(handle, "registration stream ended")
        registry.drop(handle, "registration stream ended")

        assert changes == [1, 1, 0]
        await registry.close()

    run(scenario)


def test_join_and_leave_logged_once(cert_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        registry = make_registry(cert_dir, clock)
        handle = registry.register(make_report(), "worker-gpu")
        registry.refresh(handle, make_report())
        clock.now += HEARTBEAT_TIMEOUT_SECONDS + 1
        registry.expire_stale()
        registry.drop(handle, "registration stream ended")
        await registry.close()

    with caplog.at_level(logging.INFO, logger="services.scheduler.worker_registry"):
        run(scenario)

    messages = [record.getMessage() for record in caplog.records]
    assert sum(message.startswith("worker joined: worker_id=w1") for message in messages) == 1
    assert sum(message.startswith("worker left: worker_id=w1") for message in messages) == 1
    assert any("no report within heartbeat_timeout_seconds=5" in message for message in messages)
