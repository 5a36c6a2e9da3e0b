"""Build, start and stop the admission service."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis.asyncio

from services.common.config import Config, ConfigError
from services.common.grpc_server import RunningServer, start_server
from services.common.metrics import start_metrics_server
from services.common.service_main import wait_for_stop_signal
from services.common.tls import MAX_CONNECTION_AGE_OPTIONS, secure_channel, service_channel_credentials
from services.common.valkey import connect_redis
from tenantserve.v1 import admin_pb2_grpc, inference_pb2, inference_pb2_grpc, scheduler_pb2_grpc

from .admin_servicer import ADMIN_SERVICE, AdminOnlyInterceptor, AdminServicer
from .audit import AuditLog
from .cache_client import CacheClient
from .limits import TenantLimiter
from .policy import InvalidUtf8Interceptor, PromptPolicy
from .revocation import RevocationInterceptor, RevocationList
from .servicer import InferenceServicer
from .tenant_limits import seed_tenants
from .tokenization import PromptTokenizer

logger = logging.getLogger(__name__)

SERVICE_NAME = "admission"
SCHEDULER_SERVICE_NAME = "scheduler"
CACHE_SERVICE_NAME = "cache"
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
REDIS_CONNECT_TIMEOUT_SECONDS = 10.0
STOP_GRACE_SECONDS = 5.0


@dataclass
class AdmissionServer:
    """A running admission service and the connections it owns."""

    running: RunningServer
    redis: redis.asyncio.Redis
    scheduler_channel: grpc.aio.Channel
    cache_channel: grpc.aio.Channel | None = None
    audit_log: AuditLog | None = None

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float | None = STOP_GRACE_SECONDS) -> None:
        """Stop accepting calls, let open streams run for ``grace`` seconds, then close the connections."""
        await self.running.stop(grace)
        await self.scheduler_channel.close()
        if self.cache_channel is not None:
            await self.cache_channel.close()
        await self.redis.aclose()
        if self.audit_log is not None:
            self.audit_log.close()


async def start_admission(
    config: Config,
    *,
    listen: str | None = None,
    tokenizer: PromptTokenizer | None = None,
    lease_ttl_seconds: float | None = None,
) -> AdmissionServer:
    """Start the admission gRPC server in this event loop.

    ``listen`` replaces ``config.admission.listen`` (tests pass
    127.0.0.1:0); ``tokenizer`` skips loading the models' tokenizers again;
    ``lease_ttl_seconds`` replaces ``config.admission.lease_ttl_seconds``.
    Stores the limits of each config tenant that has none in Redis yet.
    Raises ConfigError when ``config.redis_url`` is empty or Redis cannot be
    reached, and RuntimeError when the address cannot be bound.
    """
    policy = PromptPolicy.from_config(config)
    client = await connect_redis(config.redis_url, "admission keeps tenant limits and usage", REDIS_CONNECT_TIMEOUT_SECONDS)
    seeded = await seed_tenants(client, config.tenants)
    if seeded:
        logger.info("stored the config file's limits of tenants %s in Redis", ", ".join(seeded))
    revocations = RevocationList(client, config.admission.revocation_cache_seconds)
    await revocations.load()
    if tokenizer is None:
        tokenizer = await asyncio.to_thread(PromptTokenizer.load, config)
    channel = secure_channel(
        config.scheduler.target,
        service_channel_credentials(config.tls.cert_dir, SERVICE_NAME),
        server_name=SCHEDULER_SERVICE_NAME,
    )
    cache_channel = secure_channel(
        config.cache.target,
        service_channel_credentials(config.tls.cert_dir, SERVICE_NAME),
        server_name=CACHE_SERVICE_NAME,
    )
    audit_log = AuditLog(
        audit_log_path(config), config.admission.audit_log_max_bytes, config.admission.audit_log_backup_count
    )
    servicer = InferenceServicer(
        config,
        tokenizer,
        TenantLimiter(client, lease_ttl_seconds or config.admission.lease_ttl_seconds),
        scheduler_pb2_grpc.SchedulerStub(channel),
        cache=CacheClient(cache_channel),
        policy=policy,
        audit_log=audit_log,
    )

    admin_servicer = AdminServicer(client, config.tls.cert_dir, revocations)

    def register(server: grpc.aio.Server) -> list[str]:
        inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
        admin_pb2_grpc.add_AdminServicer_to_server(admin_servicer, server)
        return [INFERENCE_SERVICE, ADMIN_SERVICE]

    try:
        # Admission checks the peer kind itself (tenants for Inference,
        # admins for Admin), so every verified certificate that is not
        # revoked may reach the servicers.
        running = await start_server(
            SERVICE_NAME,
            listen or config.admission.listen,
            config.tls.cert_dir,
            register,
            allowed_peer=None,
            interceptors=[RevocationInterceptor(revocations), AdminOnlyInterceptor(), InvalidUtf8Interceptor()],
            extra_options=MAX_CONNECTION_AGE_OPTIONS,
        )
    except BaseException:
        await channel.close()
        await cache_channel.close()
        await client.aclose()
        audit_log.close()
        raise
    return AdmissionServer(
        running=running, redis=client, scheduler_channel=channel, cache_channel=cache_channel, audit_log=audit_log
    )


def audit_log_path(config: Config) -> Path:
    """Return the configured audit log path, or <state_dir>/logs/audit.jsonl."""
    if config.admission.audit_log_path:
        return Path(config.admission.audit_log_path)
    return config.state_dir / "logs" / "audit.jsonl"



async def serve(config: Config) -> None:
    """Run the admission service until SIGTERM or SIGINT, then stop it gracefully."""
    server = await start_admission(config)
    metrics_port = start_metrics_server(config.admission.metrics_port, config.admission.metrics_host)
    logger.info(
        "listening on %s (port %d), scheduler at %s, metrics port %d",
        config.admission.listen,
        server.port,
        config.scheduler.target,
        metrics_port,
    )

    await wait_for_stop_signal()

    logger.info("stopping")
    await server.stop()
    logger.info("stopped")
