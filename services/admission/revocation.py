"""Certificate revocation by SHA-256 fingerprint, checked on every RPC.

Revoked fingerprints live in one Redis set, ``REVOKED_KEY``, shared by every
admission replica. The check runs per RPC, not per connection, so a revoked
certificate is rejected on connections that are already open.

Each replica keeps a local copy of the set for at most
``max_age_seconds`` (``services.admission.revocation_cache_seconds``,
default 1 s). A revocation therefore applies at once on the replica that
served the Revoke RPC and within that bound on the others. A value of 0
disables the copy and reads Redis on every RPC.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import redis.asyncio
import redis.exceptions

from services.common.certs import certificate_fingerprint
from services.common.grpc_server import OPEN_SERVICE_PREFIXES, wrap_handler

logger = logging.getLogger(__name__)

# Not under a tenant hash tag: the set is read on its own, never inside a
# tenant's Lua script, so it may sit in any slot of a cluster.
REVOKED_KEY = "tenantserve:revoked_certificates"
FINGERPRINT_HEX_CHARS = 64
# A revoked client that keeps calling is logged at most once per interval.
REJECTION_LOG_INTERVAL_SECONDS = 60.0


class RevocationUnavailable(Exception):
    """The revoked set could not be read from Redis and no local copy exists."""


class RevocationList:
    """The revoked certificate fingerprints, read from Redis with a bounded local copy."""

    def __init__(self, client: redis.asyncio.Redis, max_age_seconds: float) -> None:
        self._client = client
        self._max_age_seconds = max_age_seconds
        self._fingerprints: frozenset[str] | None = None
        # time.monotonic() of the last successful read of the set.
        self._loaded_at = 0.0
        self._refresh_task: asyncio.Task[None] | None = None
        self._redis_failing = False

    async def load(self) -> None:
        """Read the set from Redis; raise RedisError when it cannot be read.

        Admission calls this at start-up, so a later Redis outage finds a
        copy to keep enforcing.
        """
        members = await self._client.smembers(REVOKED_KEY)
        self._fingerprints = frozenset(member.decode() for member in members)
        self._loaded_at = time.monotonic()

    async def revoke(self, fingerprint: str) -> bool:
        """Add ``fingerprint`` to the set; return False when it was already revoked.

        Raises redis.exceptions.RedisError when Redis cannot be reached.
        """
        added = await self._client.sadd(REVOKED_KEY, fingerprint)
        if self._fingerprints is not None:
            self._fingerprints = self._fingerprints | {fingerprint}
        return bool(added)

    async def list(self) -> list[str]:
        """Return every revoked fingerprint, sorted; raise RedisError when Redis cannot be reached."""
        return sorted(member.decode() for member in await self._client.smembers(REVOKED_KEY))

    async def is_revoked(self, fingerprint: str) -> bool:
        """Return whether ``fingerprint`` is revoked.

        When Redis fails, the last copy read stays in force, however old,
        and a warning is logged once per outage. Raises
        RevocationUnavailable when Redis fails and no copy was ever read,
        or on every failure when ``max_age_seconds`` is 0.
        """
        if self._max_age_seconds <= 0:
            return await self._ask_redis(fingerprint)
        if self._fingerprints is None or time.monotonic() - self._loaded_at > self._max_age_seconds:
            await self._refresh()
        if self._fingerprints is None:
            raise RevocationUnavailable("the revoked certificate list could not be read from Redis")
        return fingerprint in self._fingerprints

    async def _ask_redis(self, fingerprint: str) -> bool:
        try:
            revoked = bool(await self._client.sismember(REVOKED_KEY, fingerprint))
        except redis.exceptions.RedisError as exc:
            raise RevocationUnavailable(f"the revoked certificate list could not be read from Redis: {exc}") from exc
        return revoked

    async def _refresh(self) -> None:
        # One read at a time: concurrent RPCs wait for the same SMEMBERS.
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.create_task(self._read_set())
        await asyncio.shield(self._refresh_task)

    async def _read_set(self) -> None:
        try:
            members = await self._client.smembers(REVOKED_KEY)
        except redis.exceptions.RedisError as exc:
            if not self._redis_failing:
                logger.warning("reading the revoked certificate list failed: %s; using the last copy read", exc)
            self._redis_failing = True
            return
        if self._redis_failing:
            logger.info("reading the revoked certificate list works again")
        self._redis_failing = False
        self._fingerprints = frozenset(member.decode() for member in members)
        self._loaded_at = time.monotonic()


def normalize_fingerprint(text: str) -> str:
    """Return a SHA-256 fingerprint as 64 lowercase hex digits; accept colons and uppercase.

    Raises ValueError for anything else.
    """
    fingerprint = text.strip().replace(":", "").lower()
    if len(fingerprint) != FINGERPRINT_HEX_CHARS or any(c not in "0123456789abcdef" for c in fingerprint):
        raise ValueError(
            f"{text!r} is not a SHA-256 fingerprint; expected 64 hex digits, optionally separated by colons"
        )
    return fingerprint


@functools.lru_cache(maxsize=4096)
def _fingerprint_of_pem(pem: bytes) -> str:
    return certificate_fingerprint(pem)


def peer_fingerprint(context: grpc.aio.ServicerContext) -> str | None:
    """Return the fingerprint of the verified client certificate, or None when there is none."""
    pem_certificates = context.auth_context().get("x509_pem_cert") or []
    if len(pem_certificates) != 1:
        return None
    try:
        return _fingerprint_of_pem(pem_certificates[0])
    except ValueError:
        return None


class RevocationInterceptor(grpc.aio.ServerInterceptor):
    """Reject every RPC whose client certificate is revoked, except health checks and reflection.

    Status codes: UNAUTHENTICATED for a revoked certificate, UNAVAILABLE
    when the revoked list was never read and Redis cannot be reached.
    """

    def __init__(self, revocations: RevocationList) -> None:
        self._revocations = revocations
        # Fingerprint -> time.monotonic() of its last rejection log line.
        self._last_logged: dict[str, float] = {}
        self._num_unlogged: dict[str, int] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICE_PREFIXES):
            return handler
        return wrap_handler(handler, self._check)

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        fingerprint = peer_fingerprint(context)
        if fingerprint is None:
            # Without a certificate the servicers reject the call themselves.
            return
        try:
            revoked = await self._revocations.is_revoked(fingerprint)
        except RevocationUnavailable as exc:
            logger.error("revocation check failed for peer %s: %s", context.peer(), exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the revocation list is unavailable; retry the request")
        if revoked:
            self._log_rejection(fingerprint, context.peer())
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the client certificate (SHA-256 {fingerprint}) is revoked; ask an operator for a new one",
            )

    def _log_rejection(self, fingerprint: str, peer: str) -> None:
        now = time.monotonic()
        if now - self._last_logged.get(fingerprint, -REJECTION_LOG_INTERVAL_SECONDS) < REJECTION_LOG_INTERVAL_SECONDS:
            self._num_unlogged[fingerprint] = self._num_unlogged.get(fingerprint, 0) + 1
            return
        num_unlogged = self._num_unlogged.pop(fingerprint, 0)
        self._last_logged[fingerprint] = now
        logger.warning(
            "rejected revoked certificate %s from peer %s (%d more rejections since the last line)",
            fingerprint,
            peer,
            num_unlogged,
        )
