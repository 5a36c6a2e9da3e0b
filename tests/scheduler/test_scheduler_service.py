"""The Scheduler service over real mutual TLS, with StubWorker servers as workers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from tests.common.support import make_cert_dir
from tests.scheduler.support import (
    CALL_TIMEOUT_SECONDS,
    MODEL,
    TENANT_ID,
    StubWorker,
    make_report,
    make_schedule_request,
    running_scheduler,
    start_stub_worker,
    wait_until,
)

HEARTBEAT_TIMEOUT_SECONDS = 5.0


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cert_dir(tmp_path_factory.mktemp("tls"))


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def requests_total(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "tenantserve_scheduler_requests_total", {"tenant_id": TENANT_ID, "outcome": outcome}
    )
    return value or 0.0


def delta_texts(responses: list[Any]) -> list[str]:
    return [response.delta.text for response in responses if response.HasField("delta")]


async def expect_error(call: Any) -> grpc.aio.AioRpcError:
    """Consume a streaming call that must fail and return its error."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        while await call.read() is not grpc.aio.EOF:
            pass
    return raised.value


def test_schedule_relays_worker_stream(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        worker = StubWorker("w1")
        worker_server = await start_stub_worker(cert_dir, worker)
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            registration = await scheduler.register(make_report("w1", worker_server.port))
            num_ok_before = requests_total("OK")

            responses = await scheduler.schedule(make_schedule_request("r1", prompt_token_ids=[5, 6, 7]))

            assert delta_texts(responses) == ["t0", "t1", "t2"]
            assert responses[-1].result.request_id == "r1"
            assert responses[-1].result.usage.completion_tokens == 3
            assert len(worker.received) == 1
            assert worker.received[0].tenant_id == TENANT_ID
            assert worker.received[0].request_id == "r1"
            assert worker.received[0].model == MODEL
            assert list(worker.received[0].prompt_token_ids) == [5, 6, 7]
            assert worker.received[0].sampling.max_tokens == 3
            assert requests_total("OK") == num_ok_before + 1
            assert scheduler.num_in_flight("w1") == 0
            await registration.close()
        await worker_server.stop(None)

    run(scenario)


def test_schedule_passes_deadline_to_worker(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        worker = StubWorker("w1")
        worker_server = await start_stub_worker(cert_dir, worker)
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            registration = await scheduler.register(make_report("w1", worker_server.port))

            await scheduler.schedule(make_schedule_request("r1"))
            no_deadline_call = scheduler.stub().Schedule(make_schedule_request("r2"))
            [response async for response in no_deadline_call]

            with_deadline, without_deadline = worker.time_remaining
            assert with_deadline is not None
            assert 0 < with_deadline <= CALL_TIMEOUT_SECONDS
            assert without_deadline is None
            await registration.close()
        await worker_server.stop(None)

    run(scenario)


def test_registration_reply_has_heartbeat_timeout(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_scheduler(tmp_path, cert_dir, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS) as scheduler:
            registration = await scheduler.register(make_report("w1", 1))

            reply = await registration.send(make_report("w1", 1, num_running=1))

            assert reply.heartbeat_timeout_seconds == HEARTBEAT_TIMEOUT_SECONDS
            assert scheduler.server.registry.get("w1").report.num_running == 1
            await registration.close()

    run(scenario)


def test_no_worker_is_unavailable(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            num_unavailable_before = requests_total("UNAVAILABLE")

            error = await expect_error(scheduler.stub().Schedule(make_schedule_request("r1")))

            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert f"no worker serves model '{MODEL}'" in error.details()
            assert requests_total("UNAVAILABLE") == num_unavailable_before + 1

    run(scenario)


@pytest.mark.parametrize(
    "fields, code, message",
    [
        ({"tenant_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "tenant_id: must not be empty"),
        ({"request_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty"),
        ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "model 'no-such-model' is not configured"),
    ],
)
def test_schedule_validates_request(
    tmp_path: Path, cert_dir: Path, fields: dict[str, str], code: grpc.StatusCode, message: str
) -> None:
    async def scenario() -> None:
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            request = make_schedule_request("r1")
            for name, value in fields.items():
                setattr(request, name, value)

            error = await expect_error(scheduler.stub().Schedule(request))

            assert error.code() == code
            assert message in error.details()

    run(scenario)


def test_full_queue_is_resource_exhausted(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        worker = StubWorker("w1", hold_at=1)
        worker_server = await start_stub_worker(cert_dir, worker)
        async with running_scheduler(tmp_path, cert_dir, max_queue_size=2) as scheduler:
            registration = await scheduler.register(make_report("w1", worker_server.port, max_batch_size=1))
            stub = scheduler.stub()

            # max_batch_size 1 plus 2 waiting requests fill the worker.
            placed = [stub.Schedule(make_schedule_request(f"placed-{i}")) for i in range(3)]
            await wait_until(lambda: len(worker.running) == 3, "the worker runs 3 requests")
            queued = [stub.Schedule(make_schedule_request(f"queued-{i}")) for i in range(2)]
            await wait_until(lambda: scheduler.queue_depth() == 2, "2 requests are queued")
            assert REGISTRY.get_sample_value("tenantserve_scheduler_queue_depth") == 2

            error = await expect_error(stub.Schedule(make_schedule_request("rejected")))

            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queue_size=2" in error.details()
            assert scheduler.queue_depth() == 2

            # Queued requests run once the worker frees capacity.
            worker.release.set()
            for call in placed + queued:
                assert delta_texts([response async for response in call]) == ["t0", "t1", "t2"]
            assert scheduler.queue_depth() == 0
            assert scheduler.num_in_flight("w1") == 0
            await registration.close()
        await worker_server.stop(None)

    run(scenario)


def test_worker_dropped_when_registration_closes(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            registration = await scheduler.register(make_report("w1", 1))
            assert REGISTRY.get_sample_value("tenantserve_scheduler_live_workers") == 1

            await registration.close()
            await wait_until(lambda: scheduler.server.registry.get("w1") is None, "the worker is dropped")
            error = await expect_error(scheduler.stub().Schedule(make_schedule_request("r1")))

            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert REGISTRY.get_sample_value("tenantserve_scheduler_live_workers") == 0

    run(scenario)


def test_worker_dropped_without_heartbeat(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_scheduler(tmp_path, cert_dir, heartbeat_timeout_seconds=0.2) as scheduler:
            registration = await scheduler.register(make_report("w1", 1))

            await wait_until(lambda: scheduler.server.registry.get("w1") is None, "the reaper drops the worker")
            await registration.call.write(make_report("w1", 1))

            assert await registration.call.code() == grpc.StatusCode.ABORTED
            assert "register again" in await registration.call.details()

    run(scenario)


def test_cancellation_reaches_worker(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        worker = StubWorker("w1", hold_at=1)
        worker_server = await start_stub_worker(cert_dir, worker)
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            registration = await scheduler.register(make_report("w1", worker_server.port))
            num_cancelled_before = requests_total("CANCELLED")
            call = scheduler.stub().Schedule(make_schedule_request("r1"))

            first = await call.read()
            assert first.delta.text == "t0"
            assert worker.running == {"r1"}
            call.cancel()

            await wait_until(lambda: not worker.running, "the worker stops running the request")
            assert worker.cancelled == ["r1"]
            await wait_until(lambda: scheduler.num_in_flight("w1") == 0, "the scheduler frees the slot")
            assert requests_total("CANCELLED") == num_cancelled_before + 1
            await registration.close()
        await worker_server.stop(None)

    run(scenario)


def test_deadline_while_queued_removes_request(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        worker = StubWorker("w1", hold_at=1)
        worker_server = await start_stub_worker(cert_dir, worker)
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            registration = await scheduler.register(make_report("w1", worker_server.port, max_batch_size=1))
            stub = scheduler.stub()
            placed = [stub.Schedule(make_schedule_request(f"placed-{i}")) for i in range(3)]
            await wait_until(lambda: len(worker.running) == 3, "the worker runs 3 requests")
            num_deadline_exceeded_before = requests_total("DEADLINE_EXCEEDED")

            # The worker keeps every placed request open, so this one can only time out in the queue.
            error = await expect_error(stub.Schedule(make_schedule_request("late"), timeout=0.5))

            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: scheduler.queue_depth() == 0, "the request leaves the queue")
            assert [request.request_id for request in worker.received if request.request_id == "late"] == []
            await wait_until(
                lambda: requests_total("DEADLINE_EXCEEDED") == num_deadline_exceeded_before + 1,
                "the scheduler counts the request as DEADLINE_EXCEEDED",
            )
            for call in placed:
                call.cancel()
            await registration.close()
        await worker_server.stop(None)

    run(scenario)


def test_worker_error_keeps_code_and_message(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        worker = StubWorker("w1")
        worker_server = await start_stub_worker(cert_dir, worker)
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            registration = await scheduler.register(make_report("w1", worker_server.port))
            request = make_schedule_request("r1", prompt_token_ids=[StubWorker.REJECTED_TOKEN, 1, 2])

            error = await expect_error(scheduler.stub().Schedule(request))

            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details() == StubWorker.REJECTED_MESSAGE
            assert scheduler.num_in_flight("w1") == 0
            await registration.close()
        await worker_server.stop(None)

    run(scenario)


def test_lost_worker_fails_over_before_first_token(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        stalled = StubWorker("stalled", hold_at=0)
        healthy = StubWorker("healthy")
        stalled_server = await start_stub_worker(cert_dir, stalled)
        healthy_server = await start_stub_worker(cert_dir, healthy)
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            # Placement prefers the worker with more free KV cache blocks.
            stalled_registration = await scheduler.register(
                make_report("stalled", stalled_server.port, num_free_kv_blocks=1000)
            )
            call = scheduler.stub().Schedule(make_schedule_request("r1"), timeout=CALL_TIMEOUT_SECONDS)
            await wait_until(lambda: stalled.running == {"r1"}, "the stalled worker has the request")
            healthy_registration = await scheduler.register(make_report("healthy", healthy_server.port))

            await stalled_registration.close()
            responses = [response async for response in call]

            assert delta_texts(responses) == ["t0", "t1", "t2"]
            assert [request.request_id for request in healthy.received] == ["r1"]
            await wait_until(lambda: not stalled.running, "the stalled worker sees the cancellation")
            assert stalled.cancelled == ["r1"]
            await healthy_registration.close()
        await stalled_server.stop(None)
        await healthy_server.stop(None)

    run(scenario)


def test_lost_worker_after_first_token_is_unavailable(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        worker = StubWorker("w1", hold_at=1)
        worker_server = await start_stub_worker(cert_dir, worker)
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            registration = await scheduler.register(make_report("w1", worker_server.port))
            call = scheduler.stub().Schedule(make_schedule_request("r1"), timeout=CALL_TIMEOUT_SECONDS)
            first = await call.read()
            assert first.delta.text == "t0"

            await registration.close()
            await worker_server.stop(None)
            error = await expect_error(call)

            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "after streaming part of the completion" in error.details()

    run(scenario)


def test_silent_worker_fails_its_streams(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        # The worker holds the stream after one token and never reports
        # again, as a hung process would; its registration stays open.
        worker = StubWorker("w1", hold_at=1)
        worker_server = await start_stub_worker(cert_dir, worker)
        async with running_scheduler(tmp_path, cert_dir, heartbeat_timeout_seconds=0.5) as scheduler:
            registration = await scheduler.register(make_report("w1", worker_server.port))
            call = scheduler.stub().Schedule(make_schedule_request("r1"), timeout=CALL_TIMEOUT_SECONDS)
            first = await call.read()
            assert first.delta.text == "t0"

            error = await expect_error(call)

            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "no report within heartbeat_timeout_seconds" in error.details()
            await wait_until(lambda: not worker.running, "the worker call is cancelled")
            await registration.close()
        await worker_server.stop(None)

    run(scenario)


def test_queued_request_fails_when_last_worker_leaves(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        worker = StubWorker("w1", hold_at=1)
        worker_server = await start_stub_worker(cert_dir, worker)
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            registration = await scheduler.register(make_report("w1", worker_server.port, max_batch_size=1))
            stub = scheduler.stub()
            placed = [stub.Schedule(make_schedule_request(f"placed-{i}")) for i in range(3)]
            await wait_until(lambda: len(worker.running) == 3, "the worker runs 3 requests")
            queued = stub.Schedule(make_schedule_request("queued"))
            await wait_until(lambda: scheduler.queue_depth() == 1, "1 request is queued")

            await registration.close()
            error = await expect_error(queued)

            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "no worker serves model" in error.details()
            for call in placed:
                call.cancel()
        await worker_server.stop(None)

    run(scenario)


@pytest.mark.parametrize("rpc", ["Schedule", "RegisterWorker"])
def test_tenant_certificate_rejected(tmp_path: Path, cert_dir: Path, rpc: str) -> None:
    async def scenario() -> None:
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            stub = scheduler.stub(scheduler.tenant_credentials())
            if rpc == "Schedule":
                call = stub.Schedule(make_schedule_request("r1"), timeout=CALL_TIMEOUT_SECONDS)
            else:
                call = stub.RegisterWorker(iter([make_report("w1", 1)]), timeout=CALL_TIMEOUT_SECONDS)

            error = await expect_error(call)

            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert len(scheduler.server.registry) == 0

    run(scenario)


def test_worker_certificate_cannot_schedule(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            stub = scheduler.stub(scheduler.service_credentials("worker-gpu"))

            error = await expect_error(stub.Schedule(make_schedule_request("r1"), timeout=CALL_TIMEOUT_SECONDS))

            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "only admission may schedule" in error.details()

    run(scenario)


def test_admission_certificate_cannot_register(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            stub = scheduler.stub(scheduler.service_credentials("admission"))

            call = stub.RegisterWorker(iter([make_report("w1", 1)]), timeout=CALL_TIMEOUT_SECONDS)
            error = await expect_error(call)

            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "only worker services may register" in error.details()
            assert len(scheduler.server.registry) == 0

    run(scenario)


def test_unreachable_worker_fails_over_and_is_dropped(tmp_path: Path, cert_dir: Path) -> None:
    async def scenario() -> None:
        stopped = StubWorker("stopped", hold_at=0)
        healthy = StubWorker("healthy")
        stopped_server = await start_stub_worker(cert_dir, stopped)
        healthy_server = await start_stub_worker(cert_dir, healthy)
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            # The stopped worker keeps its registration open, and placement
            # prefers it for its free KV cache blocks.
            stopped_registration = await scheduler.register(
                make_report("stopped", stopped_server.port, num_free_kv_blocks=1000)
            )
            healthy_registration = await scheduler.register(make_report("healthy", healthy_server.port))
            call = scheduler.stub().Schedule(make_schedule_request("r1"), timeout=CALL_TIMEOUT_SECONDS)
            await wait_until(lambda: stopped.running == {"r1"}, "the stopped worker has the request")

            await stopped_server.stop(None)
            responses = [response async for response in call]

            assert delta_texts(responses) == ["t0", "t1", "t2"]
            assert [request.request_id for request in healthy.received] == ["r1"]
            assert scheduler.server.registry.get("stopped") is None
            await stopped_registration.call.write(make_report("stopped", stopped_server.port))
            assert await stopped_registration.call.code() == grpc.StatusCode.ABORTED
            await healthy_registration.close()
        await healthy_server.stop(None)

    run(scenario)
