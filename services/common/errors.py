"""Domain exceptions that carry a gRPC status code, and the decorator that maps them.

Servicer code raises a ``ServiceError`` subclass; ``map_errors`` turns it into
``context.abort(code, message)``. Any other exception becomes INTERNAL with a
generic message, and its traceback is logged once on the server.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

logger = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "internal error; the server log has the details"

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])


class ServiceError(Exception):
    """An error that a handler reports to the caller as a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidArgument(ServiceError):
    """A request field has an invalid value; the message starts with the field name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}")
        self.field = field


class NotFound(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.NOT_FOUND, message)


class PermissionDenied(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.PERMISSION_DENIED, message)


class ResourceExhausted(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


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
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, exc.message)
        return
    logger.exception("unexpected error in %s", handler.__qualname__)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE)
