"""Hand queued requests to workers as capacity frees up.

All methods run on the event loop thread and never await, so the queue, the
worker registry and the in-flight counts change together.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.scheduler import metrics
from services.scheduler.placement import DEFAULT_MAX_WAITING_PER_WORKER, choose_worker
from services.scheduler.queue import RequestQueue
from services.scheduler.request import PendingRequest
from services.scheduler.worker_registry import WorkerHandle, WorkerRegistry

logger = logging.getLogger(__name__)

# Workers a request may be placed on before it fails with UNAVAILABLE. A
# request moves on only when its worker is lost before the first response.
DEFAULT_MAX_PLACEMENTS = 3


class Dispatcher:
    """Owns the request queue and places requests on the workers of the registry."""

    def __init__(
        self,
        queue: RequestQueue,
        registry: WorkerRegistry,
        *,
        max_waiting_per_worker: int = DEFAULT_MAX_WAITING_PER_WORKER,
        max_placements: int = DEFAULT_MAX_PLACEMENTS,
    ) -> None:
        self.queue = queue
        self.registry = registry
        self.max_waiting_per_worker = max_waiting_per_worker
        self.max_placements = max_placements
        registry.on_change = self.on_workers_changed

    def submit(self, request: PendingRequest) -> None:
        """Queue a new request and place it at once if a worker has capacity.

        Raises Unavailable when no worker serves the model, InvalidArgument
        when a request with the same id is queued and ResourceExhausted when
        the queue is full.
        """
        self._check_served(request)
        if request.request_id in self.queue:
            raise InvalidArgument("request_id", f"{request.request_id!r} is already queued; request ids must be unique")
        request.placement = asyncio.get_running_loop().create_future()
        if not self.queue.push(request):
            raise ResourceExhausted(
                f"scheduler queue is full (max_queue_size={self.queue.max_size}); retry later"
            )
        self._queue_changed()
        self.dispatch()

    def requeue(self, request: PendingRequest, lost_reason: str) -> None:
        """Queue a request again after its worker was lost before the first response.

        Raises Unavailable when the request has used up its placements or no
        worker serves the model any more.
        """
        if request.num_placements >= self.max_placements:
            raise Unavailable(
                f"request {request.request_id} lost its worker {request.num_placements} times "
                f"before the first response, last because {lost_reason}; retry later"
            )
        self._check_served(request)
        request.placement = asyncio.get_running_loop().create_future()
        self.queue.requeue(request)
        self._queue_changed()
        self.dispatch()

    def withdraw(self, request: PendingRequest) -> None:
        """Forget a request whose caller went away while it waited for a worker."""
        if self.queue.remove(request.request_id) is not None:
            self._queue_changed()
            return
        placement = request.placement
        if placement is not None and placement.done() and not placement.cancelled() and placement.exception() is None:
            # The request was placed just before its caller went away.
            self.release(placement.result())

    def release(self, worker: WorkerHandle) -> None:
        """Free the slot of a finished request on ``worker`` and place the next one."""
        self.registry.release(worker)
        metrics.REQUESTS_IN_FLIGHT.dec()
        self.dispatch()

    def dispatch(self) -> None:
        """Place queued requests, oldest model first, until no worker of their model has capacity."""
        for model in self.queue.models():
            self._dispatch_model(model)
        self._queue_changed()

    def on_workers_changed(self) -> None:
        """Fail queued requests whose model no worker serves any more, then place the rest."""
        for model in self.queue.models():
            if not self.registry.serves(model):
                self._fail_queued(model, f"no worker serves model {model!r}; the last one left")
        self.dispatch()

    def _dispatch_model(self, model: str) -> None:
        while True:
            worker = choose_worker(self.registry.workers_for_model(model), self.max_waiting_per_worker)
            if worker is None:
                return
            request = self.queue.pop_for_model(model)
            if request is None:
                return
            self._place(request, worker)

    def _place(self, request: PendingRequest, worker: WorkerHandle) -> None:
        assert request.placement is not None, f"request {request.request_id} was queued without a placement future"
        if request.placement.done():
            # The caller cancelled while the request was queued; withdraw()
            # finds it gone from the queue and has nothing to release.
            return
        worker.num_in_flight += 1
        metrics.REQUESTS_IN_FLIGHT.inc()
        if request.num_placements == 0:
            wait_seconds = time.monotonic() - request.arrival_time
            metrics.QUEUE_WAIT_SECONDS.labels(request.tenant_id).observe(wait_seconds)
        request.num_placements += 1
        logger.debug(
            "request placed on worker %s",
            worker.worker_id,
            extra={"request_id": request.request_id, "tenant_id": request.tenant_id},
        )
        request.placement.set_result(worker)

    def _fail_queued(self, model: str, message: str) -> None:
        while (request := self.queue.pop_for_model(model)) is not None:
            if request.placement is not None and not request.placement.done():
                request.placement.set_exception(Unavailable(message))

    def _check_served(self, request: PendingRequest) -> None:
        if not self.registry.serves(request.model):
            raise Unavailable(f"no worker serves model {request.model!r}; start a worker for it")

    def _queue_changed(self) -> None:
        metrics.QUEUE_DEPTH.set(len(self.queue))
