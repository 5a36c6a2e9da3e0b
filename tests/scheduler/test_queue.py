"""Unit tests of the scheduler's request queue."""

from __future__ import annotations

import pytest

from services.scheduler.queue import FifoQueue, QueuePolicy, create_request_queue
from services.scheduler.request import PendingRequest
from tenantserve.v1 import scheduler_pb2

MODEL = "model-a"
OTHER_MODEL = "model-b"


def make_request(request_id: str, model: str = MODEL, tenant_id: str = "alpha") -> PendingRequest:
    return PendingRequest(scheduler_pb2.ScheduleRequest(request_id=request_id, model=model, tenant_id=tenant_id))


def make_queue(max_size: int = 8, requests: list[PendingRequest] | None = None) -> FifoQueue:
    queue = FifoQueue(max_size)
    for request in requests or []:
        assert queue.push(request)
    return queue


def test_push_rejects_when_full() -> None:
    queue = make_queue(max_size=2, requests=[make_request("r1"), make_request("r2")])

    accepted = queue.push(make_request("r3"))

    assert accepted is False
    assert len(queue) == 2
    assert "r3" not in queue


def test_push_accepts_again_after_pop() -> None:
    queue = make_queue(max_size=1, requests=[make_request("r1")])

    queue.pop_for_model(MODEL)

    assert queue.push(make_request("r2")) is True
    assert len(queue) == 1


def test_pop_for_model_is_fifo() -> None:
    queue = make_queue(requests=[make_request(f"r{i}") for i in range(5)])

    popped = [queue.pop_for_model(MODEL) for _ in range(5)]

    assert [request.request_id for request in popped] == ["r0", "r1", "r2", "r3", "r4"]
    assert len(queue) == 0


def test_pop_for_model_skips_other_models() -> None:
    queue = make_queue(requests=[make_request("a1"), make_request("b1", OTHER_MODEL), make_request("a2")])

    first_b = queue.pop_for_model(OTHER_MODEL)

    assert first_b is not None
    assert first_b.request_id == "b1"
    assert queue.pop_for_model(OTHER_MODEL) is None
    assert [queue.pop_for_model(MODEL).request_id for _ in range(2)] == ["a1", "a2"]


def test_pop_for_model_on_empty_queue_returns_none() -> None:
    assert make_queue().pop_for_model(MODEL) is None


def test_remove_takes_request_out_of_order() -> None:
    queue = make_queue(requests=[make_request("r1"), make_request("r2"), make_request("r3")])

    removed = queue.remove("r2")

    assert removed is not None
    assert removed.request_id == "r2"
    assert "r2" not in queue
    assert len(queue) == 2
    assert [queue.pop_for_model(MODEL).request_id for _ in range(2)] == ["r1", "r3"]


def test_remove_unknown_request_returns_none() -> None:
    queue = make_queue(requests=[make_request("r1")])

    assert queue.remove("missing") is None
    assert len(queue) == 1


def test_remove_frees_space_for_push() -> None:
    queue = make_queue(max_size=1, requests=[make_request("r1")])

    queue.remove("r1")

    assert queue.push(make_request("r2")) is True


def test_requeue_goes_first_and_ignores_bound() -> None:
    queue = make_queue(max_size=2, requests=[make_request("r2"), make_request("r3")])

    queue.requeue(make_request("r1"))

    assert len(queue) == 3
    assert queue.pop_for_model(MODEL).request_id == "r1"
    assert queue.pop_for_model(MODEL).request_id == "r2"


def test_models_ordered_by_oldest_head() -> None:
    queue = make_queue(requests=[make_request("b1", OTHER_MODEL), make_request("a1"), make_request("b2", OTHER_MODEL)])

    assert queue.models() == [OTHER_MODEL, MODEL]

    queue.pop_for_model(OTHER_MODEL)

    assert queue.models() == [MODEL, OTHER_MODEL]


def test_models_lists_requeued_model_first() -> None:
    queue = make_queue(requests=[make_request("a1")])

    queue.requeue(make_request("b1", OTHER_MODEL))

    assert queue.models() == [OTHER_MODEL, MODEL]


def test_models_empty_after_last_pop() -> None:
    queue = make_queue(requests=[make_request("a1")])

    queue.pop_for_model(MODEL)

    assert queue.models() == []


def test_push_of_queued_request_id_is_an_error() -> None:
    queue = make_queue(requests=[make_request("r1")])

    with pytest.raises(AssertionError, match="already queued"):
        queue.push(make_request("r1"))


@pytest.mark.parametrize("max_size", [0, -1])
def test_queue_rejects_invalid_max_size(max_size: int) -> None:
    with pytest.raises(ValueError, match="max_size must be >= 1"):
        FifoQueue(max_size)


def test_factory_builds_fifo_queue() -> None:
    queue = create_request_queue(7, QueuePolicy.FIFO)

    assert isinstance(queue, FifoQueue)
    assert queue.max_size == 7
