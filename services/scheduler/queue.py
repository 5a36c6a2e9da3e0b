"""Requests waiting for a worker, behind one interface so the policy can change.

``FifoQueue`` serves each model's requests in arrival order. A fair queue that
orders requests by service class and tenant weight will implement the same
``RequestQueue`` interface. ``create_request_queue`` is the only place that
chooses the implementation.
"""

from __future__ import annotations

import abc
import enum
import itertools
from collections import OrderedDict

from services.scheduler.request import PendingRequest


class QueuePolicy(enum.Enum):
    FIFO = "fifo"


class RequestQueue(abc.ABC):
    """A bounded set of pending requests, each waiting for a worker of its model.

    Methods are synchronous and not thread-safe, so callers use the queue
    from the event loop thread only.
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size

    @abc.abstractmethod
    def push(self, request: PendingRequest) -> bool:
        """Add a newly arrived request, or return False and leave the queue unchanged when it is full."""

    @abc.abstractmethod
    def requeue(self, request: PendingRequest) -> None:
        """Add back a request that was popped but could not run.

        The request was admitted once, so the size bound does not apply. It
        goes ahead of every request that is waiting for its first placement.
        """

    @abc.abstractmethod
    def pop_for_model(self, model: str) -> PendingRequest | None:
        """Remove and return the next request for ``model``, or None when there is none."""

    @abc.abstractmethod
    def remove(self, request_id: str) -> PendingRequest | None:
        """Remove and return the request with ``request_id``, or None when it is not queued."""

    @abc.abstractmethod
    def models(self) -> list[str]:
        """Return the models that have queued requests, ordered by which to serve first."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Return the number of queued requests."""

    @abc.abstractmethod
    def __contains__(self, request_id: object) -> bool:
        """Return whether a request with this id is queued."""


class FifoQueue(RequestQueue):
    """First in, first out within each model; across models the oldest head goes first."""

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        # model -> request_id -> (arrival sequence number, request), oldest first.
        self._by_model: dict[str, OrderedDict[str, tuple[int, PendingRequest]]] = {}
        self._model_of: dict[str, str] = {}
        self._sequence = itertools.count()

    def push(self, request: PendingRequest) -> bool:
        if len(self) >= self.max_size:
            return False
        self._insert(request, next(self._sequence), front=False)
        return True

    def requeue(self, request: PendingRequest) -> None:
        # A negative sequence number sorts the request ahead of every
        # request that was pushed normally.
        self._insert(request, -next(self._sequence), front=True)

    def pop_for_model(self, model: str) -> PendingRequest | None:
        requests = self._by_model.get(model)
        if not requests:
            return None
        request_id, (_, request) = requests.popitem(last=False)
        self._forget(request_id, model)
        return request

    def remove(self, request_id: str) -> PendingRequest | None:
        model = self._model_of.get(request_id)
        if model is None:
            return None
        _, request = self._by_model[model].pop(request_id)
        self._forget(request_id, model)
        return request

    def models(self) -> list[str]:
        heads = {model: next(iter(requests.values()))[0] for model, requests in self._by_model.items()}
        return sorted(heads, key=heads.__getitem__)

    def __len__(self) -> int:
        return len(self._model_of)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._model_of

    def _insert(self, request: PendingRequest, sequence: int, *, front: bool) -> None:
        assert request.request_id not in self._model_of, f"request {request.request_id} is already queued"
        requests = self._by_model.setdefault(request.model, OrderedDict())
        requests[request.request_id] = (sequence, request)
        if front:
            requests.move_to_end(request.request_id, last=False)
        self._model_of[request.request_id] = request.model

    def _forget(self, request_id: str, model: str) -> None:
        del self._model_of[request_id]
        if not self._by_model[model]:
            del self._by_model[model]


def create_request_queue(max_size: int, policy: QueuePolicy = QueuePolicy.FIFO) -> RequestQueue:
    """Build the request queue for ``policy``, holding at most ``max_size`` requests."""
    if policy is QueuePolicy.FIFO:
        return FifoQueue(max_size)
    raise ValueError(f"unknown queue policy {policy!r}")
