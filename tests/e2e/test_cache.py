"""Embeddings, retrieval and cached completions through admission and the cache service as processes."""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
import pytest

from services.cli.main import main as tenantserve_main
from tenantserve.v1 import cache_pb2, cache_pb2_grpc, inference_pb2

from .support import CALL_TIMEOUT_SECONDS, chat_request, generate, inference_stub, open_channel, service_credentials, tenant_credentials


def unique(text: str) -> str:
    """Return ``text`` made unique to this test run, so that no earlier run's cache entry matches."""
    return f"{text} [{uuid.uuid4().hex[:8]}]"


def test_embed_through_admission(stack: Any) -> None:
    text = unique("The cache service embeds texts")
    channel, stub = inference_stub(stack, "alpha")
    with channel:
        first = stub.Embed(inference_pb2.EmbedRequest(texts=[text]), timeout=CALL_TIMEOUT_SECONDS)
        second = stub.Embed(inference_pb2.EmbedRequest(texts=[text]), timeout=CALL_TIMEOUT_SECONDS)

    assert first.model == "all-minilm-l6-v2"
    assert len(first.embeddings[0].values) == 384
    assert not first.embeddings[0].cached
    assert second.embeddings[0].cached
    assert first.num_tokens > 2


def test_other_tenant_gets_no_hit_or_document(stack: Any) -> None:
    text = unique("Quarterly revenue grew by eleven percent in the northern region")
    document_id = unique("report")
    channel_a, stub_a = inference_stub(stack, "alpha")
    channel_b, stub_b = inference_stub(stack, "beta")
    with channel_a, channel_b:
        stub_a.UpsertDocuments(
            inference_pb2.UpsertDocumentsRequest(documents=[inference_pb2.Document(id=document_id, text=text)]),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        embed_b = stub_b.Embed(inference_pb2.EmbedRequest(texts=[text]), timeout=CALL_TIMEOUT_SECONDS)
        search_b = stub_b.Search(inference_pb2.SearchRequest(query=text, k=100), timeout=CALL_TIMEOUT_SECONDS)
        with pytest.raises(grpc.RpcError) as delete_b:
            stub_b.DeleteDocuments(inference_pb2.DeleteDocumentsRequest(ids=[document_id]), timeout=CALL_TIMEOUT_SECONDS)
        search_a = stub_a.Search(inference_pb2.SearchRequest(query="how did sales develop", k=100), timeout=CALL_TIMEOUT_SECONDS)

    assert not embed_b.embeddings[0].cached
    assert document_id not in [hit.id for hit in search_b.hits]
    assert delete_b.value.code() == grpc.StatusCode.NOT_FOUND
    assert document_id in [hit.id for hit in search_a.hits]


@pytest.mark.parametrize(
    ("request_message", "method", "field"),
    [
        (inference_pb2.EmbedRequest(texts=[]), "Embed", "texts"),
        (inference_pb2.EmbedRequest(texts=[""]), "Embed", "texts[0]"),
        (inference_pb2.EmbedRequest(texts=["word " * 300]), "Embed", "texts[0]"),
        (inference_pb2.SearchRequest(query="q", k=0), "Search", "k"),
        (inference_pb2.SearchRequest(query="q", k=1000), "Search", "k"),
    ],
)
def test_bad_cache_input_names_field(stack: Any, request_message: Any, method: str, field: str) -> None:
    channel, stub = inference_stub(stack, "gamma")
    with channel, pytest.raises(grpc.RpcError) as error:
        getattr(stub, method)(request_message, timeout=CALL_TIMEOUT_SECONDS)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:"), error.value.details()


def generate_until_cached(stub: Any, request: inference_pb2.GenerateRequest, max_attempts: int = 5) -> Any:
    """Repeat a request until the completion cache answers it; the cache stores completions in the background."""
    for _ in range(max_attempts):
        completion = generate(stub, request)
        if completion.result.cached:
            return completion
        time.sleep(0.2)
    return completion


def test_cached_completion_repeats_original(stack: Any) -> None:
    request = chat_request(unique("Name a primary colour."), max_tokens=8)
    channel_a, stub_a = inference_stub(stack, "alpha")
    channel_b, stub_b = inference_stub(stack, "beta")
    with channel_a, channel_b:
        original = generate(stub_a, request)
        repeated = generate_until_cached(stub_a, request)
        other_tenant = generate(stub_b, request)

    assert not original.result.cached
    assert repeated.result.cached
    assert repeated.text == original.text
    assert repeated.token_ids == original.token_ids
    assert repeated.result.usage.completion_tokens == original.result.usage.completion_tokens
    assert repeated.result.request_id != original.result.request_id
    assert not other_tenant.result.cached


def test_completion_cache_opt_out_and_sampling(stack: Any) -> None:
    request = chat_request(unique("Name a planet."), max_tokens=4)
    opted_out = chat_request(unique("Name a planet."), max_tokens=4)
    opted_out.skip_completion_cache = True
    sampled = chat_request(unique("Name a river."), max_tokens=4, temperature=0.7, seed=5)
    channel, stub = inference_stub(stack, "gamma")
    with channel:
        generate(stub, request)
        generate(stub, opted_out)
        repeated_opt_out = generate(stub, opted_out)
        generate(stub, sampled)
        repeated_sampled = generate(stub, sampled)

    assert not repeated_opt_out.result.cached
    assert not repeated_sampled.result.cached


def test_cache_service_rejects_tenant_certificate(stack: Any) -> None:
    request = cache_pb2.CacheEmbedRequest(tenant_id="alpha", request=inference_pb2.EmbedRequest(texts=["x"]))
    cert_dir = stack.config.tls.cert_dir
    with open_channel(stack.config.cache.target, tenant_credentials(cert_dir, "alpha")) as channel:
        with pytest.raises(grpc.RpcError) as error:
            cache_pb2_grpc.CacheStub(channel).Embed(request, timeout=CALL_TIMEOUT_SECONDS)
    with open_channel(stack.config.cache.target, service_credentials(cert_dir, "admission")) as channel:
        reply = cache_pb2_grpc.CacheStub(channel).Embed(request, timeout=CALL_TIMEOUT_SECONDS)

    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(reply.embeddings) == 1


def test_cli_commands(stack: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    marker = uuid.uuid4().hex[:8]
    (tmp_path / f"tea-{marker}.txt").write_text("Green tea is brewed with water below boiling point.\n")
    (tmp_path / f"bikes-{marker}.txt").write_text("A bicycle chain needs oil every few hundred kilometres.\n")
    config = ["--config", str(stack.config_path)]

    assert tenantserve_main([*config, "embed", "--tenant", "alpha", "hello there"]) == 0
    embed_output = capsys.readouterr().out
    assert tenantserve_main([*config, "docs", "add", "--tenant", "alpha", *map(str, tmp_path.glob(f"*-{marker}.txt"))]) == 0
    capsys.readouterr()
    assert tenantserve_main([*config, "search", "--tenant", "alpha", "-k", "1", "how to maintain a bike"]) == 0
    search_output = capsys.readouterr().out

    assert "dimension 384" in embed_output
    assert f"bikes-{marker}.txt" in search_output
