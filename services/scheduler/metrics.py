"""Prometheus metrics of the scheduler, registered in the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Bucket bounds in seconds, from a few milliseconds on an idle system to
# minutes under overload.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

QUEUE_DEPTH = Gauge(
    "tenantserve_scheduler_queue_depth",
    "Requests waiting in the scheduler queue for a worker.",
)
LIVE_WORKERS = Gauge(
    "tenantserve_scheduler_live_workers",
    "Workers registered with a heartbeat within the timeout.",
)
REQUESTS_IN_FLIGHT = Gauge(
    "tenantserve_scheduler_requests_in_flight",
    "Requests placed on a worker and not yet finished.",
)
REQUESTS = Counter(
    "tenantserve_scheduler_requests",
    "Finished Schedule calls by tenant and outcome; the outcome is the gRPC status code name.",
    ["tenant_id", "outcome"],
)
WORKER_FAILOVERS = Counter(
    "tenantserve_scheduler_worker_failovers",
    "Requests moved to another worker because their worker was lost before the first response.",
    ["tenant_id"],
)
QUEUE_WAIT_SECONDS = Histogram(
    "tenantserve_scheduler_queue_wait_seconds",
    "Time from a request's arrival to its first placement on a worker.",
    ["tenant_id"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN_SECONDS = Histogram(
    "tenantserve_scheduler_time_to_first_token_seconds",
    "Time from a request's arrival to the first response relayed from its worker.",
    ["tenant_id"],
    buckets=LATENCY_BUCKETS,
)
