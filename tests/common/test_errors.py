"""map_errors turns exceptions from real gRPC handlers into statuses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from services.common import errors
from services.common.errors import INTERNAL_ERROR_MESSAGE, map_errors

SERVICE = "tenantserve.test.Errors"
CALL_TIMEOUT = 10.0


class ErrorsServicer:
    """Handlers that fail in each way map_errors handles."""

    def __init__(self) -> None:
        self.stream_cancelled = asyncio.Event()

    @map_errors
    async def InvalidPrompt(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise errors.InvalidArgument("prompt", "is empty")

    @map_errors
    async def UnknownModel(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise errors.NotFound("model 'x' is not served here")

    @map_errors
    async def Crash(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("secret internal detail")

    @map_errors
    async def Abort(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "aborted by the handler")
        return b""

    @map_errors
    async def Echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    @map_errors
    async def StreamThenQuota(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"first"
        raise errors.ResourceExhausted("token quota exhausted for tenant alpha")

    @map_errors
    async def StreamThenCrash(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"first"
        raise KeyError("secret")

    @map_errors
    async def StreamForever(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"tick"
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise


def add_errors_servicer(server: grpc.aio.Server, servicer: ErrorsServicer) -> None:
    unary = ("InvalidPrompt", "UnknownModel", "Crash", "Abort", "Echo")
    streaming = ("StreamThenQuota", "StreamThenCrash", "StreamForever")
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name)) for name in unary}
    handlers |= {name: grpc.unary_stream_rpc_method_handler(getattr(servicer, name)) for name in streaming}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def run_with_server(scenario: Callable[[grpc.aio.Channel, ErrorsServicer], Awaitable[None]]) -> None:
    """Run ``scenario`` against an in-process loopback server with ErrorsServicer."""

    async def main() -> None:
        servicer = ErrorsServicer()
        server = grpc.aio.server()
        add_errors_servicer(server, servicer)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await scenario(channel, servicer)
        finally:
            await server.stop(None)

    asyncio.run(main())


async def call_unary(channel: grpc.aio.Channel, method: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(f"/{SERVICE}/{method}")(b"", timeout=CALL_TIMEOUT)
    return raised.value


async def call_stream(channel: grpc.aio.Channel, method: str) -> tuple[list[bytes], grpc.aio.AioRpcError]:
    received: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for message in channel.unary_stream(f"/{SERVICE}/{method}")(b"", timeout=CALL_TIMEOUT):
            received.append(message)
    return received, raised.value


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == errors.__name__ and r.levelno >= logging.ERROR]


def test_invalid_argument_names_field(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(channel: grpc.aio.Channel, servicer: ErrorsServicer) -> None:
        error = await call_unary(channel, "InvalidPrompt")

        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == "prompt: is empty"

    run_with_server(scenario)
    assert error_records(caplog) == []


def test_not_found_keeps_message() -> None:
    async def scenario(channel: grpc.aio.Channel, servicer: ErrorsServicer) -> None:
        error = await call_unary(channel, "UnknownModel")

        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "model 'x' is not served here"

    run_with_server(scenario)


def test_unexpected_error_becomes_internal(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(channel: grpc.aio.Channel, servicer: ErrorsServicer) -> None:
        error = await call_unary(channel, "Crash")

        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == INTERNAL_ERROR_MESSAGE
        assert "secret" not in error.details()

    run_with_server(scenario)
    records = error_records(caplog)
    assert len(records) == 1
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], RuntimeError)


def test_abort_passes_through(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(channel: grpc.aio.Channel, servicer: ErrorsServicer) -> None:
        error = await call_unary(channel, "Abort")

        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == "aborted by the handler"

    run_with_server(scenario)
    assert error_records(caplog) == []


def test_successful_call_is_unchanged() -> None:
    async def scenario(channel: grpc.aio.Channel, servicer: ErrorsServicer) -> None:
        response = await channel.unary_unary(f"/{SERVICE}/Echo")(b"ping", timeout=CALL_TIMEOUT)

        assert response == b"ping"

    run_with_server(scenario)


def test_stream_error_after_first_message(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(channel: grpc.aio.Channel, servicer: ErrorsServicer) -> None:
        received, error = await call_stream(channel, "StreamThenQuota")

        assert received == [b"first"]
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == "token quota exhausted for tenant alpha"

    run_with_server(scenario)
    assert error_records(caplog) == []


def test_stream_unexpected_error_becomes_internal(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(channel: grpc.aio.Channel, servicer: ErrorsServicer) -> None:
        received, error = await call_stream(channel, "StreamThenCrash")

        assert received == [b"first"]
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == INTERNAL_ERROR_MESSAGE

    run_with_server(scenario)
    records = error_records(caplog)
    assert len(records) == 1
    assert isinstance(records[0].exc_info[1], KeyError)


def test_cancelled_stream_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(channel: grpc.aio.Channel, servicer: ErrorsServicer) -> None:
        call = channel.unary_stream(f"/{SERVICE}/StreamForever")(b"", timeout=CALL_TIMEOUT)
        assert await call.read() == b"tick"
        call.cancel()
        await asyncio.wait_for(servicer.stream_cancelled.wait(), CALL_TIMEOUT)

    run_with_server(scenario)
    assert error_records(caplog) == []


def test_map_errors_rejects_sync_function() -> None:
    def handler(request: bytes, context: object) -> bytes:
        return request

    with pytest.raises(TypeError, match="async def or async generator"):
        map_errors(handler)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument("max_tokens", "must be >= 1"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("missing"), grpc.StatusCode.NOT_FOUND),
        (errors.PermissionDenied("denied"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.ResourceExhausted("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (errors.Unauthenticated("who"), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_service_error_codes(error: errors.ServiceError, code: grpc.StatusCode) -> None:
    assert error.code == code
    assert str(error) == error.message


def test_invalid_argument_keeps_field() -> None:
    error = errors.InvalidArgument("max_tokens", "must be >= 1")

    assert error.field == "max_tokens"
    assert error.message == "max_tokens: must be >= 1"
