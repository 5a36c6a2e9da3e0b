"""Build, start and stop the PyTorch worker service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass

import grpc

from services.common.config import Config
from services.common.engine import InferenceEngine
from services.common.grpc_server import RunningServer, start_server
from services.common.identity import PeerKind
from services.common.metrics import start_metrics_server
from services.common.service_main import wait_for_stop_signal
from services.common.tls import service_channel_credentials
from services.worker_gpu import metrics
from services.worker_gpu.factory import LoadedModel, build_engine, load_model_async
from services.worker_gpu.registration import SchedulerRegistration
from services.worker_gpu.servicer import WorkerServicer
from tenantserve.v1 import scheduler_pb2, worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = "worker-gpu"
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
STOP_GRACE_SECONDS = 5.0


@dataclass
class WorkerServer:
    """A running worker: gRPC server, engine thread and scheduler registration."""

    running: RunningServer
    engine: InferenceEngine
    registration: SchedulerRegistration | None
    registration_task: asyncio.Task[None] | None
    worker_id: str
    # host:port the worker reports to the scheduler.
    address: str

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float | None = STOP_GRACE_SECONDS) -> None:
        """Leave the scheduler, let open streams run for ``grace`` seconds, then stop the engine."""
        if self.registration_task is not None:
            self.registration_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.registration_task
        await self.running.stop(grace)
        await asyncio.to_thread(self.engine.stop)


async def start_worker(
    config: Config,
    *,
    listen: str | None = None,
    loaded: LoadedModel | None = None,
    register_with_scheduler: bool = True,
) -> WorkerServer:
    """Start the worker in this event loop: engine thread, gRPC server, registration.

    ``listen`` replaces ``config.worker_gpu.listen`` (tests pass 127.0.0.1:0).
    ``loaded`` reuses a model that is already in memory; otherwise the
    configured model is loaded, which takes seconds. Raises ConfigError for
    an unusable device or dtype and RuntimeError when the address cannot
    be bound.
    """
    if loaded is None:
        loaded = await load_model_async(config)
    engine = build_engine(config, loaded, metrics.EngineMetrics())
    engine.start()
    metrics.bind_engine_gauges(engine)
    identity = _WorkerIdentity(loaded, engine)
    servicer = WorkerServicer(engine, loaded.name, identity.build_report)

    def register(server: grpc.aio.Server) -> list[str]:
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        return [WORKER_SERVICE]

    listen = listen or config.worker_gpu.listen
    try:
        running = await start_server(
            SERVICE_NAME, listen, config.tls.cert_dir, register, allowed_peer=PeerKind.SERVICE
        )
    except BaseException:
        engine.stop()
        raise
    identity.address = config.worker_gpu.address or _with_port(listen, running.port)

    registration, task = None, None
    if register_with_scheduler:
        credentials = service_channel_credentials(config.tls.cert_dir, SERVICE_NAME)
        registration = SchedulerRegistration(config.scheduler.target, credentials, identity.build_report)
        task = asyncio.get_running_loop().create_task(registration.run(), name="worker-registration")
    return WorkerServer(running, engine, registration, task, identity.worker_id, identity.address)


async def serve(config: Config) -> None:
    """Run the worker until SIGTERM or SIGINT, then stop it gracefully."""
    metrics_port = start_metrics_server(config.worker_gpu.metrics_port, config.worker_gpu.metrics_host)
    server = await start_worker(config)
    logger.info(
        "listening on %s (port %d), reporting address %s, max_batch_size %d, %d KV blocks of %d tokens, metrics port %d",
        config.worker_gpu.listen,
        server.port,
        server.address,
        config.worker_gpu.max_batch_size,
        config.worker_gpu.num_kv_blocks,
        config.worker_gpu.kv_block_size,
        metrics_port,
    )

    await wait_for_stop_signal()

    logger.info("stopping")
    await server.stop()
    logger.info("stopped")


class _WorkerIdentity:
    def __init__(self, loaded: LoadedModel, engine: InferenceEngine) -> None:
        self._loaded = loaded
        self._engine = engine
        self.worker_id = f"{SERVICE_NAME}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.address = ""
        device = loaded.model.device.type
        self.accelerator = (
            scheduler_pb2.ACCELERATOR_KIND_CUDA if device == "cuda" else scheduler_pb2.ACCELERATOR_KIND_CPU
        )

    def build_report(self) -> scheduler_pb2.WorkerReport:
        stats = self._engine.stats()
        return scheduler_pb2.WorkerReport(
            worker_id=self.worker_id,
            address=self.address,
            models=[self._loaded.name],
            accelerator=self.accelerator,
            max_batch_size=stats.max_batch_size,
            num_free_kv_blocks=stats.num_free_kv_blocks,
            num_total_kv_blocks=stats.num_total_kv_blocks,
            kv_block_size=stats.kv_block_size,
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
        )


def _with_port(listen: str, port: int) -> str:
    """Replace the port of ``listen`` with the bound one; a wildcard host becomes the host name."""
    host = listen.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]"):
        host = socket.gethostname()
    return f"{host}:{port}"
