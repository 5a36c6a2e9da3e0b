"""Convert a tenant's UsageReport to the GetUsage response."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from tenantserve.v1 import inference_pb2

from .limits import Limit, UsageReport


def usage_response(tenant_id: str, report: UsageReport) -> inference_pb2.GetUsageResponse:
    response = inference_pb2.GetUsageResponse(
        tenant_id=tenant_id,
        num_requests=report.num_requests,
        prompt_tokens=report.prompt_tokens,
        completion_tokens=report.completion_tokens,
        num_active_streams=report.limit(Limit.MAX_CONCURRENT_STREAMS).used,
        num_reclaimed_requests=report.num_reclaimed_requests,
        reclaimed_tokens=report.reclaimed_tokens,
        limits_version=report.version,
    )
    for usage in report.limits:
        limit_usage = response.limits.add(
            name=usage.limit.value, limit=usage.limit_value, used=usage.used, remaining=usage.remaining
        )
        if usage.reset_time > 0:
            limit_usage.reset_time.CopyFrom(_timestamp(usage.reset_time))
    return response


def _timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromNanoseconds(int(unix_seconds * 1e9))
    return timestamp
