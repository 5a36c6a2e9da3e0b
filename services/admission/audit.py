"""The audit log: one JSON line per admission decision and one per settlement.

Records never contain prompt or completion text, only counts. Every record
has these keys; a key that does not apply to the record is null:

- ``time``: UTC, ISO 8601 with microseconds.
- ``event``: ``decision`` or ``settlement``.
- ``request_id``: admission's id of the request. A request rejected before
  admission got an id has the id generated for its audit record.
- ``tenant_id``, ``model``, ``service_class`` (``interactive``, ``batch``,
  ``background``).
- ``outcome``: for a decision ``admitted`` or ``rejected``; for a
  settlement ``finished``, ``cancelled``, ``deadline_exceeded`` or ``failed``.
- ``reason``: the gRPC status code name of a rejection or failure, for
  example ``RESOURCE_EXHAUSTED``, else null.
- ``detail``: the status message sent to the caller, which names the field
  or limit and never quotes the prompt.
- ``prompt_tokens``, ``completion_tokens``: token counts.
- ``latency_seconds``: for a decision, from the call's arrival to the
  decision; for a settlement, from the arrival to the end of the stream.
- ``labels``: labels that prompt policy hooks attached (decisions only).

The file is rotated by size with ``logging.handlers.RotatingFileHandler``:
``audit_log_path`` becomes ``audit_log_path.1`` when the next record would
pass ``audit_log_max_bytes``, and ``audit_log_backup_count`` old files are
kept. An empty ``audit_log_path`` turns the audit log off.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import queue
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)

DECISION = "decision"
SETTLEMENT = "settlement"


class AuditLog:
    """Write audit records to a size-rotated JSON-lines file.

    The event loop only puts each record on a queue. A background thread
    (logging.handlers.QueueListener) writes and flushes them, so a slow
    disk never delays a request. Records still queued when the process is
    killed are lost; ``close`` writes every queued record first.
    """

    def __init__(self, path: Path | None, max_bytes: int, backup_count: int) -> None:
        # A Logger made directly is not registered globally, so two admission
        # servers in one process (as in tests) keep separate files.
        self._logger = logging.Logger("tenantserve.audit", logging.INFO)
        self._handler: logging.Handler | None = None
        self._listener: logging.handlers.QueueListener | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
            )
            file_handler.setFormatter(logging.Formatter("%(message)s"))
            records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
            self._listener = logging.handlers.QueueListener(records, file_handler)
            self._listener.start()
            self._handler = logging.handlers.QueueHandler(records)
            self._logger.addHandler(self._handler)
            logger.info("audit log at %s, rotated at %d bytes, %d old files kept", path, max_bytes, backup_count)

    def record_decision(
        self,
        *,
        request_id: str,
        tenant_id: str | None,
        model: str | None,
        service_class: str | None,
        admitted: bool,
        reason: str | None = None,
        detail: str | None = None,
        prompt_tokens: int | None = None,
        latency_seconds: float,
        labels: dict[str, str] | None = None,
    ) -> None:
        """Write the record of one admission decision, admitted or rejected."""
        self._write(
            event=DECISION,
            request_id=request_id,
            tenant_id=tenant_id,
            model=model,
            service_class=service_class,
            outcome="admitted" if admitted else "rejected",
            reason=reason,
            detail=detail,
            prompt_tokens=prompt_tokens,
            completion_tokens=None,
            latency_seconds=latency_seconds,
            labels=labels or {},
        )

    def record_settlement(
        self,
        *,
        request_id: str,
        tenant_id: str,
        model: str,
        service_class: str,
        outcome: str,
        reason: str | None = None,
        prompt_tokens: int,
        completion_tokens: int,
        latency_seconds: float,
    ) -> None:
        """Write the record of one settled request; ``outcome`` is finished, cancelled, deadline_exceeded or failed."""
        self._write(
            event=SETTLEMENT,
            request_id=request_id,
            tenant_id=tenant_id,
            model=model,
            service_class=service_class,
            outcome=outcome,
            reason=reason,
            detail=None,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_seconds=latency_seconds,
            labels=None,
        )

    def close(self) -> None:
        """Write the queued records, then close the file; later records are dropped."""
        if self._handler is None or self._listener is None:
            return
        self._logger.removeHandler(self._handler)
        self._handler = None
        self._listener.stop()
        for handler in self._listener.handlers:
            handler.close()
        self._listener = None

    def _write(self, **fields: Any) -> None:
        if self._handler is None:
            return
        record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"), **fields}
        if record["latency_seconds"] is not None:
            record["latency_seconds"] = round(record["latency_seconds"], 6)
        # The listener thread reports a failed write on stderr (logging.Handler.handleError).
        self._logger.info(json.dumps(record, separators=(",", ":")))


class RequestAudit:
    """The audit records of one Generate call: one decision, then one settlement if admitted.

    A rejection after admission (a scheduler failure, say) is the
    settlement's outcome, not a second decision.
    """

    def __init__(self, audit_log: AuditLog, model: str, service_class: str, arrival_time: float) -> None:
        self._audit_log = audit_log
        # time.perf_counter() when the call arrived.
        self._arrival_time = arrival_time
        self.request_id = ""
        self.tenant_id: str | None = None
        self.model = model
        self.service_class = service_class
        self.prompt_tokens: int | None = None
        self.admitted = False

    def admit(self, request_id: str, tenant_id: str, prompt_tokens: int, labels: dict[str, str]) -> None:
        """Record the admission of the request."""
        self.request_id = request_id
        self.tenant_id = tenant_id
        self.prompt_tokens = prompt_tokens
        self.admitted = True
        self._audit_log.record_decision(
            request_id=request_id,
            tenant_id=tenant_id,
            model=self.model,
            service_class=self.service_class,
            admitted=True,
            prompt_tokens=prompt_tokens,
            latency_seconds=time.perf_counter() - self._arrival_time,
            labels=labels,
        )

    def reject(self, code: grpc.StatusCode, message: str) -> None:
        """Record a rejection before admission; does nothing once the request was admitted."""
        if self.admitted:
            return
        self._audit_log.record_decision(
            request_id=self.request_id or uuid.uuid4().hex,
            tenant_id=self.tenant_id,
            model=self.model,
            service_class=self.service_class,
            admitted=False,
            reason=code.name,
            detail=message,
            prompt_tokens=self.prompt_tokens,
            latency_seconds=time.perf_counter() - self._arrival_time,
        )

    def settle(self, outcome: str, reason: str | None, completion_tokens: int) -> None:
        """Record the end of an admitted request's stream."""
        assert self.admitted and self.tenant_id is not None, "settle() needs an admitted request"
        self._audit_log.record_settlement(
            request_id=self.request_id,
            tenant_id=self.tenant_id,
            model=self.model,
            service_class=self.service_class,
            outcome=outcome,
            reason=reason,
            prompt_tokens=self.prompt_tokens or 0,
            completion_tokens=completion_tokens,
            latency_seconds=time.perf_counter() - self._arrival_time,
        )
