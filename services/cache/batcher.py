"""Dynamic batching: texts from concurrent calls, of any tenants, share forward passes.

The first text to arrive opens a window of ``window_seconds``. The batch
is encoded when the window closes or when ``max_batch_size`` texts wait,
whichever comes first. One forward pass runs at a time in a dedicated
thread, and texts that arrive meanwhile form the next batch. Batching
shares only compute: each caller gets back the vectors of its own texts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import metrics

logger = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], np.ndarray]


@dataclass
class _PendingText:
    text: str
    future: asyncio.Future[np.ndarray]


class DynamicBatcher:
    """Coalesce ``embed`` calls into batches for ``encode`` ([n texts] -> [n, dim] array)."""

    def __init__(self, encode: EncodeFn, max_batch_size: int, window_seconds: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._encode = encode
        self._max_batch_size = max_batch_size
        self._window_seconds = window_seconds
        self._pending: list[_PendingText] = []
        self._arrival = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedding-forward")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="embedding-batcher")

    async def stop(self) -> None:
        """Stop batching; texts still waiting fail with RuntimeError."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the embedding batcher stopped"))
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Return the vectors [len(texts), dim] of ``texts``, encoded in shared batches."""
        if self._task is None:
            raise RuntimeError("the embedding batcher is not started")
        loop = asyncio.get_running_loop()
        pending = [_PendingText(text, loop.create_future()) for text in texts]
        self._pending.extend(pending)
        self._arrival.set()
        return np.stack(await asyncio.gather(*(p.future for p in pending)))

    async def _run(self) -> None:
        while True:
            await self._arrival.wait()
            await self._wait_for_batch()
            batch = self._pending[: self._max_batch_size]
            del self._pending[: self._max_batch_size]
            if not self._pending:
                self._arrival.clear()
            batch = [p for p in batch if not p.future.done()]
            if batch:
                await self._encode_batch(batch)

    async def _wait_for_batch(self) -> None:
        deadline = time.monotonic() + self._window_seconds
        while len(self._pending) < self._max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except TimeoutError:
                return

    async def _encode_batch(self, batch: list[_PendingText]) -> None:
        texts = [p.text for p in batch]
        start = time.perf_counter()
        try:
            vectors = await asyncio.get_running_loop().run_in_executor(self._executor, self._encode, texts)
        except Exception as exc:
            logger.exception("embedding forward pass of %d texts failed", len(texts))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        metrics.EMBEDDING_FORWARD_SECONDS.observe(time.perf_counter() - start)
        metrics.EMBEDDING_BATCH_SIZE.observe(len(texts))
        for pending, vector in zip(batch, vectors):
            if not pending.future.done():
                pending.future.set_result(vector)
