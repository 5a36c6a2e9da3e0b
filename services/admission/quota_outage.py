"""The admission policy for the time Redis, the quota store, cannot be reached.

The policy is configured per kind of limit in the admission config section
(``redis_failure_budgets``, ``redis_failure_concurrency``,
``redis_failure_rate``): ``closed`` rejects with UNAVAILABLE, ``open``
admits under a check kept in this process alone. A request is admitted
during an outage only when every kind that applies to it is open. Budgets
apply only to a tenant that has one in the config file.

Requests admitted locally reserve nothing in Redis. At the end of their
stream they are settled without a reservation, which records their usage
once, when Redis is back by then. Their local rate slots are never copied
into Redis, so nothing is counted twice.
"""

from __future__ import annotations

import collections
import enum
import logging
import time

from services.common.config import AdmissionConfig, TenantConfig
from services.common.errors import ResourceExhausted, Unavailable

from . import metrics

logger = logging.getLogger(__name__)

LOCAL_RATE_WINDOW_SECONDS = 60.0


class StoreState(enum.Enum):
    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"


class QuotaStoreHealth:
    """Track whether Redis calls succeed, and log and count each change of state once."""

    def __init__(self) -> None:
        self.state = StoreState.AVAILABLE
        metrics.QUOTA_STORE_AVAILABLE.set(1)

    def mark_available(self) -> None:
        if self.state is StoreState.AVAILABLE:
            return
        self.state = StoreState.AVAILABLE
        metrics.QUOTA_STORE_AVAILABLE.set(1)
        metrics.QUOTA_STORE_STATE_CHANGES.labels(StoreState.AVAILABLE.value).inc()
        logger.warning("the quota store is reachable again; admission decisions use Redis")

    def mark_unavailable(self, error: Exception) -> None:
        if self.state is StoreState.UNAVAILABLE:
            return
        self.state = StoreState.UNAVAILABLE
        metrics.QUOTA_STORE_AVAILABLE.set(0)
        metrics.QUOTA_STORE_STATE_CHANGES.labels(StoreState.UNAVAILABLE.value).inc()
        logger.warning("the quota store is unreachable (%s); applying the configured failure policy", error)


class LocalFallback:
    """Admit requests by this process's own counts while Redis is unreachable."""

    def __init__(self, config: AdmissionConfig) -> None:
        self._config = config
        # Admission times (time.monotonic()) per tenant within the last window.
        self._admitted: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._num_streams: dict[str, int] = collections.defaultdict(int)

    def admit(self, tenant: TenantConfig) -> None:
        """Count one locally admitted stream of ``tenant``; the caller calls ``release`` when it ends.

        Raises Unavailable when a limit that applies fails closed, and
        ResourceExhausted when the local rate cap or stream count is full.
        """
        closed = self._closed_limits(tenant)
        if closed:
            raise Unavailable(
                f"the quota store is unavailable and the {' and '.join(closed)} limits fail closed; retry the request"
            )
        max_requests = min(self._config.redis_failure_local_requests_per_minute, tenant.requests_per_minute)
        window = self._admitted[tenant.name]
        now = time.monotonic()
        while window and window[0] <= now - LOCAL_RATE_WINDOW_SECONDS:
            window.popleft()
        if len(window) >= max_requests:
            raise ResourceExhausted(
                f"the quota store is unavailable and tenant {tenant.name!r} reached the local limit of "
                f"{max_requests} requests per minute of this admission process; retry in "
                f"{window[0] + LOCAL_RATE_WINDOW_SECONDS - now:.1f} s"
            )
        if self._num_streams[tenant.name] >= tenant.max_concurrent_streams:
            raise ResourceExhausted(
                f"the quota store is unavailable and tenant {tenant.name!r} reached its limit "
                f"max_concurrent_streams={tenant.max_concurrent_streams} in this admission process"
            )
        window.append(now)
        self._num_streams[tenant.name] += 1
        metrics.LOCAL_ADMISSIONS.labels(tenant.name).inc()

    def release(self, tenant_id: str) -> None:
        self._num_streams[tenant_id] = max(self._num_streams[tenant_id] - 1, 0)

    def _closed_limits(self, tenant: TenantConfig) -> list[str]:
        closed = []
        if self._config.redis_failure_rate == "closed":
            closed.append("rate")
        if self._config.redis_failure_concurrency == "closed":
            closed.append("concurrency")
        has_budget = tenant.daily_token_budget > 0 or tenant.monthly_token_budget > 0
        if has_budget and self._config.redis_failure_budgets == "closed":
            closed.append("budget")
        return closed
