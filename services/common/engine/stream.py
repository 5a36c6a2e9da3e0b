"""Async iterator over the outputs of one request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

from services.common.engine.errors import EngineStoppedError, RequestFailedError
from services.common.engine.request import FinishReason, RequestOutput


class RequestStream:
    """Outputs of one request, fed by the engine thread, read by one asyncio task.

    Iteration ends after the output that carries the finish reason. A request
    that failed raises RequestFailedError from the iteration, or
    EngineStoppedError when the engine stopped before it finished. Closing the
    stream before that aborts the request, which frees its batch slot and KV
    cache blocks within one step.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.loop = loop
        self._abort = abort
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._done = False

    def put(self, output: RequestOutput) -> None:
        """Queue ``output``; call it on the stream's event loop."""
        self._queue.put_nowait(output)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        output = await self._queue.get()
        if output.finished:
            self._done = True
        if output.finish_reason is FinishReason.ERROR and output.engine_stopped:
            raise EngineStoppedError(output.error or "the engine stopped")
        if output.finish_reason is FinishReason.ERROR:
            raise RequestFailedError(output.error or "model step failed")
        return output

    def close(self) -> None:
        """Abort the request unless it already finished."""
        if not self._done:
            self._done = True
            self._abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
