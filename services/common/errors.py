"""Domain exceptions that carry a gRPC status code, and the decorator that maps them.

Servicer code raises a ``ServiceError`` subclass; ``map_errors`` turns it into
``context.abort(code, message)``, with its ``details`` (google.rpc messages
such as BadRequest, RetryInfo or QuotaFailure) packed into the rich status
that grpcio-status reads (``rpc_status.from_call``). Any other exception
becomes INTERNAL with a generic message, and its traceback is logged once on
the server.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

logger = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "internal error; the server log has the details"

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])


class ServiceError(Exception):
    """An error that a handler reports to the caller as a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Message] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # google.rpc detail messages sent in the rich status.
        self.details = tuple(details)


class InvalidArgument(ServiceError):
    """A request field has an invalid value; the message starts with the field name."""

    def __init__(self, field: str, message: str) -> None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        super().__init__(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: {message}",
            [error_details_pb2.BadRequest(field_violations=[violation])],
        )
        self.field = field


class NotFound(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.NOT_FOUND, message)


class PermissionDenied(ServiceError):
    def __init__(self, message: str, details: Sequence[Message] = ()) -> None:
        super().__init__(grpc.StatusCode.PERMISSION_DENIED, message, details)


class ResourceExhausted(ServiceError):
    def __init__(self, message: str, details: Sequence[Message] = ()) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message, details)


class Unavailable(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


class Unauthenticated(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.UNAUTHENTICATED, message)


def map_errors(handler: HandlerT) -> HandlerT:
    """Wrap a servicer method so that exceptions become gRPC statuses.

    Works on ``async def`` handlers and on async-generator (server-streaming)
    handlers; the servicer context must be the last positional argument or
    the ``context`` keyword. ``ServiceError`` aborts with its code and
    message. ``grpc.aio.AbortError`` (an abort already made) and
    ``asyncio.CancelledError`` (the client went away) propagate unchanged.
    Anything else is logged with its traceback and aborts with INTERNAL.
    """
    if inspect.isasyncgenfunction(handler):
        return _wrap_stream(handler)  # type: ignore[return-value]
    if inspect.iscoroutinefunction(handler):
        return _wrap_unary(handler)  # type: ignore[return-value]
    raise TypeError(f"map_errors needs an async def or async generator function, got {handler!r}")


def _wrap_unary(handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort_for(handler, exc, _context_of(args, kwargs))
            raise AssertionError("context.abort returned") from exc

    return wrapper


def _wrap_stream(handler: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        try:
            async for response in handler(*args, **kwargs):
                yield response
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort_for(handler, exc, _context_of(args, kwargs))
            raise AssertionError("context.abort returned") from exc

    return wrapper


def _context_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> grpc.aio.ServicerContext:
    if "context" in kwargs:
        return kwargs["context"]
    return args[-1]


async def _abort_for(handler: Callable[..., Any], exc: Exception, context: grpc.aio.ServicerContext) -> None:
    if isinstance(exc, ServiceError) and exc.details:
        await context.abort_with_status(rich_status(exc))
        return
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, exc.message)
        return
    logger.exception("unexpected error in %s", handler.__qualname__)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE)


def rich_status(exc: ServiceError) -> grpc.Status:
    """Return ``exc`` as a grpc.Status whose trailing metadata carries its google.rpc details."""
    packed = []
    for detail in exc.details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return rpc_status.to_status(status_pb2.Status(code=exc.code.value[0], message=exc.message, details=packed))
