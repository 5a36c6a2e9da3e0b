"""Start and stop a whole tenantserve stack on one machine.

`tenantserve up`, `tenantserve demo` and the end-to-end tests share this.
It creates missing certificates and starts a Valkey server when no Redis
URL is configured. The worker, scheduler and admission each run as their
own process, and start() returns once every one reports SERVING over gRPC
health.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import certs, tls
from services.common.config import DEFAULT_CONFIG_PATH, Config, load_config, merge_mappings
from services.common.process import stop_with_parent
from services.common.valkey import ValkeyServer

logger = logging.getLogger(__name__)

# Config section, process module and certificate name of each service, in
# start order: the scheduler first so that the worker registers at once.
SERVICES: tuple[tuple[str, str, str], ...] = (
    ("scheduler", "services.scheduler", "scheduler"),
    ("worker_gpu", "services.worker_gpu", "worker-gpu"),
    ("cache", "services.cache", "cache"),
    ("admission", "services.admission", "admission"),
)
STOP_TIMEOUT_SECONDS = 15.0


class StackError(RuntimeError):
    """A service of the stack failed to start; the message includes its log tail."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(state_dir: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write a config for a private stack under ``state_dir`` and return its path.

    Starts from the default config, moves every listen and metrics port to a
    free loopback port, then merges ``overrides``. Nested dicts merge and
    other values replace, so ``tenants`` and ``models`` replace whole lists.
    """
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["state_dir"] = str(state_dir)
    for section in raw["services"].values():
        section["listen"] = f"127.0.0.1:{free_port()}"
        section["metrics_port"] = free_port()
    merge_mappings(raw, overrides or {})
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Stack:
    """The services of one config, each in its own process."""

    def __init__(self, config_path: Path | None = None) -> None:
        self.config_path = Path(config_path or os.environ.get("TENANTSERVE_CONFIG") or DEFAULT_CONFIG_PATH)
        self.config: Config = load_config(self.config_path)
        self.valkey: ValkeyServer | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = self.config.state_dir / "logs"

    @property
    def redis_url(self) -> str:
        return self.valkey.url if self.valkey else self.config.redis_url

    def start(self, timeout: float = 180.0) -> None:
        """Start everything and wait until each service reports SERVING.

        Raises StackError, after stopping what was started, when a listen
        port is taken, or when a service exits or does not become SERVING
        within ``timeout`` seconds.
        """
        try:
            with self._reserve_listen_ports():
                self._create_certificates()
                self._start_valkey()
            self._start_processes()
            deadline = time.monotonic() + timeout
            for section, _, _ in SERVICES:
                self._wait_serving(section, deadline)
        except BaseException:
            self.stop()
            raise

    @contextlib.contextmanager
    def _reserve_listen_ports(self) -> Iterator[None]:
        """Hold every configured listen port, so that Valkey's free port cannot be one of them.

        Raises StackError when a port is taken, typically by a stack that is
        already running with the same config.
        """
        sockets = []
        try:
            for section, _, _ in SERVICES:
                host, _, port = getattr(self.config, section).listen.rpartition(":")
                sock = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET)
                sockets.append(sock)
                try:
                    sock.bind((host.strip("[]"), int(port)))
                except OSError as exc:
                    raise StackError(
                        f"services.{section}.listen {host}:{port} is not available ({exc.strerror}); "
                        "is a stack with this config already running?"
                    ) from exc
            yield
        finally:
            for sock in sockets:
                sock.close()

    def _create_certificates(self) -> None:
        """Create the CA, service certificates and one certificate per configured tenant, where missing."""
        cert_dir = self.config.tls.cert_dir
        certs.init_certs(cert_dir, self.config.tls.hosts)
        for tenant in self.config.tenants:
            certs.add_tenant(cert_dir, tenant.name)

    def _start_valkey(self) -> None:
        if not self.config.redis_url:
            self.valkey = ValkeyServer()
            self.valkey.start(self.config.state_dir / "valkey")

    def exited(self) -> list[str]:
        """Return the names of the started processes that have exited, Valkey included."""
        names = [section for section, process in self.processes.items() if process.poll() is not None]
        if self.valkey is not None and not self.valkey.running:
            names.append("valkey")
        return names

    def _start_processes(self) -> None:
        env = {**os.environ, "TENANTSERVE_CONFIG": str(self.config_path), "TENANTSERVE_REDIS_URL": self.redis_url}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for section, module, _ in SERVICES:
            log_file = open(self.log_dir / f"{section}.log", "ab")
            self.processes[section] = subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(self.config_path)],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=stop_with_parent,
            )
            log_file.close()
            logger.info("started %s (pid %d)", section, self.processes[section].pid)

    def _wait_serving(self, section: str, deadline: float) -> None:
        target = getattr(self.config, section).target
        credentials = tls.service_channel_credentials(self.config.tls.cert_dir, "admission")
        with grpc.secure_channel(target, credentials) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                process = self.processes[section]
                if process.poll() is not None:
                    raise StackError(f"{section} exited with code {process.returncode}:\n{self.log_tail(section)}")
                if time.monotonic() > deadline:
                    raise StackError(f"{section} was not SERVING at {target} in time:\n{self.log_tail(section)}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        logger.info("%s is serving at %s", section, target)
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)

    def log_tail(self, section: str, num_lines: int = 40) -> str:
        path = self.log_dir / f"{section}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])

    def stop(self) -> None:
        """Stop the services in reverse start order, then Valkey."""
        for section in reversed(list(self.processes)):
            process = self.processes[section]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for section, process in self.processes.items():
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", section, STOP_TIMEOUT_SECONDS)
                process.kill()
                process.wait()
        self.processes.clear()
        if self.valkey:
            self.valkey.stop()
            self.valkey = None

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
