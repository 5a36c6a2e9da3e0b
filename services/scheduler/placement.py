"""Choice of the worker that runs a request."""

from __future__ import annotations

from collections.abc import Iterable

from services.scheduler.worker_registry import WorkerHandle

# Maximum requests in flight on a worker beyond its max_batch_size, so that
# one is ready to join the batch as soon as a sequence finishes.
# NOTE: 2 is a starting value, not a measured one.
DEFAULT_MAX_WAITING_PER_WORKER = 2


def worker_capacity(worker: WorkerHandle, max_waiting_per_worker: int) -> int:
    """Return the maximum number of requests this scheduler keeps in flight on ``worker``."""
    return worker.report.max_batch_size + max_waiting_per_worker


def choose_worker(workers: Iterable[WorkerHandle], max_waiting_per_worker: int) -> WorkerHandle | None:
    """Return the least loaded live worker with free capacity, or None when all are full.

    Load is this scheduler's in-flight requests relative to max_batch_size,
    because that count is current while the worker's report can be a
    heartbeat old. Ties go to the worker with more free KV cache blocks, then
    fewer running requests, then the smaller worker id.
    """
    candidates = [
        worker
        for worker in workers
        if worker.live and worker.num_in_flight < worker_capacity(worker, max_waiting_per_worker)
    ]
    return min(candidates, key=_load_key, default=None)


def _load_key(worker: WorkerHandle) -> tuple[float, int, int, str]:
    report = worker.report
    return (
        worker.num_in_flight / report.max_batch_size,
        -report.num_free_kv_blocks,
        report.num_running,
        report.worker_id,
    )
