"""Build the worker's model and engine from the config."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

import torch

from services.common.config import Config, ConfigError
from services.common.engine import BatchConfig, EngineObserver, InferenceEngine
from services.common.gguf_tokenizer import ChatTokenizer, load_chat_tokenizer
from services.worker_gpu.gguf_loader import load_llama_gguf
from services.worker_gpu.model import LlamaModel
from services.worker_gpu.model_runner import TorchModelRunner

logger = logging.getLogger(__name__)

# Number of CPU threads torch uses for one op. Unset keeps torch's default
# (one per core).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve: its name, tokenizer and weights on the device."""

    name: str
    tokenizer: ChatTokenizer
    model: LlamaModel


def resolve_device(name: str) -> torch.device:
    """Map the config's device (auto, cpu, cuda, cuda:N) to a torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"services.worker_gpu.device: {name!r} is invalid; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"services.worker_gpu.device is {name!r} but CUDA is not available; use cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"services.worker_gpu.dtype: {name!r} is invalid; use float32, bfloat16 or float16")
    if name == "float16" and device.type == "cpu":
        raise ConfigError("services.worker_gpu.dtype: float16 is only supported on cuda; use float32 or bfloat16 on cpu")
    return DTYPES[name]


def configure_threads(num_threads: int) -> None:
    """Set torch's intra-op threads; 0 keeps torch's default (one per core)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def load_model(config: Config) -> LoadedModel:
    """Load the worker's model and tokenizer onto the configured device; takes seconds."""
    worker = config.worker_gpu
    model_config = config.model(worker.model)
    assert model_config is not None, "load_config checks that the worker's model is configured"
    device = resolve_device(worker.device)
    dtype = resolve_dtype(worker.dtype, device)
    configure_threads(worker.num_threads)

    path = model_config.gguf_path()
    tokenizer = load_chat_tokenizer(path)
    model = LlamaModel(load_llama_gguf(path), device, dtype)
    logger.info("model %s on %s as %s, %d torch threads", model_config.name, device, worker.dtype, torch.get_num_threads())
    return LoadedModel(model_config.name, tokenizer, model)


async def load_model_async(config: Config) -> LoadedModel:
    """Run load_model on a new thread that exits when it is done.

    libgomp gives each thread that runs a parallel region its own team of
    worker threads. With more team threads than cores it stops spinning
    between parallel regions, so every op of a decode step waits for a
    futex wake-up. On 2 cores a 17 ms step took 30 to 38 ms while the
    thread that loaded the model lived on. A thread that exits frees its
    team, so the engine thread owns the only one. The asyncio default
    executor would keep its thread, and its team, alive.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[LoadedModel] = loop.create_future()

    def load() -> None:
        try:
            loaded = load_model(config)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(future.set_exception, exc)
        else:
            loop.call_soon_threadsafe(future.set_result, loaded)

    threading.Thread(target=load, name="model-loader", daemon=True).start()
    return await future


def build_engine(config: Config, loaded: LoadedModel, observer: EngineObserver | None = None) -> InferenceEngine:
    """Create an engine with a fresh KV cache over ``loaded``'s weights; the caller starts it."""
    worker = config.worker_gpu
    model_config = config.model(loaded.name)
    assert model_config is not None, "load_model took the model from this config"
    if model_config.max_context_tokens > loaded.model.config.max_position:
        # Admission advertises and enforces max_context_tokens, so a larger
        # value than the model supports must not start.
        raise ConfigError(
            f"models[{model_config.name}].max_context_tokens is {model_config.max_context_tokens}, above the "
            f"model's context length of {loaded.model.config.max_position}; lower it"
        )
    max_model_len = model_config.max_context_tokens
    runner = TorchModelRunner(loaded.model, worker.num_kv_blocks, worker.kv_block_size)
    batch_config = BatchConfig(
        max_batch_size=worker.max_batch_size, max_waiting=worker.max_waiting, max_model_len=max_model_len
    )
    tokenizer = loaded.tokenizer
    return InferenceEngine(runner, tokenizer.token_bytes, tokenizer.stop_token_ids, batch_config, observer)
