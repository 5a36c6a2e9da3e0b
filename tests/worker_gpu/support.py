"""Factories for the worker tests: the real model, loaded once per test process, and engines over it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import threading
from typing import Any

import torch

from services.common.config import Config, load_config
from services.common.engine import InferenceEngine, Request, RequestOutput, SamplingParams, StepStats
from services.worker_gpu.factory import LoadedModel, build_engine, load_model

FRANCE_QUESTION = "What is the capital of France?"
STORY_REQUEST = "Write a long story about a dragon who learns to bake bread."
# Two threads keep the tests polite on a shared machine.
TEST_NUM_THREADS = 2


def make_config(max_context_tokens: int | None = None, **worker_overrides: Any) -> Config:
    """The default config without environment overrides, with a small KV cache."""
    config = load_config(environ={})
    worker = dataclasses.replace(config.worker_gpu, **{"num_kv_blocks": 256, **worker_overrides})
    models = config.models
    if max_context_tokens is not None:
        models = tuple(dataclasses.replace(model, max_context_tokens=max_context_tokens) for model in models)
    return dataclasses.replace(config, worker_gpu=worker, models=models)


@functools.cache
def loaded_model() -> LoadedModel:
    """The model, loaded on a thread that exits (load_model_async explains why)."""
    torch.set_num_threads(min(TEST_NUM_THREADS, torch.get_num_threads()))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(load_model, make_config()).result()


def chat_ids(question: str) -> list[int]:
    return loaded_model().tokenizer.encode_chat([("user", question)])


class StepRecorder:
    """EngineObserver that keeps every step's stats and every finished request."""

    def __init__(self) -> None:
        self.steps: list[StepStats] = []
        self.finished: list[Request] = []
        self.lock = threading.Lock()

    def on_step(self, stats: StepStats) -> None:
        with self.lock:
            self.steps.append(stats)

    def on_request_finished(self, request: Request) -> None:
        with self.lock:
            self.finished.append(request)

    @property
    def num_steps(self) -> int:
        with self.lock:
            return len(self.steps)


def start_engine(
    observer: StepRecorder | None = None, max_context_tokens: int | None = None, **worker_overrides: Any
) -> InferenceEngine:
    engine = build_engine(make_config(max_context_tokens, **worker_overrides), loaded_model(), observer)
    engine.start()
    return engine


async def collect(
    engine: InferenceEngine, request_id: str, prompt_ids: list[int], sampling: SamplingParams
) -> list[RequestOutput]:
    """Run one request to the end and return all its outputs."""
    return [output async for output in engine.add_request(request_id, "alpha", prompt_ids, sampling)]


def text_of(outputs: list[RequestOutput]) -> str:
    return "".join(output.text for output in outputs)


async def wait_until(condition: Any, timeout: float = 30.0) -> None:
    """Poll ``condition()`` until it is true; fails the test after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)
