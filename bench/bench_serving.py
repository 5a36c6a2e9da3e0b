"""Serving benchmark: the full path against the worker alone and llama-cpp-python.

For 1, 4 and 16 concurrent streams it measures aggregate output tokens per
second and p50/p99 time to first token (TTFT) three ways in one run:

- full: tenant -> admission -> scheduler -> worker, over mutual TLS;
- direct: the same token ids sent straight to the worker's Generate RPC;
- llama.cpp: llama-cpp-python on the same GGUF file, one request at a time,
  as it serves them (the reference).

Full and direct runs alternate within each repeat, so drift on the machine
affects both alike. Usage::

    .venv/bin/pip install llama-cpp-python   # benchmark only; compiles llama.cpp
    .venv/bin/python bench/bench_serving.py --repeats 3 --out bench/results/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from services.cli.client import chat_request, stream_generate, tenant_channel
from services.cli.stack import Stack, write_config
from services.common import certs, tls
from services.common.gguf_tokenizer import load_chat_tokenizer
from tenantserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Describe how a bicycle works.",
    "Explain why the sky is blue.",
    "Write a letter to a friend about a trip to the mountains.",
    "Describe a busy market in the morning.",
    "Explain how bread is baked.",
    "Write a poem about autumn leaves.",
    "Describe the life cycle of a butterfly.",
)
TENANTS = ("alpha", "beta", "gamma")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def summarize(samples: list[tuple[float, int]], wall_seconds: float) -> dict[str, float]:
    """``samples`` are (ttft seconds, completion tokens) per request."""
    ttfts = [ttft * 1000 for ttft, _ in samples]
    return {
        "tokens_per_second": sum(tokens for _, tokens in samples) / wall_seconds,
        "ttft_p50_ms": percentile(ttfts, 0.5),
        "ttft_p99_ms": percentile(ttfts, 0.99),
    }


async def closed_loop(concurrency: int, requests_per_stream: int, send) -> dict[str, float]:
    """Run ``concurrency`` streams, each sending ``requests_per_stream`` requests back to back.

    ``send(index)`` sends request number ``index`` and returns (ttft seconds,
    completion tokens).
    """

    async def stream(first_index: int) -> list[tuple[float, int]]:
        return [await send(first_index + round_ * concurrency) for round_ in range(requests_per_stream)]

    start = time.perf_counter()
    per_stream = await asyncio.gather(*(stream(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    return summarize([sample for samples in per_stream for sample in samples], wall)


async def run_full(stack: Stack, model: str, concurrency: int, args: argparse.Namespace) -> dict[str, float]:
    config = stack.config
    channels = {t: tenant_channel(config.admission.target, config.tls.cert_dir, t) for t in TENANTS}

    async def send(index: int) -> tuple[float, int]:
        tenant = TENANTS[index % len(TENANTS)]
        request = chat_request(model, PROMPTS[index % len(PROMPTS)], max_tokens=args.max_tokens)
        # Every request must reach the worker, as on the direct path.
        request.skip_completion_cache = True
        result = await stream_generate(channels[tenant], request, timeout=600)
        return result.time_to_first_token, result.num_completion_tokens

    try:
        return await closed_loop(concurrency, args.requests_per_stream, send)
    finally:
        for channel in channels.values():
            await channel.close()


async def run_direct(
    stack: Stack, model: str, prompts: list[list[int]], concurrency: int, args: argparse.Namespace
) -> dict[str, float]:
    config = stack.config
    credentials = tls.service_channel_credentials(config.tls.cert_dir, "scheduler")

    async def send(index: int) -> tuple[float, int]:
        request = worker_pb2.WorkerGenerateRequest(
            # The worker shares cached prompt prefixes only within a tenant;
            # tenant ids of their own keep the two paths from warming each
            # other's cache.
            tenant_id="direct-" + TENANTS[index % len(TENANTS)],
            request_id=uuid.uuid4().hex,
            model=model,
            prompt_token_ids=prompts[index % len(prompts)],
            sampling=common_pb2.SamplingParams(max_tokens=args.max_tokens),
            service_class=common_pb2.SERVICE_CLASS_INTERACTIVE,
        )
        sent = time.perf_counter()
        first = None
        tokens = 0
        async for response in stub.Generate(request, timeout=600):
            if response.HasField("delta") and first is None:
                first = time.perf_counter()
            if response.HasField("result"):
                tokens = response.result.usage.completion_tokens
        return (first or time.perf_counter()) - sent, tokens

    async with tls.secure_channel(config.worker_gpu.target, credentials) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        return await closed_loop(concurrency, args.requests_per_stream, send)


def run_llama_cpp(gguf_path: Path, prompts: list[list[int]], count: int, max_tokens: int) -> dict[str, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed; skipping the reference (pip install llama-cpp-python)")
        return None
    llm = Llama(model_path=str(gguf_path), n_ctx=2048, n_threads=os.cpu_count(), n_batch=512, verbose=False)
    samples = []
    start = time.perf_counter()
    for index in range(count):
        sent = time.perf_counter()
        first = None
        tokens = 0
        for token in llm.generate(prompts[index % len(prompts)], temp=0.0, top_k=1, reset=True):
            if first is None:
                first = time.perf_counter()
            if token == llm.token_eos():
                break
            tokens += 1
            if tokens >= max_tokens:
                break
        samples.append(((first or time.perf_counter()) - sent, tokens))
    return summarize(samples, time.perf_counter() - start)


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


async def measure(stack: Stack, model: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    results: dict[str, dict[str, dict[str, float]]] = {"full": {}, "direct": {}}
    # Warm-up: first requests pay for lazy initialisation in every process.
    await run_full(stack, model, 2, args)
    await run_direct(stack, model, prompts, 2, args)
    for concurrency in args.concurrency:
        full_runs, direct_runs = [], []
        for _ in range(args.repeats):
            full_runs.append(await run_full(stack, model, concurrency, args))
            direct_runs.append(await run_direct(stack, model, prompts, concurrency, args))
        results["full"][str(concurrency)] = median_of(full_runs)
        results["direct"][str(concurrency)] = median_of(direct_runs)
        print(f"c={concurrency}: full {results['full'][str(concurrency)]}  direct {results['direct'][str(concurrency)]}", flush=True)
    return results


def ratios(results: dict, concurrency: list[int]) -> dict[str, float]:
    """Compute the targets as ratios: scaling with streams, overhead of the full path, and the reference."""
    low, high = str(min(concurrency)), str(max(concurrency))
    full, direct = results["full"], results["direct"]
    out = {
        f"full_tokens_per_second_{high}_over_{low}": full[high]["tokens_per_second"] / full[low]["tokens_per_second"],
        f"direct_tokens_per_second_{high}_over_{low}": direct[high]["tokens_per_second"] / direct[low]["tokens_per_second"],
    }
    for level in map(str, concurrency):
        out[f"full_minus_direct_ttft_p50_ms_at_{level}"] = full[level]["ttft_p50_ms"] - direct[level]["ttft_p50_ms"]
    reference = results.get("llama_cpp_sequential")
    if reference:
        out[f"full_tokens_per_second_{high}_over_llama_cpp"] = full[high]["tokens_per_second"] / reference["tokens_per_second"]
    return out


def machine_description() -> dict[str, str]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per point; medians are reported (default: 3)")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request (default: 64)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="concurrent streams (default: 1 4 16)")
    parser.add_argument("--requests-per-stream", type=int, default=2, help="requests each stream sends in turn (default: 2)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tenantserve-bench-") as state_dir:
        config_path = write_config(Path(state_dir), {"tenants": [
            {"name": t, "requests_per_minute": 100000, "max_concurrent_streams": 64} for t in TENANTS
        ]})
        with Stack(config_path) as stack:
            for tenant in TENANTS:
                certs.add_tenant(stack.config.tls.cert_dir, tenant)
            model = stack.config.models[0]
            tokenizer = load_chat_tokenizer(model.gguf_path())
            prompts = [tokenizer.encode_chat([("user", text)]) for text in PROMPTS]
            results = asyncio.run(measure(stack, model.name, prompts, args))
        reference = [run_llama_cpp(model.gguf_path(), prompts, len(PROMPTS), args.max_tokens) for _ in range(args.repeats)]
        results["llama_cpp_sequential"] = median_of(reference) if reference[0] else None

    results["ratios"] = ratios(results, args.concurrency)
    results["machine"] = machine_description()
    results["settings"] = {
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "requests_per_stream": args.requests_per_stream,
    }
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    try:
        main()
    except grpc.aio.AioRpcError as exc:
        raise SystemExit(f"benchmark request failed: {exc.code().name}: {exc.details()}") from exc
