"""Admission benchmark: decisions per second, added latency and Redis round trips.

Three servers answer the same one-token request over the same mutual TLS,
each in its own process, in one run:

- admission: the real admission service (certificate identity, validation,
  tokenization, the Redis decision and settlement scripts, the audit log)
  in front of an instant scheduler;
- direct: the same ScheduleRequest sent straight to the instant scheduler,
  a gRPC server that answers Schedule with one result at once. It stands in
  for the scheduler and worker so that model time does not hide admission
  time; added latency is admission minus direct;
- bare: an asyncio gRPC server whose Generate answers with one result at
  once and does nothing else: the ceiling for any Python gRPC front end.

Redis round trips per request come from INFO commandstats before and after
the admission phase (lease renewals do not occur: every stream is shorter
than a third of the lease). Usage::

    .venv/bin/python bench/bench_admission.py --requests 3000 --concurrency 32 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import redis
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from services.cli.stack import free_port  # noqa: E402
from services.common import certs, tls  # noqa: E402
from services.common.config import DEFAULT_CONFIG_PATH  # noqa: E402
from services.common.grpc_server import start_server  # noqa: E402
from services.common.valkey import ValkeyServer  # noqa: E402
from tenantserve.v1 import (  # noqa: E402
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

TENANT = "bench"
# Commands that the quota scripts run inside Redis. commandstats counts them
# too, but they cost no round trip; every other command is one.
SCRIPT_COMMANDS = frozenset({
    "time", "hmget", "hget", "hset", "hdel", "hincrby", "hkeys", "exists", "zadd", "zrem", "zcard", "zcount",
    "zscore", "zrange", "zrangebyscore", "zremrangebyscore", "pexpire", "incrby", "decrby", "get", "del",
})
MODEL = "smollm2-135m-instruct"
RESULT = common_pb2.GenerateResponse(
    result=common_pb2.GenerateResult(
        finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=common_pb2.Usage(prompt_tokens=1, completion_tokens=1)
    )
)


class InstantScheduler(scheduler_pb2_grpc.SchedulerServicer):
    async def Schedule(self, request, context):  # noqa: N802 (gRPC method name)
        yield RESULT


class BareInference(inference_pb2_grpc.InferenceServicer):
    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        yield RESULT


async def serve(kind: str, listen: str, cert_dir: Path) -> None:
    """Run the instant scheduler or the bare server until SIGTERM."""

    def register(server: grpc.aio.Server) -> list[str]:
        if kind == "scheduler":
            scheduler_pb2_grpc.add_SchedulerServicer_to_server(InstantScheduler(), server)
            return [scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name]
        inference_pb2_grpc.add_InferenceServicer_to_server(BareInference(), server)
        return [inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name]

    service_name = "scheduler" if kind == "scheduler" else "admission"
    running = await start_server(service_name, listen, cert_dir, register, allowed_peer=None)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await running.stop(None)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


async def closed_loop(num_requests: int, concurrency: int, send: Callable[[], Awaitable[None]]) -> dict[str, float]:
    """Send ``num_requests`` with ``concurrency`` in flight; return requests/s and latency percentiles in ms."""
    latencies: list[float] = []
    remaining = iter(range(num_requests))

    async def worker() -> None:
        for _ in remaining:
            start = time.perf_counter()
            await send()
            latencies.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"requests_per_second": num_requests / wall, "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99)}


def generate_sender(channel: grpc.aio.Channel) -> Callable[[], Awaitable[None]]:
    stub = inference_pb2_grpc.InferenceStub(channel)
    # Temperature 1, because requests at temperature 0 go through the completion cache first.
    request = inference_pb2.GenerateRequest(
        model=MODEL, prompt="Hi", sampling=common_pb2.SamplingParams(max_tokens=1, temperature=1.0)
    )

    async def send() -> None:
        async for response in stub.Generate(request, timeout=30):
            if not response.HasField("result"):
                raise RuntimeError("expected only a result")

    return send


def schedule_sender(channel: grpc.aio.Channel) -> Callable[[], Awaitable[None]]:
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    request = scheduler_pb2.ScheduleRequest(
        tenant_id=TENANT,
        request_id="bench",
        model=MODEL,
        prompt_token_ids=[1, 2, 3],
        sampling=common_pb2.SamplingParams(max_tokens=1),
        service_class=common_pb2.SERVICE_CLASS_INTERACTIVE,
    )

    async def send() -> None:
        async for _ in stub.Schedule(request, timeout=30):
            pass

    return send


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds that process ``pid`` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_calls(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()}


def write_config(state_dir: Path, cert_dir: Path, redis_url: str, scheduler_listen: str, admission_listen: str) -> Path:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw.update(state_dir=str(state_dir), redis_url=redis_url)
    raw["tls"]["cert_dir"] = str(cert_dir)
    raw["services"]["admission"].update(listen=admission_listen, metrics_port=0)
    raw["services"]["scheduler"].update(listen=scheduler_listen)
    raw["tenants"] = [{"name": TENANT, "requests_per_minute": 1_000_000_000, "max_concurrent_streams": 1_000_000}]
    path = state_dir / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start_process(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_file:
        return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)


async def wait_ready(send: Callable[[], Awaitable[None]], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await send()
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def measure(
    args: argparse.Namespace, cert_dir: Path, ports: dict[str, int], valkey: ValkeyServer, pids: dict[str, dict[str, int]]
) -> dict:
    tenant_credentials = tls.tenant_channel_credentials(cert_dir, TENANT)
    service_credentials = tls.service_channel_credentials(cert_dir, "admission")
    channels = {
        "admission": [tls.secure_channel(f"127.0.0.1:{ports['admission']}", tenant_credentials) for _ in range(args.channels)],
        "bare": [tls.secure_channel(f"127.0.0.1:{ports['bare']}", tenant_credentials, server_name="admission") for _ in range(args.channels)],
        "direct": [tls.secure_channel(f"127.0.0.1:{ports['scheduler']}", service_credentials, server_name="scheduler") for _ in range(args.channels)],
    }
    senders = {
        "admission": [generate_sender(channel) for channel in channels["admission"]],
        "bare": [generate_sender(channel) for channel in channels["bare"]],
        "direct": [schedule_sender(channel) for channel in channels["direct"]],
    }
    for name, sender_list in senders.items():
        for sender in sender_list:
            await wait_ready(sender)

    client = redis.Redis.from_url(valkey.url)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in senders}
    round_trips: list[dict[str, float]] = []
    for _ in range(args.repeats):
        # The three alternate within each repeat, so drift affects them alike.
        for name, sender_list in senders.items():
            counter = iter(range(10**12))

            async def send(sender_list=sender_list, counter=counter) -> None:
                await sender_list[next(counter) % len(sender_list)]()

            for _ in range(args.warmup):
                await send()
            before = redis_calls(client) if name == "admission" else {}
            cpu_before = {process: cpu_seconds(pid) for process, pid in pids[name].items()}
            result = await closed_loop(args.requests, args.concurrency, send)
            # CPU time of the server processes per request: unlike requests/s, it
            # does not depend on what else runs on the machine.
            for process, pid in pids[name].items():
                result[f"{process}_cpu_ms_per_request"] = (cpu_seconds(pid) - cpu_before[process]) * 1000 / args.requests
            result["server_cpu_ms_per_request"] = sum(
                result[f"{process}_cpu_ms_per_request"] for process in pids[name]
            )
            results[name].append(result)
            if name == "admission":
                after = redis_calls(client)
                calls = {command: after[command] - before.get(command, 0) for command in after}
                round_trips.append(
                    {
                        "evalsha_per_request": calls.get("evalsha", 0) / args.requests,
                        "all_commands_per_request": sum(calls.values()) / args.requests,
                        "round_trips_per_request": sum(
                            count for command, count in calls.items() if command not in SCRIPT_COMMANDS
                        ) / args.requests,
                        "commands": {command: count for command, count in calls.items() if count},
                    }
                )
    client.close()
    for channel_list in channels.values():
        for channel in channel_list:
            await channel.close()
    return {"results": results, "redis": round_trips}


def summarize(measured: dict) -> dict:
    medians = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in measured["results"].items()
    }
    return {
        **medians,
        "admission_vs_bare_throughput": medians["admission"]["requests_per_second"] / medians["bare"]["requests_per_second"],
        "admission_vs_bare_cpu": medians["bare"]["server_cpu_ms_per_request"] / medians["admission"]["server_cpu_ms_per_request"],
        "added_latency_p50_ms": medians["admission"]["p50_ms"] - medians["direct"]["p50_ms"],
        "added_latency_p99_ms": medians["admission"]["p99_ms"] - medians["direct"]["p99_ms"],
        "evalsha_per_request": statistics.median(r["evalsha_per_request"] for r in measured["redis"]),
        "round_trips_per_request": statistics.median(r["round_trips_per_request"] for r in measured["redis"]),
        "commands_in_scripts_per_request": statistics.median(r["all_commands_per_request"] for r in measured["redis"])
        - statistics.median(r["round_trips_per_request"] for r in measured["redis"]),
        "redis_commands_last_repeat": measured["redis"][-1]["commands"],
    }


def run(args: argparse.Namespace) -> dict:
    state_dir = Path(tempfile.mkdtemp(prefix="bench-admission-"))
    cert_dir = state_dir / "certs"
    certs.init_certs(cert_dir, ("localhost", "127.0.0.1"))
    certs.add_tenant(cert_dir, TENANT)
    ports = {name: free_port() for name in ("admission", "scheduler", "bare")}
    processes: list[subprocess.Popen[bytes]] = []
    with ValkeyServer(state_dir / "valkey") as valkey:
        config_path = write_config(state_dir, cert_dir, valkey.url, f"127.0.0.1:{ports['scheduler']}", f"127.0.0.1:{ports['admission']}")
        try:
            for kind in ("scheduler", "bare"):
                processes.append(start_process(
                    [__file__, "--serve", kind, "--listen", f"127.0.0.1:{ports[kind]}", "--cert-dir", str(cert_dir)],
                    state_dir / f"{kind}.log",
                ))
            processes.append(start_process(
                ["-m", "services.admission", "--config", str(config_path), "--log-level", "WARNING"],
                state_dir / "admission.log",
            ))
            scheduler, bare, admission = (process.pid for process in processes)
            # ValkeyServer keeps its process private; its pid counts toward the admission path.
            valkey_pid = valkey._process.pid  # noqa: SLF001
            pids = {
                "admission": {"admission": admission, "scheduler": scheduler, "valkey": valkey_pid},
                "direct": {"scheduler": scheduler},
                "bare": {"bare": bare},
            }
            measured = asyncio.run(measure(args, cert_dir, ports, valkey, pids))
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(15)
    return {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "settings": vars(args),
        "summary": summarize(measured),
        "runs": measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per server per repeat (default: 3000)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default: 32)")
    parser.add_argument("--channels", type=int, default=4, help="client channels per server (default: 4)")
    parser.add_argument("--warmup", type=int, default=200, help="requests before each measurement (default: 200)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per server; medians are reported (default: 3)")
    parser.add_argument("--out", type=Path, help="also write the JSON result to this file")
    parser.add_argument("--serve", choices=("scheduler", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--listen", help=argparse.SUPPRESS)
    parser.add_argument("--cert-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.listen, args.cert_dir))
        return
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
