"""Factories for the cache tests: configs, the encoder, an in-process cache service and clients."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import torch
import yaml
from prometheus_client import REGISTRY

from services.cache.encoder import SentenceEncoder
from services.cache.server import CacheServer, load_encoder, start_cache
from services.common import certs, tls
from services.common.config import DEFAULT_CONFIG_PATH, Config, parse_config
from tenantserve.v1 import cache_pb2, cache_pb2_grpc, inference_pb2

TEST_HOSTS = ("localhost", "127.0.0.1")
# Bytes charged for one cached all-MiniLM-L6-v2 vector: 384 float32 values
# plus its key {tenant}:emb:all-minilm-l6-v2:<64 hex digits>.
VECTOR_BYTES = 384 * 4


def entry_bytes(tenant_id: str) -> int:
    return VECTOR_BYTES + len(f"{{{tenant_id}}}:emb:all-minilm-l6-v2:") + 64


def make_config(
    cert_dir: Path, redis_url: str, tenants: Sequence[dict[str, Any]], **cache_settings: Any
) -> Config:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["tls"]["cert_dir"] = str(cert_dir)
    raw["redis_url"] = redis_url
    raw["tenants"] = list(tenants)
    raw["services"]["cache"].update({"device": "cpu", **cache_settings})
    return parse_config(raw, environ={})


def make_cert_dir(tmp_path: Path) -> Path:
    cert_dir = tmp_path / "certs"
    certs.init_certs(cert_dir, TEST_HOSTS)
    return cert_dir


@functools.cache
def shared_encoder() -> SentenceEncoder:
    """Load the embedding model once per test session, on the CPU with at most 2 threads."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["services"]["cache"]["device"] = "cpu"
    return load_encoder(parse_config(raw, environ={}))


@contextlib.asynccontextmanager
async def running_cache(config: Config) -> AsyncIterator[CacheServer]:
    server = await start_cache(config, listen="127.0.0.1:0", encoder=shared_encoder())
    try:
        yield server
    finally:
        await server.stop(None)


def cache_stub(cert_dir: Path, port: int, service_name: str = "admission") -> tuple[grpc.aio.Channel, cache_pb2_grpc.CacheStub]:
    """Open a channel to the cache service with a service certificate; the caller closes it."""
    channel = tls.secure_channel(f"127.0.0.1:{port}", tls.service_channel_credentials(cert_dir, service_name))
    return channel, cache_pb2_grpc.CacheStub(channel)


def embed_request(tenant_id: str, texts: Sequence[str]) -> cache_pb2.CacheEmbedRequest:
    return cache_pb2.CacheEmbedRequest(tenant_id=tenant_id, request=inference_pb2.EmbedRequest(texts=list(texts)))


def upsert_request(tenant_id: str, documents: dict[str, str], metadata: dict[str, str] | None = None) -> cache_pb2.CacheUpsertDocumentsRequest:
    return cache_pb2.CacheUpsertDocumentsRequest(
        tenant_id=tenant_id,
        request=inference_pb2.UpsertDocumentsRequest(
            documents=[inference_pb2.Document(id=i, text=t, metadata=metadata or {}) for i, t in documents.items()]
        ),
    )


def search_request(tenant_id: str, query: str, k: int = 3, filters: dict[str, str] | None = None) -> cache_pb2.CacheSearchRequest:
    return cache_pb2.CacheSearchRequest(
        tenant_id=tenant_id, request=inference_pb2.SearchRequest(query=query, k=k, filters=filters or {})
    )


def delete_request(tenant_id: str, ids: Sequence[str]) -> cache_pb2.CacheDeleteDocumentsRequest:
    return cache_pb2.CacheDeleteDocumentsRequest(tenant_id=tenant_id, request=inference_pb2.DeleteDocumentsRequest(ids=list(ids)))


def metric(name: str, **labels: str) -> float:
    """Return a sample of this process's default Prometheus registry, 0 when absent."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    """Await a call that must fail and return its error."""
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"expected an error, got {response}")
