"""Entry point of the `tenantserve` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import runpy
import signal
import sys
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli import admin, cache_commands, demo
from services.cli import usage as usage_command
from services.cli.client import chat_request, stream_generate, tenant_channel
from services.cli.stack import Stack, StackError
from services.common import certs, tls
from services.common.config import Config, ConfigError, load_config

SERVICE_MODULES = {
    "admission": "services.admission",
    "scheduler": "services.scheduler",
    "worker-gpu": "services.worker_gpu",
    "cache": "services.cache",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenantserve", description="Multi-tenant LLM serving over mutual-TLS gRPC.")
    parser.add_argument("--config", type=Path, help="config file (default: $TENANTSERVE_CONFIG, else the packaged default)")
    commands = parser.add_subparsers(dest="command", required=True)

    certs_parser = commands.add_parser("certs", help="create certificates")
    certs_commands = certs_parser.add_subparsers(dest="certs_command", required=True)
    certs_commands.add_parser("init", help="create the CA and a certificate per service, where missing")
    add_tenant = certs_commands.add_parser("add-tenant", help="issue a tenant client certificate")
    add_tenant.add_argument("name", help="tenant id, as in the config")
    add_tenant.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    add_admin = certs_commands.add_parser("add-admin", help="issue a client certificate for the Admin API")
    add_admin.add_argument("name", help="operator name, as in spiffe://tenantserve/admin/NAME")
    add_admin.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")

    commands.add_parser("up", help="start Valkey and every service on loopback until Ctrl-C")

    serve = commands.add_parser("serve", help="run one service in the foreground (one service per host)")
    serve.add_argument("service", choices=sorted(SERVICE_MODULES))

    health = commands.add_parser("health", help="exit 0 when the service, or every service, reports SERVING")
    health.add_argument(
        "service", nargs="?", type=lambda name: name.replace("_", "-"), choices=sorted(SERVICE_MODULES),
        help="service to check (default: all)",
    )

    chat = commands.add_parser("chat", help="stream one answer as a tenant")
    chat.add_argument("--tenant", required=True, help="tenant whose certificate to use")
    chat.add_argument("--model", help="model name (default: the first configured model)")
    chat.add_argument("--max-tokens", type=int, default=256, help="completion tokens at most (default: 256)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default: 0)")
    chat.add_argument("--seed", type=int, help="seed for sampling")
    chat.add_argument("--system", help="system message")
    chat.add_argument("prompt", help="the user message")

    commands.add_parser("demo", help="bring the stack up if needed and chat as three tenants at once")
    usage_command.add_parser(commands)
    admin.add_parser(commands)
    cache_commands.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_command(args)
    except (ConfigError, StackError, certs.CertificateError, ValueError) as exc:
        print(f"tenantserve: {exc}", file=sys.stderr)
        return 1


def run_command(args: argparse.Namespace) -> int:
    if args.command == "serve":
        sys.argv = [SERVICE_MODULES[args.service]] + (["--config", str(args.config)] if args.config else [])
        runpy.run_module(SERVICE_MODULES[args.service], run_name="__main__", alter_sys=True)
        return 0
    if args.command == "up":
        return run_up(args.config)
    if args.command == "demo":
        return demo.run(args.config)
    config = load_config(args.config)
    if args.command == "certs":
        return run_certs(args, config)
    if args.command == "health":
        services = [args.service] if args.service else sorted(SERVICE_MODULES)
        return max(run_health(service, config) for service in services)
    if args.command == "usage":
        return usage_command.run(args, config)
    if args.command == "admin":
        return admin.run(args, config)
    if args.command in cache_commands.COMMANDS:
        return cache_commands.run(args, config)
    return asyncio.run(run_chat(args, config))


def run_certs(args: argparse.Namespace, config: Config) -> int:
    if args.certs_command == "init":
        certs.init_certs(config.tls.cert_dir, config.tls.hosts)
        certs.add_admin(config.tls.cert_dir, admin.DEFAULT_ADMIN)
        print(f"certificates are in {config.tls.cert_dir}")
        return 0
    if args.certs_command == "add-admin":
        cert_path, key_path = certs.add_admin(config.tls.cert_dir, args.name, valid_days=args.days)
        print(f"admin {args.name}: certificate {cert_path}, key {key_path}")
        return 0
    cert_path, key_path = certs.add_tenant(config.tls.cert_dir, args.name, valid_days=args.days)
    print(f"tenant {args.name}: certificate {cert_path}, key {key_path}")
    if config.tenant(args.name) is None:
        print(f"note: tenant {args.name} is not in the config, so admission rejects it until it is added")
    return 0


def run_up(config_path: Path | None) -> int:
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    stack = Stack(config_path)
    stack.start()
    try:
        print(f"redis      {stack.redis_url}")
        for name in ("admission", "scheduler", "worker_gpu", "cache"):
            service = getattr(stack.config, name)
            print(f"{name:<10} grpc {service.target}  metrics http://127.0.0.1:{service.metrics_port}/metrics")
        print(f"logs in {stack.log_dir}; Ctrl-C stops everything", flush=True)
        while not stopped.wait(0.5):
            exited = stack.exited()
            if exited:
                print(f"tenantserve: {', '.join(exited)} exited; see {stack.log_dir}", file=sys.stderr)
                return 1
        return 0
    finally:
        stack.stop()


def run_health(service: str, config: Config) -> int:
    section = service.replace("-", "_")
    target = getattr(config, section).target
    credentials = tls.service_channel_credentials(config.tls.cert_dir, service)
    with grpc.secure_channel(target, credentials) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3.0)
        except grpc.RpcError as exc:
            print(f"{service} at {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{service} at {target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


async def run_chat(args: argparse.Namespace, config: Config) -> int:
    model = args.model or config.models[0].name
    request = chat_request(model, args.prompt, args.max_tokens, args.temperature, args.seed, args.system)
    if not (config.tls.cert_dir / "tenants" / f"{args.tenant}.crt").exists():
        print(
            f"tenantserve: no certificate for tenant {args.tenant} in {config.tls.cert_dir}; "
            f"create one with `tenantserve certs add-tenant {args.tenant}`",
            file=sys.stderr,
        )
        return 1
    try:
        async with tenant_channel(config.admission.target, config.tls.cert_dir, args.tenant) as channel:
            result = await stream_generate(channel, request, on_text=lambda text: print(text, end="", flush=True))
    except grpc.aio.AioRpcError as exc:
        print(f"\ntenantserve: request failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print()
    print(
        f"[{result.finish_reason}, {result.num_prompt_tokens} prompt + {result.num_completion_tokens} completion "
        f"tokens, first token {result.time_to_first_token * 1000:.0f} ms, request {result.request_id}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
