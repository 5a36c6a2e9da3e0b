"""Workers registered through the RegisterWorker stream and their channels.

A worker joins with its first WorkerReport and stays registered while
reports keep arriving within ``heartbeat_timeout_seconds``. It leaves when
its registration stream ends or when ``expire_stale`` finds its last report
too old. The scheduler opens one channel per worker and closes it once the
worker has left and its last call has ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

import grpc

from services.common.errors import InvalidArgument, ServiceError
from services.scheduler import metrics
from tenantserve.v1 import scheduler_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)

# Opens a channel to a worker: (address, TLS server name) -> channel.
ChannelFactory = Callable[[str, str], grpc.aio.Channel]


@dataclasses.dataclass(eq=False)
class WorkerHandle:
    """A registered worker: its latest report, its channel and this scheduler's calls on it."""

    report: scheduler_pb2.WorkerReport
    # Service name from the worker's certificate; the worker's server
    # certificate is verified against this name.
    service_name: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    # Registry clock time of the latest report.
    last_report_time: float
    # Requests this scheduler has placed on the worker and not yet released.
    num_in_flight: int = 0
    # False once the worker has left the registry, for drop_reason.
    live: bool = True
    drop_reason: str = ""
    # Generate calls that have not received their first response. They are
    # cancelled when the worker leaves, so that their requests fail over.
    calls_before_first_response: set[grpc.aio.Call] = dataclasses.field(default_factory=set)
    # Every open Generate call on the worker, streaming or not.
    calls: set[grpc.aio.Call] = dataclasses.field(default_factory=set)

    @property
    def worker_id(self) -> str:
        return self.report.worker_id

    @property
    def address(self) -> str:
        return self.report.address

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.report.models)


class RegistrationClosed(ServiceError):
    """The worker was dropped while its registration stream was still open; it must register again."""

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(grpc.StatusCode.ABORTED, f"worker {worker_id!r} was dropped ({reason}); register again")


class WorkerRegistry:
    """The live workers, keyed by worker id.

    ``on_change`` runs after every join, refresh and leave so that the
    dispatcher can place queued requests or fail those that no worker serves.
    """

    def __init__(
        self,
        heartbeat_timeout_seconds: float,
        open_channel: ChannelFactory,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        if heartbeat_timeout_seconds <= 0:
            raise ValueError(f"heartbeat_timeout_seconds must be > 0, got {heartbeat_timeout_seconds}")
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self.on_change = on_change
        self._open_channel = open_channel
        self._clock = clock
        self._workers: dict[str, WorkerHandle] = {}
        self._closing_channels: set[asyncio.Task[None]] = set()

    def register(self, report: scheduler_pb2.WorkerReport, service_name: str) -> WorkerHandle:
        """Add the worker that sent ``report``, replacing an earlier registration with the same id.

        Raises InvalidArgument when the report lacks the worker id, address,
        models or a positive max_batch_size.
        """
        _validate_report(report)
        previous = self._workers.get(report.worker_id)
        if previous is not None:
            self._remove(previous, "registered again on a new stream")
        channel = self._open_channel(report.address, service_name)
        handle = WorkerHandle(
            report=report,
            service_name=service_name,
            channel=channel,
            stub=worker_pb2_grpc.WorkerStub(channel),
            last_report_time=self._clock(),
        )
        self._workers[report.worker_id] = handle
        metrics.LIVE_WORKERS.set(len(self._workers))
        logger.info(
            "worker joined: worker_id=%s address=%s models=%s max_batch_size=%d accelerator=%s",
            handle.worker_id,
            handle.address,
            ",".join(handle.models),
            report.max_batch_size,
            scheduler_pb2.AcceleratorKind.Name(report.accelerator),
        )
        self.on_change()
        return handle

    def refresh(self, handle: WorkerHandle, report: scheduler_pb2.WorkerReport) -> None:
        """Record a later report from the stream that registered ``handle``.

        Raises RegistrationClosed when the worker was dropped meanwhile and
        InvalidArgument when the report changes the worker id or address,
        which are fixed for the life of a registration stream.
        """
        if not handle.live:
            raise RegistrationClosed(handle.worker_id, handle.drop_reason)
        _validate_report(report)
        for field in ("worker_id", "address"):
            if getattr(report, field) != getattr(handle.report, field):
                raise InvalidArgument(
                    field,
                    f"changed from {getattr(handle.report, field)!r} to {getattr(report, field)!r} "
                    "on one registration stream; open a new stream to register a different worker",
                )
        handle.report = report
        handle.last_report_time = self._clock()
        self.on_change()

    def drop(self, handle: WorkerHandle, reason: str) -> None:
        """Remove the worker behind ``handle`` unless it has already left or registered again."""
        if self._workers.get(handle.worker_id) is handle:
            self._remove(handle, reason)
            self.on_change()

    def expire_stale(self) -> list[WorkerHandle]:
        """Drop every worker whose latest report is older than the heartbeat timeout; return them."""
        deadline = self._clock() - self.heartbeat_timeout_seconds
        stale = [handle for handle in self._workers.values() if handle.last_report_time < deadline]
        for handle in stale:
            self._remove(
                handle,
                f"no report within heartbeat_timeout_seconds={self.heartbeat_timeout_seconds:g}",
                fail_streaming_calls=True,
            )
        if stale:
            self.on_change()
        return stale

    async def run_reaper(self) -> None:
        """Call ``expire_stale`` four times per heartbeat timeout until cancelled."""
        while True:
            await asyncio.sleep(self.heartbeat_timeout_seconds / 4)
            self.expire_stale()

    def release(self, handle: WorkerHandle) -> None:
        """End one of this scheduler's requests on the worker, closing the channel of a departed worker."""
        assert handle.num_in_flight > 0, f"worker {handle.worker_id} has no request in flight to release"
        handle.num_in_flight -= 1
        if not handle.live and handle.num_in_flight == 0:
            self._close_channel(handle)

    def workers(self) -> list[WorkerHandle]:
        return list(self._workers.values())

    def workers_for_model(self, model: str) -> list[WorkerHandle]:
        return [handle for handle in self._workers.values() if model in handle.report.models]

    def serves(self, model: str) -> bool:
        return any(model in handle.report.models for handle in self._workers.values())

    def get(self, worker_id: str) -> WorkerHandle | None:
        return self._workers.get(worker_id)

    def __len__(self) -> int:
        return len(self._workers)

    async def close(self) -> None:
        """Drop every worker and wait until the channels without calls in flight are closed."""
        for handle in list(self._workers.values()):
            self._remove(handle, "scheduler stopping")
        await asyncio.gather(*self._closing_channels, return_exceptions=True)

    def _remove(self, handle: WorkerHandle, reason: str, fail_streaming_calls: bool = False) -> None:
        del self._workers[handle.worker_id]
        handle.live = False
        handle.drop_reason = reason
        metrics.LIVE_WORKERS.set(len(self._workers))
        logger.info("worker left: worker_id=%s address=%s reason=%s", handle.worker_id, handle.address, reason)

        # Requests still waiting for their first response move to another
        # worker. Calls that are already streaming keep going when only the
        # registration stream closed, because the worker may still serve
        # them. A worker that stopped reporting may be hung and would hold
        # its streams open until the transport times out, so they fail now.
        calls = handle.calls if fail_streaming_calls else handle.calls_before_first_response
        for call in list(calls):
            call.cancel()
        if handle.num_in_flight == 0:
            self._close_channel(handle)

    def _close_channel(self, handle: WorkerHandle) -> None:
        task = asyncio.get_running_loop().create_task(handle.channel.close())
        self._closing_channels.add(task)
        task.add_done_callback(self._closing_channels.discard)


def _validate_report(report: scheduler_pb2.WorkerReport) -> None:
    if not report.worker_id:
        raise InvalidArgument("worker_id", "must not be empty")
    if not report.address:
        raise InvalidArgument("address", "must not be empty; send the host:port of the Worker API")
    if not report.models:
        raise InvalidArgument("models", "must name at least one model")
    if report.max_batch_size < 1:
        raise InvalidArgument("max_batch_size", f"must be >= 1, got {report.max_batch_size}")
