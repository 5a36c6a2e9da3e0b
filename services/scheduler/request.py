"""The scheduler's record of one scheduled request."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING

from tenantserve.v1 import scheduler_pb2

if TYPE_CHECKING:
    from services.scheduler.worker_registry import WorkerHandle


@dataclasses.dataclass(eq=False)
class PendingRequest:
    """A scheduled request from its arrival until its stream ends."""

    message: scheduler_pb2.ScheduleRequest
    # time.monotonic() when the request arrived.
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    # Number of times a worker was chosen for the request.
    num_placements: int = 0
    # Set while the request is queued: resolves to the chosen worker, or to a
    # ServiceError that ends the request.
    placement: asyncio.Future[WorkerHandle] | None = None

    @property
    def request_id(self) -> str:
        return self.message.request_id

    @property
    def tenant_id(self) -> str:
        return self.message.tenant_id

    @property
    def model(self) -> str:
        return self.message.model
