"""Prometheus metrics of the PyTorch worker, registered in the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.engine import FinishReason, InferenceEngine, Request, StepStats

# Bucket bounds in seconds, from one fast decode step to a long completion
# on a loaded CPU.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Sequences in one step, up to the largest max_batch_size we expect.
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)

REQUESTS = Counter(
    "tenantserve_worker_gpu_requests",
    "Finished Generate calls by tenant and outcome (a finish reason or a gRPC status code name).",
    ["tenant_id", "outcome"],
)
TIME_TO_FIRST_TOKEN_SECONDS = Histogram(
    "tenantserve_worker_gpu_time_to_first_token_seconds",
    "Time from the Generate call to its first streamed delta.",
    ["tenant_id"],
    buckets=LATENCY_BUCKETS,
)
REQUEST_LATENCY_SECONDS = Histogram(
    "tenantserve_worker_gpu_request_latency_seconds",
    "Time from the Generate call to its result.",
    ["tenant_id"],
    buckets=LATENCY_BUCKETS,
)
COMPLETION_TOKENS = Counter(
    "tenantserve_worker_gpu_completion_tokens",
    "Tokens generated, by tenant.",
    ["tenant_id"],
)
RUNNING_REQUESTS = Gauge(
    "tenantserve_worker_gpu_running_requests",
    "Requests in the running batch.",
)
WAITING_REQUESTS = Gauge(
    "tenantserve_worker_gpu_waiting_requests",
    "Requests accepted but not yet in the batch.",
)
FREE_KV_BLOCKS = Gauge(
    "tenantserve_worker_gpu_free_kv_blocks",
    "KV cache blocks not reserved by any request.",
)
STEP_SEQUENCES = Histogram(
    "tenantserve_worker_gpu_step_sequences",
    "Sequences that one model step processed (prefills plus decodes).",
    buckets=BATCH_SIZE_BUCKETS,
)
STEP_DURATION_SECONDS = Histogram(
    "tenantserve_worker_gpu_step_duration_seconds",
    "Wall time of one model step, sampling included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
PROMPT_TOKENS = Counter(
    "tenantserve_worker_gpu_prompt_tokens",
    "Prompt tokens by source: prefilled by the model, or cached (keys and values shared from the prefix cache).",
    ["source"],
)
ABORTED_REQUESTS = Counter(
    "tenantserve_worker_gpu_aborted_requests",
    "Requests aborted before they finished, because the caller cancelled or the deadline passed.",
    ["tenant_id"],
)


class EngineMetrics:
    """EngineObserver that feeds the engine's step and request events into the metrics above."""

    def on_step(self, stats: StepStats) -> None:
        STEP_SEQUENCES.observe(stats.num_prefills + stats.num_decodes)
        STEP_DURATION_SECONDS.observe(stats.duration_seconds)
        PROMPT_TOKENS.labels("prefilled").inc(stats.num_prefill_tokens)
        PROMPT_TOKENS.labels("cached").inc(stats.num_cached_prompt_tokens)

    def on_request_finished(self, request: Request) -> None:
        COMPLETION_TOKENS.labels(request.tenant_id).inc(len(request.output_token_ids))
        if request.finish_reason is FinishReason.CANCELLED:
            ABORTED_REQUESTS.labels(request.tenant_id).inc()


def bind_engine_gauges(engine: InferenceEngine) -> None:
    """Read the gauges from ``engine`` at each scrape; the last engine bound wins."""
    RUNNING_REQUESTS.set_function(lambda: engine.stats().num_running)
    WAITING_REQUESTS.set_function(lambda: engine.stats().num_waiting)
    FREE_KV_BLOCKS.set_function(lambda: engine.stats().num_free_kv_blocks)
