"""JSON-lines and text logging set up by setup_logging."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from services.common.logs import setup_logging


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def log_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_json_line_has_standard_keys(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("scheduler")

    logging.getLogger("services.scheduler.queue").info("queued %d requests", 3)

    lines = log_lines(capsys)
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "INFO"
    assert entry["service"] == "scheduler"
    assert entry["logger"] == "services.scheduler.queue"
    assert entry["message"] == "queued 3 requests"
    assert entry["time"].endswith("+00:00")


def test_json_line_includes_request_and_tenant(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("admission")

    logging.getLogger("test").warning("rejected", extra={"request_id": "req-1", "tenant_id": "alpha"})

    entry = json.loads(log_lines(capsys)[0])
    assert entry["request_id"] == "req-1"
    assert entry["tenant_id"] == "alpha"
    assert entry["level"] == "WARNING"


def test_json_line_includes_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("worker-gpu")

    try:
        raise ValueError("bad value")
    except ValueError:
        logging.getLogger("test").exception("step failed")

    lines = log_lines(capsys)
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "ERROR"
    assert "ValueError: bad value" in entry["exception"]


def test_json_line_serializes_other_values(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("worker-gpu")

    logging.getLogger("test").info("started", extra={"device": object(), "num_blocks": 16})

    entry = json.loads(log_lines(capsys)[0])
    assert entry["num_blocks"] == 16
    assert entry["device"].startswith("<object object")


def test_level_filters_records(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("scheduler", level="warning")

    logging.getLogger("test").info("hidden")
    logging.getLogger("test").warning("shown")

    lines = log_lines(capsys)
    assert len(lines) == 1
    assert json.loads(lines[0])["message"] == "shown"


def test_setup_twice_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("scheduler")
    setup_logging("scheduler")

    logging.getLogger("test").info("once")

    assert len(log_lines(capsys)) == 1


def test_text_format_appends_extra_fields(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("admission", json_lines=False)

    logging.getLogger("test").info("admitted", extra={"request_id": "req-2", "tenant_id": "beta"})

    lines = log_lines(capsys)
    assert len(lines) == 1
    assert " INFO admission test: admitted" in lines[0]
    assert lines[0].endswith("request_id=req-2 tenant_id=beta")


def test_invalid_level_fails() -> None:
    with pytest.raises(ValueError, match="log level 'LOUD' is invalid"):
        setup_logging("scheduler", level="LOUD")
