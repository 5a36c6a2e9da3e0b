"""The `embed`, `docs` and `search` commands: embeddings and retrieval as a tenant."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc

from services.cli.client import tenant_channel
from services.common import certs
from services.common.config import Config
from tenantserve.v1 import inference_pb2, inference_pb2_grpc

COMMANDS = ("embed", "docs", "search")
NUM_VALUES_SHOWN = 6
TEXT_PREVIEW_CHARS = 72


def add_parsers(commands: argparse._SubParsersAction) -> None:
    embed = commands.add_parser("embed", help="print the embedding of each text as a tenant")
    embed.add_argument("--tenant", required=True, help="tenant whose certificate to use")
    embed.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed")

    docs = commands.add_parser("docs", help="manage a tenant's retrieval documents")
    docs_commands = docs.add_subparsers(dest="docs_command", required=True)
    add = docs_commands.add_parser("add", help="upsert each file as one document, with its file name as the id")
    add.add_argument("--tenant", required=True, help="tenant whose certificate to use")
    add.add_argument("files", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files")
    delete = docs_commands.add_parser("delete", help="delete documents by id")
    delete.add_argument("--tenant", required=True, help="tenant whose certificate to use")
    delete.add_argument("ids", nargs="+", metavar="ID", help="document ids")

    search = commands.add_parser("search", help="print a tenant's documents most similar to a query")
    search.add_argument("--tenant", required=True, help="tenant whose certificate to use")
    search.add_argument("-k", type=int, default=5, help="number of results (default: 5)")
    search.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE", help="metadata equality filter; repeatable")
    search.add_argument("query", help="query text")


def run(args: argparse.Namespace, config: Config) -> int:
    """Run one of COMMANDS; return the exit status."""
    if not (config.tls.cert_dir / "tenants" / f"{args.tenant}.crt").exists():
        certs.add_tenant(config.tls.cert_dir, args.tenant)
    try:
        return asyncio.run(_run(args, config))
    except grpc.aio.AioRpcError as exc:
        print(f"tenantserve: request failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, config: Config) -> int:
    async with tenant_channel(config.admission.target, config.tls.cert_dir, args.tenant) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        if args.command == "embed":
            return await _embed(stub, args.texts)
        if args.command == "search":
            return await _search(stub, args.query, args.k, args.filter)
        if args.docs_command == "add":
            return await _add_documents(stub, args.files)
        reply = await stub.DeleteDocuments(inference_pb2.DeleteDocumentsRequest(ids=args.ids))
        print(f"deleted {reply.num_deleted} documents; {reply.num_documents} left")
        return 0


async def _embed(stub: inference_pb2_grpc.InferenceStub, texts: list[str]) -> int:
    reply = await stub.Embed(inference_pb2.EmbedRequest(texts=texts))
    print(f"model {reply.model}, dimension {reply.dimension}, {reply.num_tokens} tokens")
    for text, embedding in zip(texts, reply.embeddings):
        values = " ".join(f"{value:+.4f}" for value in embedding.values[:NUM_VALUES_SHOWN])
        source = "cache" if embedding.cached else "model"
        print(f"[{values} ...] ({source}) {_preview(text)}")
    return 0


async def _add_documents(stub: inference_pb2_grpc.InferenceStub, files: list[Path]) -> int:
    documents = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"tenantserve: cannot read {path}: {exc}", file=sys.stderr)
            return 1
        documents.append(inference_pb2.Document(id=path.name, text=text.strip(), metadata={"source": str(path)}))
    reply = await stub.UpsertDocuments(inference_pb2.UpsertDocumentsRequest(documents=documents))
    print(f"upserted {reply.num_upserted} documents ({reply.num_tokens} tokens); the tenant has {reply.num_documents}")
    return 0


async def _search(stub: inference_pb2_grpc.InferenceStub, query: str, k: int, filters: list[str]) -> int:
    pairs = {}
    for item in filters:
        key, separator, value = item.partition("=")
        if not separator:
            print(f"tenantserve: --filter {item!r} is invalid; use KEY=VALUE", file=sys.stderr)
            return 2
        pairs[key] = value
    reply = await stub.Search(inference_pb2.SearchRequest(query=query, k=k, filters=pairs))
    if not reply.hits:
        print("no documents matched")
    for rank, hit in enumerate(reply.hits, start=1):
        print(f"{rank:>2}. {hit.score:.4f}  {hit.id}  {_preview(hit.text)}")
    return 0


def _preview(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= TEXT_PREVIEW_CHARS else flat[: TEXT_PREVIEW_CHARS - 3] + "..."
