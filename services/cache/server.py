"""Build, start and stop the cache service."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
import redis.asyncio
import torch

from services.common.config import Config, ConfigError
from services.common.grpc_server import RunningServer, start_server
from services.common.identity import PeerKind
from services.common.metrics import start_metrics_server
from services.common.service_main import wait_for_stop_signal
from services.common.valkey import connect_redis
from tenantserve.v1 import cache_pb2, cache_pb2_grpc

from .batcher import DynamicBatcher
from .completions import CompletionCache
from .documents import DocumentStore
from .embedding_cache import EmbeddingCache
from .encoder import SentenceEncoder, select_device
from .lru_store import LruStore
from .model_files import resolve_model_dir
from .servicer import CacheServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = "cache"
CACHE_SERVICE = cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name
STOP_GRACE_SECONDS = 5.0
REDIS_CONNECT_TIMEOUT_SECONDS = 10.0


@dataclass
class CacheServer:
    """A running cache service and what it owns."""

    running: RunningServer
    redis: redis.asyncio.Redis
    batcher: DynamicBatcher

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float | None = STOP_GRACE_SECONDS) -> None:
        await self.running.stop(grace)
        await self.batcher.stop()
        await self.redis.aclose()


def load_encoder(config: Config) -> SentenceEncoder:
    """Load the configured embedding model. Raises FileNotFoundError when its files are missing."""
    cache = config.cache
    if cache.num_threads > 0:
        torch.set_num_threads(cache.num_threads)
    return SentenceEncoder(resolve_model_dir(cache.embedding_model), select_device(cache.device))


async def start_cache(config: Config, *, listen: str | None = None, encoder: SentenceEncoder | None = None) -> CacheServer:
    """Start the cache gRPC server in this event loop; only service certificates may call it.

    ``listen`` replaces ``config.cache.listen`` (tests pass 127.0.0.1:0);
    ``encoder`` skips loading the model again. Raises ConfigError when
    Redis cannot be reached and RuntimeError when the address cannot be bound.
    """
    client = await connect_redis(
        config.redis_url, "the cache service keeps embeddings, documents and completions", REDIS_CONNECT_TIMEOUT_SECONDS
    )
    if encoder is None:
        encoder = await asyncio.to_thread(load_encoder, config)
    cache = config.cache
    batcher = DynamicBatcher(encoder.encode, cache.max_batch_size, cache.batch_window_ms / 1000)
    batcher.start()
    store = LruStore(client)
    servicer = CacheServicer(
        config,
        EmbeddingCache(store, batcher, cache.embedding_model_name, encoder.dimension, cache.embedding_ttl_seconds),
        DocumentStore(client, encoder.dimension),
        CompletionCache(store, cache.completion_ttl_seconds),
        encoder.count_tokens,
        encoder.max_tokens,
    )

    def register(server: grpc.aio.Server) -> list[str]:
        cache_pb2_grpc.add_CacheServicer_to_server(servicer, server)
        return [CACHE_SERVICE]

    try:
        running = await start_server(SERVICE_NAME, listen or cache.listen, config.tls.cert_dir, register, allowed_peer=PeerKind.SERVICE)
    except BaseException:
        await batcher.stop()
        await client.aclose()
        raise
    return CacheServer(running=running, redis=client, batcher=batcher)


async def serve(config: Config) -> None:
    """Run the cache service until SIGTERM or SIGINT, then stop it gracefully."""
    server = await start_cache(config)
    metrics_port = start_metrics_server(config.cache.metrics_port, config.cache.metrics_host)
    logger.info(
        "listening on %s (port %d), model %s, batch window %.1f ms, max batch %d, metrics port %d",
        config.cache.listen,
        server.port,
        config.cache.embedding_model_name,
        config.cache.batch_window_ms,
        config.cache.max_batch_size,
        metrics_port,
    )

    await wait_for_stop_signal()

    logger.info("stopping")
    await server.stop()
    logger.info("stopped")

