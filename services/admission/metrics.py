"""Prometheus metrics of the admission service.

The tenant label takes only configured tenant names; a caller without a
configured tenant is counted under ``unknown`` so that certificates cannot
create new label values.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

UNKNOWN_TENANT = "unknown"

# Seconds; streams of up to max_completion_tokens tokens can take minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter(
    "tenantserve_admission_requests",
    "Generate requests by tenant and outcome (the gRPC status code name, lowercase).",
    ["tenant_id", "outcome"],
)
REQUEST_LATENCY = Histogram(
    "tenantserve_admission_request_latency_seconds",
    "Seconds from the arrival of an admitted Generate request to the end of its stream.",
    ["tenant_id"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "tenantserve_admission_time_to_first_token_seconds",
    "Seconds from the arrival of a Generate request to its first text delta.",
    ["tenant_id"],
    buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
)
ACTIVE_STREAMS = Gauge(
    "tenantserve_admission_active_streams",
    "Generate streams open in this admission process.",
    ["tenant_id"],
)
QUOTA_DECISIONS = Counter(
    "tenantserve_admission_quota_decisions",
    "Admission decisions by tenant, outcome (admitted or the status code name, lowercase) and rejecting limit.",
    ["tenant_id", "outcome", "limit"],
)
SETTLEMENTS = Counter(
    "tenantserve_admission_settlements",
    "Settlements by outcome: settled, duplicate (already settled or reclaimed), or failed (Redis unreachable).",
    ["outcome"],
)
QUOTA_STORE_AVAILABLE = Gauge(
    "tenantserve_admission_quota_store_available",
    "1 while the last Redis call of this admission process succeeded, else 0.",
)
QUOTA_STORE_STATE_CHANGES = Counter(
    "tenantserve_admission_quota_store_state_changes",
    "Changes of the Redis state seen by this admission process, by the new state (available or unavailable).",
    ["state"],
)
LOCAL_ADMISSIONS = Counter(
    "tenantserve_admission_local_admissions",
    "Requests admitted under the local rate cap while Redis was unreachable.",
    ["tenant_id"],
)
