"""Build, start and stop the scheduler service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc

from services.common.config import Config
from services.common.grpc_server import RunningServer, start_server
from services.common.metrics import start_metrics_server
from services.common.service_main import wait_for_stop_signal
from services.common.tls import secure_channel, service_channel_credentials
from tenantserve.v1 import scheduler_pb2, scheduler_pb2_grpc

from .dispatcher import Dispatcher
from .queue import create_request_queue
from .servicer import SchedulerServicer
from .worker_registry import WorkerRegistry

logger = logging.getLogger(__name__)

SERVICE_NAME = "scheduler"
SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
STOP_GRACE_SECONDS = 5.0


@dataclass
class SchedulerServer:
    """A running scheduler service with its queue, worker registry and reaper task."""

    running: RunningServer
    dispatcher: Dispatcher
    registry: WorkerRegistry
    reaper: asyncio.Task[None]

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float | None = STOP_GRACE_SECONDS) -> None:
        """Stop accepting calls, let open streams run for ``grace`` seconds, then close the worker channels."""
        await self.running.stop(grace)
        self.reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reaper
        await self.registry.close()


async def start_scheduler(config: Config, *, listen: str | None = None) -> SchedulerServer:
    """Start the scheduler gRPC server and its heartbeat reaper in this event loop.

    ``listen`` replaces ``config.scheduler.listen`` (tests pass 127.0.0.1:0).
    Raises RuntimeError when the address cannot be bound.
    """
    credentials = service_channel_credentials(config.tls.cert_dir, SERVICE_NAME)

    def open_worker_channel(address: str, server_name: str) -> grpc.aio.Channel:
        # Workers may report an IP address that is missing from their
        # certificate. The certificate always carries the service name as a
        # DNS SAN, so the channel verifies that name.
        return secure_channel(address, credentials, server_name=server_name)

    registry = WorkerRegistry(config.scheduler.heartbeat_timeout_seconds, open_worker_channel)
    dispatcher = Dispatcher(create_request_queue(config.scheduler.max_queue_size), registry)
    servicer = SchedulerServicer(config, dispatcher, registry)

    def register(server: grpc.aio.Server) -> list[str]:
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
        return [SCHEDULER_SERVICE]

    running = await start_server(SERVICE_NAME, listen or config.scheduler.listen, config.tls.cert_dir, register)
    reaper = asyncio.get_running_loop().create_task(registry.run_reaper(), name="scheduler-heartbeat-reaper")
    return SchedulerServer(running=running, dispatcher=dispatcher, registry=registry, reaper=reaper)


async def serve(config: Config) -> None:
    """Run the scheduler until SIGTERM or SIGINT, then stop it gracefully."""
    metrics_port = start_metrics_server(config.scheduler.metrics_port, config.scheduler.metrics_host)
    server = await start_scheduler(config)
    logger.info(
        "listening on %s (port %d), max_queue_size %d, heartbeat_timeout_seconds %g, metrics port %d",
        config.scheduler.listen,
        server.port,
        config.scheduler.max_queue_size,
        config.scheduler.heartbeat_timeout_seconds,
        metrics_port,
    )

    await wait_for_stop_signal()

    logger.info("stopping")
    await server.stop()
    logger.info("stopped")
