"""Inference engine: one background thread runs model steps for asyncio callers.

Callers on an event loop add requests and read their outputs from a
RequestStream. The engine thread admits waiting requests, runs one model
step over the whole batch, turns the sampled tokens into text deltas and
hands them to each request's event loop. Every method of the engine is
thread-safe; the model runner is only ever called from the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.engine.batch_scheduler import BatchConfig, BatchScheduler, ScheduledStep
from services.common.engine.block_pool import BlockPool
from services.common.engine.detokenizer import IncrementalDetokenizer
from services.common.engine.errors import EngineStoppedError, InvalidRequestError, WaitingQueueFullError
from services.common.engine.model_runner import ModelInput, ModelRunner, SequenceInput
from services.common.engine.request import FinishReason, Request, RequestOutput, RequestStatus, SamplingParams
from services.common.engine.stream import RequestStream

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_kv_blocks: int
    num_total_kv_blocks: int
    kv_block_size: int
    max_batch_size: int


@dataclass(frozen=True)
class StepStats:
    num_prefills: int
    num_decodes: int
    # Prompt tokens that ran through the model.
    num_prefill_tokens: int
    # Prompt tokens whose keys and values came from the prefix cache.
    num_cached_prompt_tokens: int
    duration_seconds: float
    engine: EngineStats


class EngineObserver(Protocol):
    """Receives engine events on the engine thread, for metrics."""

    def on_step(self, stats: StepStats) -> None: ...

    def on_request_finished(self, request: Request) -> None: ...


class InferenceEngine:
    def __init__(
        self,
        runner: ModelRunner,
        token_bytes: Sequence[bytes],
        stop_token_ids: Collection[int],
        config: BatchConfig,
        observer: EngineObserver | None = None,
    ) -> None:
        if config.max_model_len > runner.max_position:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's {runner.max_position} positions; lower it"
            )
        self.runner = runner
        self.config = config
        self._token_bytes = token_bytes
        self._stop_token_ids = frozenset(stop_token_ids)
        self._observer = observer
        self._block_pool = BlockPool(runner.num_kv_blocks, runner.kv_block_size)
        self._scheduler = BatchScheduler(config, self._block_pool)
        # Guards everything below; the engine thread waits on it when idle.
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._requests: dict[str, Request] = {}
        self._streams: dict[str, RequestStream] = {}
        self._abort_ids: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # Lifecycle

    def start(self) -> None:
        """Start the engine thread; returns once the runner is initialized on it.

        Raises what ModelRunner.initialize raised, for example when the KV
        cache does not fit in memory.
        """
        if self._thread is not None:
            raise RuntimeError("engine already started")
        initialized = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(initialized, errors), name="inference-engine", daemon=True
        )
        self._thread.start()
        initialized.wait()
        if errors:
            raise errors[0]

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread; requests still in the engine fail with an error."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all("the engine stopped", engine_stopped=True)

    # Caller API

    def add_request(
        self, request_id: str, tenant_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams
    ) -> RequestStream:
        """Queue a request and return the stream of its outputs.

        Call it from the event loop that reads the stream. Raises
        InvalidRequestError for a request that can never run,
        WaitingQueueFullError when max_waiting requests already wait, and
        EngineStoppedError after stop().
        """
        request = self._new_request(request_id, tenant_id, prompt_token_ids, sampling)
        stream = RequestStream(request_id, asyncio.get_running_loop(), self.abort_request)
        with self._wakeup:
            if self._stopping:
                raise EngineStoppedError("the engine is stopping")
            if request_id in self._requests:
                raise InvalidRequestError("request_id", f"{request_id!r} is already in the engine")
            if not self._scheduler.can_add():
                raise WaitingQueueFullError(f"{self.config.max_waiting} requests are already waiting")
            self._scheduler.add(request)
            self._requests[request_id] = request
            self._streams[request_id] = stream
            self._wakeup.notify()
        logger.debug("request queued", extra={"request_id": request_id, "tenant_id": tenant_id})
        return stream

    def abort_request(self, request_id: str) -> None:
        """Abort the request at the next step boundary; unknown ids are ignored."""
        with self._wakeup:
            if request_id in self._requests:
                self._abort_ids.add(request_id)
                self._wakeup.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            return self._stats_locked()

    # Request validation

    def _new_request(
        self, request_id: str, tenant_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams
    ) -> Request:
        try:
            sampling.validate()
        except ValueError as exc:
            raise InvalidRequestError("sampling", str(exc)) from exc
        self._check_prompt(prompt_token_ids)
        request = Request(
            request_id=request_id,
            tenant_id=tenant_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            seed=sampling.seed if sampling.seed is not None else secrets.randbits(63),
            detokenizer=IncrementalDetokenizer(self._token_bytes, sampling.stop),
        )
        num_blocks = self._scheduler.num_blocks_needed(request)
        if num_blocks > self._block_pool.num_total_blocks:
            raise InvalidRequestError(
                "sampling.max_tokens",
                f"prompt plus max_tokens need {num_blocks} KV cache blocks but the worker has "
                f"{self._block_pool.num_total_blocks}; lower max_tokens",
            )
        return request

    def _check_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        if not prompt_token_ids:
            raise InvalidRequestError("prompt_token_ids", "the prompt is empty")
        if len(prompt_token_ids) >= self.config.max_model_len:
            raise InvalidRequestError(
                "prompt_token_ids",
                f"the prompt has {len(prompt_token_ids)} tokens but the context holds {self.config.max_model_len} "
                "including at least one completion token; shorten the prompt",
            )
        vocab_size = len(self._token_bytes)
        if any(not 0 <= token_id < vocab_size for token_id in prompt_token_ids):
            raise InvalidRequestError("prompt_token_ids", f"every token id must be in [0, {vocab_size})")

    # Engine thread

    def _run(self, initialized: threading.Event, errors: list[BaseException]) -> None:
        try:
            self.runner.initialize()
        except BaseException as exc:
            errors.append(exc)
            return
        finally:
            initialized.set()
        logger.info("engine started with max_batch_size=%s", self.config.max_batch_size)
        while True:
            try:
                if not self._run_once():
                    break
            except Exception:
                # A bug outside the model step must not leave callers waiting forever.
                logger.exception("engine iteration failed; failing every request in the engine")
                self._fail_all("internal engine error")
        logger.info("engine stopped")

    def _run_once(self) -> bool:
        """Apply aborts, then run one step or wait for work; returns False once stopping."""
        with self._wakeup:
            # stop() fails the requests still in the engine.
            if self._stopping:
                return False
            outputs = self._apply_aborts()
            step = self._scheduler.schedule()
            if step.is_empty and not outputs:
                self._wakeup.wait()
                return True
            model_input = _model_input(step)
        self._deliver(outputs)
        if not step.is_empty:
            self._run_step(step, model_input)
        return True

    def _fail_all(self, error: str, engine_stopped: bool = False) -> None:
        with self._lock:
            requests = list(self._requests.values())
            outputs = [self._finish(r, FinishReason.ERROR, error, engine_stopped=engine_stopped) for r in requests]
        self._deliver(outputs)

    def _run_step(self, step: ScheduledStep, model_input: ModelInput) -> None:
        started = time.perf_counter()
        try:
            token_ids = self.runner.execute(model_input)
        except Exception as exc:
            logger.exception("model step failed; failing the %s requests in the batch", step.num_sequences)
            with self._lock:
                outputs = [self._finish(r, FinishReason.ERROR, f"model step failed: {exc}") for r in _live(step)]
            self._deliver(outputs)
            return
        duration = time.perf_counter() - started

        with self._lock:
            # Requests aborted while the step ran leave before their token is used.
            outputs = self._apply_aborts()
            for request, token_id in zip(step.prefills + step.decodes, token_ids, strict=True):
                if not request.is_finished:
                    outputs.append(self._append_token(request, token_id))
            stats = self._stats_locked()
        self._deliver(outputs)
        if self._observer is not None:
            self._observer.on_step(_step_stats(model_input, duration, stats))

    def _append_token(self, request: Request, token_id: int) -> tuple[RequestStream, RequestOutput]:
        if request.num_computed_tokens < request.num_prompt_tokens:
            self._scheduler.cache_prompt_blocks(request)
        request.num_computed_tokens = request.num_tokens
        request.output_token_ids.append(token_id)
        detokenizer = request.detokenizer
        text = detokenizer.add([token_id])

        reason: FinishReason | None = None
        if token_id in self._stop_token_ids:
            reason = FinishReason.STOP
        elif detokenizer.stop_found is not None:
            reason = FinishReason.STOP_STRING
        elif len(request.output_token_ids) >= request.sampling.max_tokens:
            reason = FinishReason.LENGTH
        elif request.num_tokens >= self.config.max_model_len:
            reason = FinishReason.LENGTH

        if reason is None:
            return self._streams[request.request_id], _output(request, (token_id,), text)
        if reason is not FinishReason.STOP_STRING:
            text += detokenizer.flush()
        return self._finish(request, reason, token_ids=(token_id,), text=text)

    def _apply_aborts(self) -> list[tuple[RequestStream, RequestOutput]]:
        outputs = []
        for request_id in self._abort_ids:
            request = self._requests.get(request_id)
            if request is not None:
                outputs.append(self._finish(request, FinishReason.CANCELLED))
                logger.debug("request aborted", extra={"request_id": request_id, "tenant_id": request.tenant_id})
        self._abort_ids.clear()
        return outputs

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        error: str | None = None,
        token_ids: tuple[int, ...] = (),
        text: str = "",
        engine_stopped: bool = False,
    ) -> tuple[RequestStream, RequestOutput]:
        """Take the request out of the engine, free its blocks and build its last output."""
        was_running = request.status is RequestStatus.RUNNING
        self._scheduler.finish(request)
        request.finish_reason = reason
        if was_running:
            self.runner.release(request.request_id)
        del self._requests[request.request_id]
        stream = self._streams.pop(request.request_id)
        if self._observer is not None:
            self._observer.on_request_finished(request)
        return stream, _output(request, token_ids, text, reason, error, engine_stopped)

    def _deliver(self, outputs: list[tuple[RequestStream, RequestOutput]]) -> None:
        """Hand outputs to their streams with one wake-up per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = defaultdict(list)
        for stream, output in outputs:
            by_loop[stream.loop].append((stream, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                # The loop is closed, so these streams have no reader any more.
                for stream, output in items:
                    if not output.finished:
                        self.abort_request(stream.request_id)

    def _stats_locked(self) -> EngineStats:
        return EngineStats(
            num_running=self._scheduler.num_running,
            num_waiting=self._scheduler.num_waiting,
            num_free_kv_blocks=self._block_pool.num_free_blocks,
            num_total_kv_blocks=self._block_pool.num_total_blocks,
            kv_block_size=self._block_pool.block_size,
            max_batch_size=self.config.max_batch_size,
        )


def _step_stats(model_input: ModelInput, duration: float, stats: EngineStats) -> StepStats:
    return StepStats(
        num_prefills=len(model_input.prefills),
        num_decodes=len(model_input.decodes),
        num_prefill_tokens=sum(len(seq.token_ids) for seq in model_input.prefills),
        num_cached_prompt_tokens=sum(seq.start_position for seq in model_input.prefills),
        duration_seconds=duration,
        engine=stats,
    )


def _model_input(step: ScheduledStep) -> ModelInput:
    return ModelInput(
        prefills=[_sequence_input(request) for request in step.prefills],
        decodes=[_sequence_input(request) for request in step.decodes],
    )


def _sequence_input(request: Request) -> SequenceInput:
    return SequenceInput(
        request_id=request.request_id,
        token_ids=request.uncomputed_token_ids(),
        start_position=request.num_computed_tokens,
        block_table=request.block_table,
        sampling=request.sampling,
        seed=request.seed,
    )


def _live(step: ScheduledStep) -> list[Request]:
    return [request for request in step.prefills + step.decodes if not request.is_finished]


def _output(
    request: Request,
    token_ids: tuple[int, ...],
    text: str,
    reason: FinishReason | None = None,
    error: str | None = None,
    engine_stopped: bool = False,
) -> RequestOutput:
    return RequestOutput(
        request_id=request.request_id,
        token_ids=token_ids,
        text=text,
        num_prompt_tokens=request.num_prompt_tokens,
        num_completion_tokens=len(request.output_token_ids),
        finish_reason=reason,
        error=error,
        engine_stopped=engine_stopped,
    )


def _put_all(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.put(output)
