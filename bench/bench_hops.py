"""Time to first token at each hop of the full path, one request at a time.

Sends the same two-token greedy request, in turn, straight to the worker,
to the scheduler (as admission does) and to admission (as a tenant does),
and prints the median time to first token of each. The differences are
what each hop adds when nothing else runs. Usage::

    .venv/bin/python bench/bench_hops.py --requests 25
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from services.cli.client import chat_request, stream_generate, tenant_channel
from services.cli.stack import Stack, write_config
from services.common import tls
from services.common.gguf_tokenizer import load_chat_tokenizer
from tenantserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

PROMPT = "Explain why the sky is blue."
TENANT = "alpha"
WARM_UP_REQUESTS = 5


async def time_to_first_delta(responses: AsyncIterator[common_pb2.GenerateResponse]) -> float:
    start = time.perf_counter()
    async for response in responses:
        if response.HasField("delta"):
            return time.perf_counter() - start
    raise RuntimeError("the stream ended without a delta")


async def measure(stack: Stack, num_requests: int) -> dict[str, float]:
    config = stack.config
    model = config.models[0]
    prompt_token_ids = load_chat_tokenizer(model.gguf_path()).encode_chat([("user", PROMPT)])
    sampling = common_pb2.SamplingParams(max_tokens=2)
    worker_credentials = tls.service_channel_credentials(config.tls.cert_dir, "scheduler")
    scheduler_credentials = tls.service_channel_credentials(config.tls.cert_dir, "admission")
    samples: dict[str, list[float]] = {"worker": [], "scheduler": [], "admission": []}
    async with (
        tls.secure_channel(config.worker_gpu.target, worker_credentials) as worker_channel,
        tls.secure_channel(config.scheduler.target, scheduler_credentials) as scheduler_channel,
        tenant_channel(config.admission.target, config.tls.cert_dir, TENANT) as admission_channel,
    ):
        worker = worker_pb2_grpc.WorkerStub(worker_channel)
        scheduler = scheduler_pb2_grpc.SchedulerStub(scheduler_channel)
        fields = {"model": model.name, "prompt_token_ids": prompt_token_ids, "sampling": sampling}
        for _ in range(num_requests + WARM_UP_REQUESTS):
            # The worker shares cached prompt prefixes only within a tenant,
            # so each hop uses a tenant id of its own and none warms the
            # cache for another.
            to_worker = worker_pb2.WorkerGenerateRequest(
                tenant_id="hop-worker", request_id=uuid.uuid4().hex, **fields
            )
            samples["worker"].append(await time_to_first_delta(worker.Generate(to_worker)))
            to_scheduler = scheduler_pb2.ScheduleRequest(
                tenant_id="hop-scheduler",
                request_id=uuid.uuid4().hex,
                service_class=common_pb2.SERVICE_CLASS_INTERACTIVE,
                **fields,
            )
            samples["scheduler"].append(await time_to_first_delta(scheduler.Schedule(to_scheduler)))
            to_admission = chat_request(model.name, PROMPT, max_tokens=2)
            to_admission.skip_completion_cache = True
            samples["admission"].append((await stream_generate(admission_channel, to_admission)).time_to_first_token)
    return {hop: statistics.median(values[WARM_UP_REQUESTS:]) * 1000 for hop, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=25, help="measured requests per hop (default: 25)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tenantserve-hops-") as state_dir:
        overrides = {"tenants": [{"name": TENANT, "requests_per_minute": 100000, "max_concurrent_streams": 64}]}
        with Stack(write_config(Path(state_dir), overrides)) as stack:
            medians = asyncio.run(measure(stack, args.requests))
    for hop, median_ms in medians.items():
        print(f"{hop:<10} time to first token p50 {median_ms:6.1f} ms")


if __name__ == "__main__":
    main()
