"""The audit log: one JSON line per decision and per settlement, no text, rotated by size."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import grpc

from services.admission.audit import AuditLog
from services.common.config import Config

from .support import chat_request, collect_stream, make_cert_dir, make_config, running_admission, tenant_stub

RECORD_KEYS = {
    "time",
    "event",
    "request_id",
    "tenant_id",
    "model",
    "service_class",
    "outcome",
    "reason",
    "detail",
    "prompt_tokens",
    "completion_tokens",
    "latency_seconds",
    "labels",
}
SECRET_PROMPT = "The launch code is swordfish-4711"


def unique_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def audited_config(tmp_path: Path, valkey_url: str, tenant: str, **admission: Any) -> tuple[Path, Config, Path]:
    cert_dir = make_cert_dir(tmp_path, [tenant])
    audit_path = tmp_path / "audit" / "audit.jsonl"
    base = make_config(cert_dir, valkey_url, [{"name": tenant, "max_tokens": 16}])
    admission = {"audit_log_path": str(audit_path), **admission}
    return cert_dir, dataclasses.replace(base, admission=dataclasses.replace(base.admission, **admission)), audit_path


def test_audit_log_writes_decision_fields(tmp_path: Path) -> None:
    audit_log = AuditLog(tmp_path / "audit.jsonl", max_bytes=1_000_000, backup_count=2)

    audit_log.record_decision(
        request_id="r1",
        tenant_id="alpha",
        model="m",
        service_class="batch",
        admitted=False,
        reason="RESOURCE_EXHAUSTED",
        detail="requests_per_minute exhausted",
        prompt_tokens=12,
        latency_seconds=0.0012345678,
    )
    audit_log.record_settlement(
        request_id="r1",
        tenant_id="alpha",
        model="m",
        service_class="batch",
        outcome="finished",
        prompt_tokens=12,
        completion_tokens=7,
        latency_seconds=1.5,
    )
    audit_log.close()
    decision, settlement = read_records(tmp_path / "audit.jsonl")

    assert set(decision) == RECORD_KEYS
    assert set(settlement) == RECORD_KEYS
    assert decision["event"] == "decision"
    assert decision["outcome"] == "rejected"
    assert decision["reason"] == "RESOURCE_EXHAUSTED"
    assert decision["latency_seconds"] == 0.001235
    assert decision["time"].endswith("+00:00")
    assert settlement["event"] == "settlement"
    assert settlement["completion_tokens"] == 7


def test_audit_log_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit_log = AuditLog(path, max_bytes=2_000, backup_count=2)

    for index in range(100):
        audit_log.record_decision(
            request_id=f"request-{index}",
            tenant_id="alpha",
            model="m",
            service_class="interactive",
            admitted=True,
            prompt_tokens=index,
            latency_seconds=0.001,
        )
    audit_log.close()
    files = sorted(tmp_path.iterdir())

    assert [file.name for file in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for file in files:
        assert file.stat().st_size <= 2_000
        assert all(record["event"] == "decision" for record in read_records(file))
    assert read_records(path)[-1]["request_id"] == "request-99"


def test_server_audits_decisions_and_settlement(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir, config, audit_path = audited_config(tmp_path, valkey_url, tenant)

    async def main() -> list[grpc.StatusCode]:
        codes = []
        async with running_admission(config) as server:
            channel, stub = tenant_stub(cert_dir, tenant, server.port)
            async with channel:
                # Admitted, then failed at the closed scheduler port.
                _, error = await collect_stream(stub.Generate(chat_request(SECRET_PROMPT, max_tokens=8)))
                codes.append(error.code() if error else grpc.StatusCode.OK)
                # Rejected by the tenant's max_tokens of 16.
                _, error = await collect_stream(stub.Generate(chat_request(SECRET_PROMPT, max_tokens=32)))
                codes.append(error.code() if error else grpc.StatusCode.OK)
        return codes

    codes = asyncio.run(main())
    text = audit_path.read_text()
    admitted, settlement, rejected = read_records(audit_path)

    assert codes == [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT]
    assert "swordfish" not in text
    assert "launch code" not in text
    assert admitted["event"] == "decision"
    assert admitted["outcome"] == "admitted"
    assert admitted["tenant_id"] == tenant
    assert admitted["model"] == "smollm2-135m-instruct"
    assert admitted["service_class"] == "interactive"
    assert admitted["prompt_tokens"] > 0
    assert settlement["event"] == "settlement"
    assert settlement["request_id"] == admitted["request_id"]
    assert settlement["outcome"] == "failed"
    assert settlement["reason"] == "UNAVAILABLE"
    assert settlement["completion_tokens"] == 0
    assert settlement["prompt_tokens"] == admitted["prompt_tokens"]
    assert settlement["latency_seconds"] >= admitted["latency_seconds"]
    assert rejected["outcome"] == "rejected"
    assert rejected["reason"] == "INVALID_ARGUMENT"
    assert rejected["request_id"] != admitted["request_id"]
    assert rejected["tenant_id"] == tenant
