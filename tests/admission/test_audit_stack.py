"""The audit log of a whole stack: a finished request's settlement has the real token counts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.e2e.support import chat_request, generate, inference_stub

SECRET_WORD = "pomegranate"
# Generous bound for the admission process to append the settlement record,
# which it writes after the result reaches the client.
WAIT_SECONDS = 30.0


def read_request_records(audit_path: Path, request_id: str) -> tuple[str, list[dict[str, Any]]]:
    """Return the whole audit text and the request's records once its settlement is written."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        text = audit_path.read_text()
        records = [json.loads(line) for line in text.splitlines()]
        own = [record for record in records if record["request_id"] == request_id]
        if any(record["event"] == "settlement" for record in own) or time.monotonic() > deadline:
            return text, own
        time.sleep(0.1)


def test_finished_request_settlement_audited(stack: Any) -> None:
    channel, stub = inference_stub(stack, "gamma")
    with channel:
        completion = generate(stub, chat_request(f"Say the word {SECRET_WORD} once.", max_tokens=12))
    request_id = completion.result.request_id
    text, records = read_request_records(stack.config.state_dir / "logs" / "audit.jsonl", request_id)
    events = [record["event"] for record in records]

    assert events == ["decision", "settlement"]
    decision, settlement = records
    assert SECRET_WORD not in text
    assert decision["outcome"] == "admitted"
    assert decision["tenant_id"] == "gamma"
    assert decision["prompt_tokens"] == completion.result.usage.prompt_tokens
    assert settlement["outcome"] == "finished"
    assert settlement["reason"] is None
    assert settlement["completion_tokens"] == completion.result.usage.completion_tokens
    assert settlement["completion_tokens"] > 0
