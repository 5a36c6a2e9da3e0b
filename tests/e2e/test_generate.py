"""Generation through the whole stack: admission, scheduler and worker as separate processes."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tenantserve.v1 import common_pb2

from .support import FINISHED_REASONS, chat_request, generate, inference_stub, scrape_metrics

CAPITAL_QUESTION = "What is the capital of France?"


def num_multi_sequence_steps(worker_metrics_port: int) -> float:
    """Return how many worker steps processed more than one sequence."""
    samples = scrape_metrics(worker_metrics_port)
    num_steps = samples[("tenantserve_worker_gpu_step_sequences_count", ())]
    num_single = samples[("tenantserve_worker_gpu_step_sequences_bucket", (("le", "1.0"),))]
    return num_steps - num_single


def test_greedy_capital_answer(stack: Any) -> None:
    channel, stub = inference_stub(stack, "alpha")
    with channel:
        completion = generate(stub, chat_request(CAPITAL_QUESTION, max_tokens=24, client_request_id="capital-1"))

    assert "Paris" in completion.text
    assert completion.result.finish_reason in FINISHED_REASONS
    assert completion.result.client_request_id == "capital-1"
    assert re.fullmatch(r"[0-9a-f]{32}", completion.result.request_id)
    assert completion.result.usage.completion_tokens == len(completion.token_ids)
    assert completion.result.usage.prompt_tokens > 0


def test_concurrent_streams_share_batch(stack: Any) -> None:
    worker_metrics_port = stack.config.worker_gpu.metrics_port
    steps_before = num_multi_sequence_steps(worker_metrics_port)
    tenants = ["alpha", "beta", "gamma"] * 3
    questions = [f"Name {count} fruits." for count in range(2, 10)]

    def run_one(tenant_id: str, question: str) -> Any:
        channel, stub = inference_stub(stack, tenant_id)
        with channel:
            return generate(stub, chat_request(question, max_tokens=12))

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(run_one, tenant, question) for tenant, question in zip(tenants, questions)]
        completions = [future.result() for future in futures]

    assert len(completions) == 8
    for completion in completions:
        assert completion.result.finish_reason in FINISHED_REASONS
        assert completion.result.usage.completion_tokens >= 1
    assert num_multi_sequence_steps(worker_metrics_port) > steps_before


def test_same_seed_same_output(stack: Any) -> None:
    request = chat_request("Write a short poem about the sea.", max_tokens=24, temperature=1.0, seed=1234)
    channel, stub = inference_stub(stack, "beta")
    with channel:
        first = generate(stub, request)
        second = generate(stub, request)

    assert first.token_ids == second.token_ids
    assert first.text == second.text
    assert len(first.token_ids) >= 1


def test_stop_strings_never_leak(stack: Any) -> None:
    channel, stub = inference_stub(stack, "gamma")
    with channel:
        baseline = generate(stub, chat_request(CAPITAL_QUESTION, max_tokens=24))
        at_word = generate(stub, chat_request(CAPITAL_QUESTION, max_tokens=24, stop=["Paris"]))
        # "ari" ends inside the token that carries "Paris".
        inside_token = generate(stub, chat_request(CAPITAL_QUESTION, max_tokens=24, stop=["ari", "never-produced"]))

    assert "Paris" in baseline.text
    assert at_word.text == baseline.text[: baseline.text.index("Paris")]
    assert at_word.result.finish_reason == common_pb2.FINISH_REASON_STOP_STRING
    assert inside_token.text == baseline.text[: baseline.text.index("ari")]
    assert inside_token.result.finish_reason == common_pb2.FINISH_REASON_STOP_STRING


def test_admission_metrics_count_request(stack: Any) -> None:
    port = stack.config.admission.metrics_port
    labels = (("tenant_id", "gamma"),)
    ok_labels = (("outcome", "ok"), ("tenant_id", "gamma"))
    before = scrape_metrics(port)
    channel, stub = inference_stub(stack, "gamma")
    with channel:
        generate(stub, chat_request(max_tokens=4))
    after = scrape_metrics(port)

    def increase(name: str, sample_labels: tuple[tuple[str, str], ...]) -> float:
        return after[(name, sample_labels)] - before.get((name, sample_labels), 0.0)

    assert increase("tenantserve_admission_requests_total", ok_labels) == 1
    assert increase("tenantserve_admission_request_latency_seconds_count", labels) == 1
    assert increase("tenantserve_admission_time_to_first_token_seconds_count", labels) == 1
    assert after[("tenantserve_admission_active_streams", labels)] == 0


def test_logs_omit_prompt_and_completion(stack: Any) -> None:
    marker = "zanzibar-canary-5521"
    channel, stub = inference_stub(stack, "beta")
    with channel:
        completion = generate(stub, chat_request(f"Repeat this word exactly: {marker}", max_tokens=16))
    logs = {section: (stack.log_dir / f"{section}.log").read_text() for section in ("admission", "scheduler", "worker_gpu")}

    # The request's own log line proves that the log was written.
    assert completion.result.request_id in logs["admission"]
    for section, text in logs.items():
        assert marker not in text, section
