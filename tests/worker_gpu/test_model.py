"""The PyTorch model and runner on the real SmolLM2 weights."""

import pytest
import torch

from services.common.config import ConfigError
from services.common.engine import ModelInput, SamplingParams, SequenceInput
from services.worker_gpu.factory import resolve_device, resolve_dtype
from services.worker_gpu.gguf_loader import load_llama_gguf
from services.worker_gpu.model import LlamaModel
from services.worker_gpu.model_runner import TorchModelRunner

from .support import FRANCE_QUESTION, chat_ids, loaded_model, make_config

GREEDY = SamplingParams(max_tokens=64)


def greedy_decode(runner: TorchModelRunner, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """Decode ``prompts`` as one batch, each with its own blocks, for ``num_tokens`` steps."""
    blocks_per_sequence = 8
    sequences = [
        SequenceInput(f"s{i}", prompt, 0, list(range(i * blocks_per_sequence, (i + 1) * blocks_per_sequence)), GREEDY, 0)
        for i, prompt in enumerate(prompts)
    ]
    outputs = [[token_id] for token_id in runner.execute(ModelInput(prefills=sequences, decodes=[]))]
    for _ in range(num_tokens - 1):
        decodes = [
            SequenceInput(seq.request_id, [out[-1]], len(seq.token_ids) + len(out) - 1, seq.block_table, GREEDY, 0)
            for seq, out in zip(sequences, outputs)
        ]
        for out, token_id in zip(outputs, runner.execute(ModelInput(prefills=[], decodes=decodes))):
            out.append(token_id)
    return outputs


def make_runner(num_kv_blocks: int) -> TorchModelRunner:
    runner = TorchModelRunner(loaded_model().model, num_kv_blocks=num_kv_blocks, kv_block_size=16)
    runner.initialize()
    return runner


def test_greedy_answer_names_paris():
    runner = make_runner(num_kv_blocks=8)

    [token_ids] = greedy_decode(runner, [chat_ids(FRANCE_QUESTION)], num_tokens=10)

    assert "Paris" in loaded_model().tokenizer.decode(token_ids)


def test_bfloat16_greedy_answer_names_paris():
    weights = load_llama_gguf(make_config().models[0].gguf_path())
    model = LlamaModel(weights, torch.device("cpu"), torch.bfloat16)
    runner = TorchModelRunner(model, num_kv_blocks=8, kv_block_size=16)
    runner.initialize()

    [token_ids] = greedy_decode(runner, [chat_ids(FRANCE_QUESTION)], num_tokens=10)

    assert runner.kv_cache.dtype is torch.bfloat16
    assert "Paris" in loaded_model().tokenizer.decode(token_ids)


def test_batched_decode_matches_single_decode():
    # Prompts of different lengths exercise the padding and the masks.
    prompts = [chat_ids(FRANCE_QUESTION), chat_ids("Name three colors."), chat_ids("Hi")]
    runner = make_runner(num_kv_blocks=32)

    batched = greedy_decode(runner, prompts, num_tokens=6)
    single = [greedy_decode(runner, [prompt], num_tokens=6)[0] for prompt in prompts]

    assert batched == single


def test_prefill_after_cached_prefix_matches_full_prefill():
    prompt = chat_ids(FRANCE_QUESTION)
    runner = make_runner(num_kv_blocks=16)
    [full] = greedy_decode(runner, [prompt], num_tokens=6)

    # Blocks 0..7 hold the prompt's keys and values from the run above. A
    # second sequence shares block 0 and prefills the rest into blocks 8..15.
    block_table = [0, *range(9, 16)]
    prefill = SequenceInput("cached", prompt[16:], 16, block_table, GREEDY, 0)
    output = runner.execute(ModelInput(prefills=[prefill], decodes=[]))

    assert output[0] == full[0]


def test_float16_is_rejected_on_cpu():
    with pytest.raises(ConfigError, match="float16 is only supported on cuda"):
        resolve_dtype("float16", torch.device("cpu"))


@pytest.mark.parametrize(("name", "dtype"), [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_cpu_dtypes_are_accepted(name, dtype):
    assert resolve_dtype(name, torch.device("cpu")) is dtype


def test_invalid_device_is_rejected():
    with pytest.raises(ConfigError, match="is invalid"):
        resolve_device("tpu")
