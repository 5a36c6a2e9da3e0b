"""Unit tests of worker placement."""

from __future__ import annotations

from typing import Any

from services.scheduler.placement import choose_worker, worker_capacity
from services.scheduler.worker_registry import WorkerHandle
from tenantserve.v1 import scheduler_pb2

MAX_WAITING_PER_WORKER = 2


def make_worker(worker_id: str, *, num_in_flight: int = 0, live: bool = True, **report_fields: Any) -> WorkerHandle:
    """Build a handle without a channel; placement reads only the report and the counts."""
    values: dict[str, Any] = {"worker_id": worker_id, "address": "127.0.0.1:1", "models": ["m"], "max_batch_size": 4}
    values.update(report_fields)
    return WorkerHandle(
        report=scheduler_pb2.WorkerReport(**values),
        service_name="worker-gpu",
        channel=None,  # type: ignore[arg-type]
        stub=None,  # type: ignore[arg-type]
        last_report_time=0.0,
        num_in_flight=num_in_flight,
        live=live,
    )


def test_capacity_is_batch_plus_waiting() -> None:
    assert worker_capacity(make_worker("w", max_batch_size=4), MAX_WAITING_PER_WORKER) == 6


def test_choose_prefers_fewest_in_flight() -> None:
    busy = make_worker("a", num_in_flight=3, num_free_kv_blocks=1000)
    idle = make_worker("b", num_in_flight=1, num_free_kv_blocks=10)

    assert choose_worker([busy, idle], MAX_WAITING_PER_WORKER) is idle


def test_choose_compares_load_relative_to_batch_size() -> None:
    small = make_worker("a", num_in_flight=2, max_batch_size=2)
    large = make_worker("b", num_in_flight=4, max_batch_size=16)

    assert choose_worker([small, large], MAX_WAITING_PER_WORKER) is large


def test_choose_breaks_ties_by_free_kv_blocks() -> None:
    fewer_blocks = make_worker("a", num_free_kv_blocks=10)
    more_blocks = make_worker("b", num_free_kv_blocks=500)

    assert choose_worker([fewer_blocks, more_blocks], MAX_WAITING_PER_WORKER) is more_blocks


def test_choose_breaks_ties_by_running_then_id() -> None:
    running = make_worker("a", num_running=3)
    first = make_worker("b")
    second = make_worker("c")

    assert choose_worker([running, second, first], MAX_WAITING_PER_WORKER) is first


def test_choose_skips_full_and_departed_workers() -> None:
    full = make_worker("a", num_in_flight=6)
    departed = make_worker("b", live=False)

    assert choose_worker([full, departed], MAX_WAITING_PER_WORKER) is None


def test_choose_with_no_workers_returns_none() -> None:
    assert choose_worker([], MAX_WAITING_PER_WORKER) is None
