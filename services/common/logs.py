"""Logging set-up for the service entry points: JSON lines or plain text on stderr."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonLinesFormatter(logging.Formatter):
    """Format each record as one JSON object.

    Keys: time (UTC, ISO 8601), level, service, logger, message, then every
    ``extra=`` field such as request_id and tenant_id, and ``exception``
    with the traceback when there is one.
    """

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self._service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self._service_name,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extra_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Format records as readable lines, with ``extra=`` fields as key=value pairs."""

    def __init__(self, service_name: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service_name} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{key}={value}" for key, value in _extra_fields(record).items())
        if not extras:
            return line
        first, newline, rest = line.partition("\n")
        return f"{first} {extras}{newline}{rest}"


def setup_logging(service_name: str, level: str = "INFO", json_lines: bool = True) -> None:
    """Send all log records at ``level`` and above to stderr, replacing existing root handlers."""
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"log level {level!r} is invalid; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLinesFormatter(service_name) if json_lines else TextFormatter(service_name))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(numeric_level)


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRIBUTES}
