"""The local valkey-server process and the asyncio client."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import redis

from services.common import valkey
from services.common.valkey import ValkeyServer, ValkeyStartError, redis_client


async def ping_and_count(url: str) -> tuple[bool, int]:
    client = redis_client(url)
    try:
        return await client.ping(), await client.incrby(b"tenant:alpha:tokens", 5)
    finally:
        await client.aclose()


def test_valkey_start_ping_stop(tmp_path: Path) -> None:
    server = ValkeyServer()
    server.start(tmp_path / "valkey")
    url = server.url
    try:
        pong, count = asyncio.run(ping_and_count(url))
    finally:
        server.stop()

    assert url.startswith("redis://127.0.0.1:")
    assert url.endswith("/0")
    assert pong is True
    assert count == 5
    assert server.running is False
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()


def test_valkey_client_returns_bytes(tmp_path: Path) -> None:
    async def scenario(url: str) -> object:
        client = redis_client(url)
        try:
            await client.set("tenant:alpha:name", "alpha")
            return await client.get("tenant:alpha:name")
        finally:
            await client.aclose()

    with ValkeyServer(tmp_path) as server:
        value = asyncio.run(scenario(server.url))

    assert value == b"alpha"


def test_valkey_data_survives_restart(tmp_path: Path) -> None:
    with ValkeyServer(tmp_path) as server:
        asyncio.run(ping_and_count(server.url))
    with ValkeyServer(tmp_path) as server:
        _, count = asyncio.run(ping_and_count(server.url))

    assert count == 10


def test_valkey_without_appendonly_starts_empty(tmp_path: Path) -> None:
    with ValkeyServer(tmp_path, appendonly=False) as server:
        asyncio.run(ping_and_count(server.url))
    with ValkeyServer(tmp_path, appendonly=False) as server:
        _, count = asyncio.run(ping_and_count(server.url))

    assert count == 5


def test_valkey_writes_log_in_data_dir(tmp_path: Path) -> None:
    with ValkeyServer(tmp_path):
        pass

    assert (tmp_path / "valkey.log").stat().st_size > 0


def test_valkey_start_twice_fails(tmp_path: Path) -> None:
    with ValkeyServer(tmp_path) as server:
        with pytest.raises(RuntimeError, match="already running"):
            server.start(tmp_path)


def test_valkey_needs_data_dir() -> None:
    with pytest.raises(ValueError, match="data_dir is required"):
        ValkeyServer().start()


def test_valkey_url_before_start_fails() -> None:
    with pytest.raises(RuntimeError, match="not running"):
        _ = ValkeyServer().url


def test_valkey_stop_when_stopped_is_noop(tmp_path: Path) -> None:
    server = ValkeyServer(tmp_path)

    server.stop()

    assert server.running is False


def test_valkey_corrupt_append_only_file_fails(tmp_path: Path) -> None:
    with ValkeyServer(tmp_path) as server:
        asyncio.run(ping_and_count(server.url))
    manifest = next((tmp_path / "appendonlydir").glob("*.manifest"))
    manifest.write_text("not a manifest\n")

    with pytest.raises(ValkeyStartError, match="Invalid AOF manifest"):
        ValkeyServer(tmp_path).start()


def test_valkey_retries_when_port_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        # The first port handed to valkey-server is the taken one, as when
        # another process binds it between the probe and the server's start.
        ports = iter([taken_port])
        real_free_port = valkey._free_port
        monkeypatch.setattr(valkey, "_free_port", lambda: next(ports, None) or real_free_port())

        with ValkeyServer(tmp_path) as server:
            pong, _ = asyncio.run(ping_and_count(server.url))

    assert server.running is False
    assert pong is True
    assert "Address already in use" in (tmp_path / "valkey.log").read_text()
