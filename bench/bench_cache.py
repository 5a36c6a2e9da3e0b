"""Cache service benchmark: batching, hit and miss latency, hit rate on a skewed stream.

In one run, against a real Valkey and the real all-MiniLM-L6-v2 model:

- embeddings per second encoding texts one at a time (one forward pass
  each) against submitting them concurrently to the dynamic batcher;
- p50 and p99 latency of a cache hit against a miss for a single-text
  Embed call. It is measured through the Cache gRPC service over mutual
  TLS, from a client in another process, and at the EmbeddingCache layer
  (Redis and the model, no gRPC);
- the hit rate of a Zipf-skewed stream of texts under a per-tenant byte
  budget that holds a fraction of the distinct texts.

Usage::

    .venv/bin/python bench/bench_cache.py [--device cpu] [--threads 2] [--out bench/results/cache.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from services.cache.batcher import DynamicBatcher
from services.cache.embedding_cache import EmbeddingCache
from services.cache.encoder import SentenceEncoder, select_device
from services.cache.lru_store import LruStore
from services.cache.model_files import resolve_model_dir
from services.cache.server import start_cache
from services.common import certs, tls
from services.common.config import DEFAULT_CONFIG_PATH, TenantConfig, parse_config
from services.common.valkey import ValkeyServer, redis_client
from tenantserve.v1 import cache_pb2, cache_pb2_grpc, inference_pb2

WORDS = (
    "cache tenant model vector query document search batch latency window budget token service "
    "request stream policy retrieval embedding sentence network storage memory compute answer"
).split()
# Bytes charged per cached vector of this model in a tenant namespace (about 1.6 kB).
ENTRY_BYTES = 384 * 4 + 100


def make_texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 24)))) + f" #{i}" for i in range(count)]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"p50_ms": round(percentile(ms, 0.5), 3), "p99_ms": round(percentile(ms, 0.99), 3), "n": len(ms)}


async def bench_batching(
    encoder: SentenceEncoder, num_texts: int, max_batch_size: int, window_ms: float, repeats: int
) -> dict[str, Any]:
    """Alternate the two ways in each repeat, so that drift in the machine's load affects both alike."""
    texts = make_texts(num_texts, seed=1)
    encoder.encode(texts[:8])  # warm-up
    batcher = DynamicBatcher(encoder.encode, max_batch_size, window_ms / 1000)
    batcher.start()
    one_at_a_time, batched = [], []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for text in texts:
                encoder.encode([text])
            one_at_a_time.append(num_texts / (time.perf_counter() - start))

            start = time.perf_counter()
            await asyncio.gather(*(batcher.embed([text]) for text in texts))
            batched.append(num_texts / (time.perf_counter() - start))
    finally:
        await batcher.stop()
    return {
        "num_texts": num_texts,
        "max_batch_size": max_batch_size,
        "window_ms": window_ms,
        "repeats": repeats,
        "one_at_a_time_per_second": round(statistics.median(one_at_a_time), 1),
        "batched_per_second": round(statistics.median(batched), 1),
        "speedup": round(statistics.median(b / o for b, o in zip(batched, one_at_a_time)), 2),
    }


async def bench_layer_latency(cache: EmbeddingCache, num_samples: int) -> dict[str, Any]:
    tenant = TenantConfig(name="bench-layer")
    texts = make_texts(num_samples, seed=2)
    misses, hits = [], []
    for text in texts:
        start = time.perf_counter()
        await cache.embed(tenant, [text])
        misses.append(time.perf_counter() - start)
        start = time.perf_counter()
        await cache.embed(tenant, [text])
        hits.append(time.perf_counter() - start)
    return {"hit": latency_summary(hits), "miss": latency_summary(misses)}


async def measure_grpc_latency(port: int, cert_dir: Path, num_samples: int) -> dict[str, Any]:
    """Run in the client process: time single-text Embed calls, each text first as a miss, then as a hit."""
    channel = tls.secure_channel(f"127.0.0.1:{port}", tls.service_channel_credentials(cert_dir, "admission"))
    stub = cache_pb2_grpc.CacheStub(channel)

    def request(text: str) -> cache_pb2.CacheEmbedRequest:
        return cache_pb2.CacheEmbedRequest(tenant_id="bench-grpc", request=inference_pb2.EmbedRequest(texts=[text]))

    texts = make_texts(num_samples, seed=3)
    await stub.Embed(request("warm-up text"))
    misses, hits = [], []
    for text in texts:
        start = time.perf_counter()
        reply = await stub.Embed(request(text))
        misses.append(time.perf_counter() - start)
        assert not reply.embeddings[0].cached
        start = time.perf_counter()
        reply = await stub.Embed(request(text))
        hits.append(time.perf_counter() - start)
        assert reply.embeddings[0].cached
    await channel.close()
    return {"hit": latency_summary(hits), "miss": latency_summary(misses)}


async def bench_grpc_latency(port: int, cert_dir: Path, num_samples: int) -> dict[str, Any]:
    """Measure from a separate client process, as admission calls the service in production."""
    command = [sys.executable, __file__, "--client-port", str(port), "--cert-dir", str(cert_dir), "--num-samples", str(num_samples)]
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the benchmark client exited with code {process.returncode}")
    return json.loads(stdout)


async def bench_zipf(cache: EmbeddingCache, num_distinct: int, num_requests: int, budget_entries: int, exponent: float) -> dict[str, Any]:
    tenant = TenantConfig(name=f"bench-zipf-{uuid.uuid4().hex[:6]}", max_embedding_cache_bytes=budget_entries * ENTRY_BYTES)
    texts = make_texts(num_distinct, seed=4)
    ranks = np.arange(1, num_distinct + 1)
    probabilities = ranks**-exponent / np.sum(ranks**-exponent)
    stream = np.random.default_rng(5).choice(num_distinct, size=num_requests, p=probabilities)
    num_hits = 0
    for index in stream:
        result = await cache.embed(tenant, [texts[index]])
        num_hits += result.cached[0]
    # The best any cache of this size can do on a stationary stream: always hold the most popular texts.
    ideal = float(np.sum(probabilities[:budget_entries]))
    return {
        "num_distinct_texts": num_distinct,
        "num_requests": num_requests,
        "zipf_exponent": exponent,
        "budget_entries": budget_entries,
        "hit_rate": round(num_hits / num_requests, 4),
        "static_top_k_hit_rate": round(ideal, 4),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    encoder = SentenceEncoder(resolve_model_dir(raw["services"]["cache"]["embedding_model"]), select_device(args.device))
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(encoder.device)},
    }
    results["batching"] = await bench_batching(encoder, args.num_texts, args.max_batch_size, args.window_ms, args.repeats)

    with tempfile.TemporaryDirectory() as state, ValkeyServer(Path(state) / "valkey", appendonly=False) as valkey:
        client = redis_client(valkey.url)
        batcher = DynamicBatcher(encoder.encode, args.max_batch_size, args.window_ms / 1000)
        batcher.start()
        cache = EmbeddingCache(LruStore(client), batcher, "all-minilm-l6-v2", encoder.dimension, 3600)
        results["layer_latency"] = await bench_layer_latency(cache, args.num_samples)
        results["zipf"] = await bench_zipf(cache, args.num_distinct, args.num_requests, args.budget_entries, args.zipf_exponent)
        await batcher.stop()
        await client.aclose()

        cert_dir = Path(state) / "certs"
        certs.init_certs(cert_dir, ("localhost", "127.0.0.1"))
        raw.update(redis_url=valkey.url, tls={"cert_dir": str(cert_dir), "hosts": ["localhost", "127.0.0.1"]})
        raw["services"]["cache"].update(batch_window_ms=args.window_ms, max_batch_size=args.max_batch_size)
        server = await start_cache(parse_config(raw, environ={}), listen="127.0.0.1:0", encoder=encoder)
        try:
            results["grpc_latency"] = await bench_grpc_latency(server.port, cert_dir, args.num_samples)
        finally:
            await server.stop(None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--num-texts", type=int, default=256, help="texts for the batching comparison")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the batcher's maximum batch size")
    parser.add_argument("--window-ms", type=float, default=5.0, help="the batcher's window in milliseconds")
    parser.add_argument("--num-samples", type=int, default=200, help="hit and miss samples per latency measurement")
    parser.add_argument("--num-distinct", type=int, default=2000, help="distinct texts in the Zipf stream")
    parser.add_argument("--num-requests", type=int, default=5000, help="texts in the Zipf stream")
    parser.add_argument("--budget-entries", type=int, default=200, help="vectors the tenant's byte budget holds")
    parser.add_argument("--zipf-exponent", type=float, default=1.1, help="Zipf exponent of the stream")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of the batching comparison")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--client-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.client_port:
        print(json.dumps(asyncio.run(measure_grpc_latency(args.client_port, args.cert_dir, args.num_samples))))
        return

    results = asyncio.run(run(args))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
