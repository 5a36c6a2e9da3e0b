"""The Cache service over mutual TLS with a real Valkey and the real model."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio

from services.cache.embedding_cache import embedding_namespace, text_digest
from services.common import certs, tls
from tenantserve.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from tests.cache.support import (
    cache_stub,
    delete_request,
    embed_request,
    entry_bytes,
    make_cert_dir,
    make_config,
    metric,
    rpc_error,
    running_cache,
    search_request,
    upsert_request,
)

Scenario = Callable[[cache_pb2_grpc.CacheStub, redis.asyncio.Redis], Awaitable[None]]


def run_with_cache(tmp_path: Path, valkey_url: str, tenants: list[dict[str, Any]], scenario: Scenario, **settings: Any) -> None:
    """Start a cache service for ``tenants`` and run ``scenario(stub, redis_client)`` against it."""
    config = make_config(make_cert_dir(tmp_path), valkey_url, tenants, **settings)

    async def main() -> None:
        async with running_cache(config) as server:
            channel, stub = cache_stub(config.tls.cert_dir, server.port)
            try:
                await scenario(stub, server.redis)
            finally:
                await channel.close()

    asyncio.run(main())


def test_second_embed_is_a_hit(tmp_path: Path, valkey_url: str) -> None:
    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        hits_before = metric("tenantserve_cache_embedding_hits_total", tenant_id="hit-a")
        misses_before = metric("tenantserve_cache_embedding_misses_total", tenant_id="hit-a")

        first = await stub.Embed(embed_request("hit-a", ["hello world", "second text"]))
        second = await stub.Embed(embed_request("hit-a", ["hello world"]))

        assert [e.cached for e in first.embeddings] == [False, False]
        assert [e.cached for e in second.embeddings] == [True]
        assert list(second.embeddings[0].values) == list(first.embeddings[0].values)
        assert first.dimension == 384
        assert first.num_tokens == 4 + 4
        assert metric("tenantserve_cache_embedding_hits_total", tenant_id="hit-a") - hits_before == 1
        assert metric("tenantserve_cache_embedding_misses_total", tenant_id="hit-a") - misses_before == 2
        key = f"{embedding_namespace('hit-a', 'all-minilm-l6-v2')}:{text_digest('hello world')}"
        assert await client.exists(key) == 1
        assert 0 < await client.ttl(key) <= 7 * 24 * 3600

    run_with_cache(tmp_path, valkey_url, [{"name": "hit-a"}], scenario)


def test_tenant_b_gets_no_hit_for_a_texts(tmp_path: Path, valkey_url: str) -> None:
    texts = ["isolation secret one", "isolation secret two"]

    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        await stub.Embed(embed_request("iso-a", texts))

        reply_b = await stub.Embed(embed_request("iso-b", texts))

        assert [e.cached for e in reply_b.embeddings] == [False, False]
        keys_b = await client.keys("{iso-b}:emb:*")
        keys_a = await client.keys("{iso-a}:emb:*")
        assert len([k for k in keys_a if not k.endswith((b":index", b":sizes", b":bytes"))]) == 2
        assert len([k for k in keys_b if not k.endswith((b":index", b":sizes", b":bytes"))]) == 2

    run_with_cache(tmp_path, valkey_url, [{"name": "iso-a"}, {"name": "iso-b"}], scenario)


def test_budget_evicts_only_own_oldest(tmp_path: Path, valkey_url: str) -> None:
    # Room for exactly three entries of budget-a.
    tenants = [
        {"name": "budget-a", "max_embedding_cache_bytes": 3 * entry_bytes("budget-a")},
        {"name": "budget-b", "max_embedding_cache_bytes": 1024 * 1024},
    ]

    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        await stub.Embed(embed_request("budget-b", ["kept text of b"]))
        for index in range(5):
            await stub.Embed(embed_request("budget-a", [f"text number {index}"]))

        namespace_a = embedding_namespace("budget-a", "all-minilm-l6-v2")
        present = [await client.exists(f"{namespace_a}:{text_digest(f'text number {i}')}") for i in range(5)]
        assert present == [0, 0, 1, 1, 1]
        assert await client.zcard(f"{namespace_a}:index") == 3
        assert int(await client.get(f"{namespace_a}:bytes")) == 3 * entry_bytes("budget-a")
        reply_b = await stub.Embed(embed_request("budget-b", ["kept text of b"]))
        assert reply_b.embeddings[0].cached

    run_with_cache(tmp_path, valkey_url, tenants, scenario)


def test_hit_refreshes_lru_order(tmp_path: Path, valkey_url: str) -> None:
    tenants = [{"name": "lru-a", "max_embedding_cache_bytes": 2 * entry_bytes("lru-a")}]

    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        await stub.Embed(embed_request("lru-a", ["first"]))
        await stub.Embed(embed_request("lru-a", ["second"]))
        await stub.Embed(embed_request("lru-a", ["first"]))
        await stub.Embed(embed_request("lru-a", ["third"]))

        reply = await stub.Embed(embed_request("lru-a", ["first", "second"]))

        assert [e.cached for e in reply.embeddings] == [True, False]

    run_with_cache(tmp_path, valkey_url, tenants, scenario)


def test_tenant_b_cannot_evict_a(tmp_path: Path, valkey_url: str) -> None:
    tenants = [
        {"name": "evict-a", "max_embedding_cache_bytes": 1024 * 1024},
        {"name": "evict-b", "max_embedding_cache_bytes": 2 * entry_bytes("evict-b")},
    ]

    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        await stub.Embed(embed_request("evict-a", ["a private text"]))
        # b sends a's text and many more, far over its own budget.
        await stub.Embed(embed_request("evict-b", ["a private text", *(f"filler {i}" for i in range(20))]))

        reply_a = await stub.Embed(embed_request("evict-a", ["a private text"]))

        assert reply_a.embeddings[0].cached
        assert await client.zcard(f"{embedding_namespace('evict-b', 'all-minilm-l6-v2')}:index") == 2

    run_with_cache(tmp_path, valkey_url, tenants, scenario)


def test_concurrent_misses_share_a_forward_pass(tmp_path: Path, valkey_url: str) -> None:
    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        count_before = metric("tenantserve_cache_embedding_batch_size_count")
        sum_before = metric("tenantserve_cache_embedding_batch_size_sum")

        replies = await asyncio.gather(
            *(stub.Embed(embed_request(tenant, [f"concurrent text {tenant} {i}"])) for i in range(4) for tenant in ("co-a", "co-b"))
        )

        assert all(not reply.embeddings[0].cached for reply in replies)
        num_batches = metric("tenantserve_cache_embedding_batch_size_count") - count_before
        num_texts = metric("tenantserve_cache_embedding_batch_size_sum") - sum_before
        assert num_texts == 8
        assert num_batches < 8, "every text had a forward pass of its own"

    # A long window makes the coalescing certain on a loaded machine.
    run_with_cache(tmp_path, valkey_url, [{"name": "co-a"}, {"name": "co-b"}], scenario, batch_window_ms=500)


def test_batched_vectors_equal_single_ones(tmp_path: Path, valkey_url: str) -> None:
    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        texts = ["short", "a much longer sentence that needs more padding in a batch"]
        together = await stub.Embed(embed_request("pad-a", texts))
        alone = await stub.Embed(embed_request("pad-b", [texts[0]]))

        difference = max(abs(a - b) for a, b in zip(together.embeddings[0].values, alone.embeddings[0].values))
        assert difference < 1e-5

    run_with_cache(tmp_path, valkey_url, [{"name": "pad-a"}, {"name": "pad-b"}], scenario)


CORPUS = {
    "refund": "Customers can return a purchase within 30 days for a full refund of the price.",
    "password": "To reset your password, open the account settings page and choose 'forgot password'.",
    "shipping": "Orders are shipped within two business days and delivery takes about a week.",
    "python": "Python is a programming language that emphasizes readable code.",
    "weather": "Tomorrow will be sunny with light winds and a high of 25 degrees Celsius.",
    "cats": "Cats are small domesticated carnivores that often sleep for most of the day.",
}
PARAPHRASES = {
    "refund": "how can I get my money back after buying something",
    "password": "I forgot my login credentials, how do I change them?",
    "shipping": "when will my package arrive",
    "python": "which coding language is known for being easy to read",
    "weather": "what is the forecast for the next day",
    "cats": "facts about pet felines and their sleeping habits",
}


def test_paraphrased_queries_find_their_document(tmp_path: Path, valkey_url: str) -> None:
    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        upserted = await stub.UpsertDocuments(upsert_request("corpus-a", CORPUS))
        assert upserted.num_upserted == len(CORPUS)
        assert upserted.num_documents == len(CORPUS)

        for expected_id, query in PARAPHRASES.items():
            reply = await stub.Search(search_request("corpus-a", query, k=3))
            assert reply.hits[0].id == expected_id, (query, [(h.id, h.score) for h in reply.hits])
            assert reply.hits[0].text == CORPUS[expected_id]
            assert len(reply.hits) == 3
            assert reply.hits[0].score >= reply.hits[1].score >= reply.hits[2].score

    run_with_cache(tmp_path, valkey_url, [{"name": "corpus-a"}], scenario)


def test_search_filters_on_metadata(tmp_path: Path, valkey_url: str) -> None:
    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        await stub.UpsertDocuments(upsert_request("filter-a", {"en": "The cat sleeps."}, {"lang": "en"}))
        await stub.UpsertDocuments(upsert_request("filter-a", {"de": "Die Katze schläft."}, {"lang": "de"}))

        reply = await stub.Search(search_request("filter-a", "a sleeping cat", k=5, filters={"lang": "de"}))

        assert [hit.id for hit in reply.hits] == ["de"]
        assert dict(reply.hits[0].metadata) == {"lang": "de"}

    run_with_cache(tmp_path, valkey_url, [{"name": "filter-a"}], scenario)


def test_documents_are_isolated_between_tenants(tmp_path: Path, valkey_url: str) -> None:
    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        await stub.UpsertDocuments(upsert_request("docs-a", {"secret-id": "The launch code is hidden in the vault."}))

        search_b = await stub.Search(search_request("docs-b", "The launch code is hidden in the vault.", k=10))
        delete_b = await rpc_error(stub.DeleteDocuments(delete_request("docs-b", ["secret-id"])))
        search_a = await stub.Search(search_request("docs-a", "where is the launch code", k=10))

        assert list(search_b.hits) == []
        assert delete_b.code() == grpc.StatusCode.NOT_FOUND
        assert "secret-id" in delete_b.details()
        assert [hit.id for hit in search_a.hits] == ["secret-id"]

    run_with_cache(tmp_path, valkey_url, [{"name": "docs-a"}, {"name": "docs-b"}], scenario)


def test_replicas_see_each_others_writes(tmp_path: Path, valkey_url: str) -> None:
    config = make_config(make_cert_dir(tmp_path), valkey_url, [{"name": "replica-a"}])

    async def main() -> None:
        async with running_cache(config) as first, running_cache(config) as second:
            channel_1, stub_1 = cache_stub(config.tls.cert_dir, first.port)
            channel_2, stub_2 = cache_stub(config.tls.cert_dir, second.port)
            try:
                await stub_1.UpsertDocuments(upsert_request("replica-a", {"one": "Apples are red fruit."}))
                assert [h.id for h in (await stub_2.Search(search_request("replica-a", "apple", k=5))).hits] == ["one"]

                await stub_2.UpsertDocuments(upsert_request("replica-a", {"two": "Bananas are yellow fruit."}))
                await stub_2.DeleteDocuments(delete_request("replica-a", ["one"]))
                hits = (await stub_1.Search(search_request("replica-a", "apple", k=5))).hits
                assert [h.id for h in hits] == ["two"]
            finally:
                await channel_1.close()
                await channel_2.close()

        # A restarted service loads the documents from Redis.
        async with running_cache(config) as restarted:
            channel, stub = cache_stub(config.tls.cert_dir, restarted.port)
            try:
                hits = (await stub.Search(search_request("replica-a", "banana", k=5))).hits
                assert [h.id for h in hits] == ["two"]
            finally:
                await channel.close()

    asyncio.run(main())


def test_store_full_rejects_whole_upsert(tmp_path: Path, valkey_url: str) -> None:
    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        await stub.UpsertDocuments(upsert_request("full-a", {"1": "one", "2": "two"}))

        error = await rpc_error(stub.UpsertDocuments(upsert_request("full-a", {"3": "three", "4": "four"})))
        replaced = await stub.UpsertDocuments(upsert_request("full-a", {"1": "uno", "3": "three"}))

        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_documents=3" in error.details()
        assert replaced.num_documents == 3

    run_with_cache(tmp_path, valkey_url, [{"name": "full-a", "max_documents": 3}], scenario)


def test_delete_is_all_or_nothing(tmp_path: Path, valkey_url: str) -> None:
    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        await stub.UpsertDocuments(upsert_request("del-a", {"x": "ex", "y": "why"}))

        error = await rpc_error(stub.DeleteDocuments(delete_request("del-a", ["x", "missing"])))
        deleted = await stub.DeleteDocuments(delete_request("del-a", ["x"]))

        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details().startswith("ids[1]")
        assert deleted.num_deleted == 1
        assert deleted.num_documents == 1

    run_with_cache(tmp_path, valkey_url, [{"name": "del-a"}], scenario)


LONG_TEXT = " ".join(["word"] * 300)
BAD_CALLS: list[tuple[str, Callable[[], Any], str]] = [
    ("Embed", lambda: embed_request("bad-a", []), "texts:"),
    ("Embed", lambda: embed_request("bad-a", ["ok", ""]), "texts[1]: must not be empty"),
    ("Embed", lambda: embed_request("bad-a", ["x"] * 5), "texts: must contain at most 4 items"),
    ("Embed", lambda: embed_request("bad-a", [LONG_TEXT]), "texts[0]: has 302 tokens, more than the embedding model's maximum of 256"),
    ("Embed", lambda: embed_request("Bad Tenant", ["x"]), "tenant_id:"),
    ("UpsertDocuments", lambda: upsert_request("bad-a", {"": "text"}), "documents[0].id: must not be empty"),
    ("UpsertDocuments", lambda: upsert_request("bad-a", {"d": ""}), "documents[0].text: must not be empty"),
    ("UpsertDocuments", lambda: upsert_request("bad-a", {"d": LONG_TEXT}), "documents[0].text: has 302 tokens"),
    ("Search", lambda: search_request("bad-a", "query", k=0), "k: must be between 1 and 100, got 0"),
    ("Search", lambda: search_request("bad-a", "query", k=101), "k: must be between 1 and 100, got 101"),
    ("Search", lambda: search_request("bad-a", "", k=1), "query: must not be empty"),
    ("Search", lambda: search_request("bad-a", LONG_TEXT, k=1), "query: has 302 tokens"),
    ("DeleteDocuments", lambda: delete_request("bad-a", []), "ids: must contain at least one id"),
    ("DeleteDocuments", lambda: delete_request("bad-a", [""]), "ids[0]: must not be empty"),
    ("LookupCompletion", lambda: cache_pb2.LookupCompletionRequest(tenant_id="bad-a", key="nothex"), "key:"),
]


@pytest.mark.parametrize(("method", "make_request", "message"), BAD_CALLS)
def test_bad_input_is_invalid_argument(tmp_path: Path, valkey_url: str, method: str, make_request: Callable[[], Any], message: str) -> None:
    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        error = await rpc_error(getattr(stub, method)(make_request()))

        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith(message), error.details()

    run_with_cache(tmp_path, valkey_url, [{"name": "bad-a"}], scenario, max_texts_per_call=4)


def test_tenant_certificate_is_rejected(tmp_path: Path, valkey_url: str) -> None:
    config = make_config(make_cert_dir(tmp_path), valkey_url, [{"name": "cert-a"}])
    certs.add_tenant(config.tls.cert_dir, "cert-a")

    async def main() -> None:
        async with running_cache(config) as server:
            channel = tls.secure_channel(f"127.0.0.1:{server.port}", tls.tenant_channel_credentials(config.tls.cert_dir, "cert-a"))
            try:
                error = await rpc_error(cache_pb2_grpc.CacheStub(channel).Embed(embed_request("cert-a", ["x"])))
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            finally:
                await channel.close()

    asyncio.run(main())


def test_completions_are_isolated_between_tenants(tmp_path: Path, valkey_url: str) -> None:
    key = "ab" * 32
    completion = cache_pb2.CachedCompletion(
        text="Paris.", token_ids=[1, 2], finish_reason=common_pb2.FINISH_REASON_STOP, completion_tokens=2
    )

    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        await stub.StoreCompletion(cache_pb2.StoreCompletionRequest(tenant_id="comp-a", key=key, completion=completion))

        found_a = await stub.LookupCompletion(cache_pb2.LookupCompletionRequest(tenant_id="comp-a", key=key))
        found_b = await stub.LookupCompletion(cache_pb2.LookupCompletionRequest(tenant_id="comp-b", key=key))

        assert found_a.found
        assert found_a.completion == completion
        assert not found_b.found
        assert await client.exists("{comp-a}:completion:" + key) == 1

    run_with_cache(tmp_path, valkey_url, [{"name": "comp-a"}, {"name": "comp-b"}], scenario)


def test_completion_budget_evicts_oldest(tmp_path: Path, valkey_url: str) -> None:
    def completion(index: int) -> cache_pb2.CachedCompletion:
        return cache_pb2.CachedCompletion(text="x" * 100, finish_reason=common_pb2.FINISH_REASON_STOP, completion_tokens=index)

    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        keys = [f"{index:064x}" for index in range(4)]
        for index, key in enumerate(keys):
            await stub.StoreCompletion(cache_pb2.StoreCompletionRequest(tenant_id="cbudget-a", key=key, completion=completion(index)))

        found = [(await stub.LookupCompletion(cache_pb2.LookupCompletionRequest(tenant_id="cbudget-a", key=k))).found for k in keys]

        assert found == [False, False, True, True]

    # Each entry is charged about 100 bytes of text, the message framing and its key.
    run_with_cache(tmp_path, valkey_url, [{"name": "cbudget-a", "max_completion_cache_bytes": 2 * 210}], scenario)


def test_tenant_b_cannot_evict_a_completions(tmp_path: Path, valkey_url: str) -> None:
    key_a = "cd" * 32
    completion = cache_pb2.CachedCompletion(text="kept", finish_reason=common_pb2.FINISH_REASON_STOP, completion_tokens=1)
    tenants = [
        {"name": "cevict-a"},
        {"name": "cevict-b", "max_completion_cache_bytes": 300},
    ]

    async def scenario(stub: cache_pb2_grpc.CacheStub, client: redis.asyncio.Redis) -> None:
        await stub.StoreCompletion(cache_pb2.StoreCompletionRequest(tenant_id="cevict-a", key=key_a, completion=completion))
        # b writes a's key and many more, far over its own budget.
        for index in range(20):
            key = key_a if index == 0 else f"{index:064x}"
            await stub.StoreCompletion(cache_pb2.StoreCompletionRequest(tenant_id="cevict-b", key=key, completion=completion))

        found_a = await stub.LookupCompletion(cache_pb2.LookupCompletionRequest(tenant_id="cevict-a", key=key_a))
        found_b = await stub.LookupCompletion(cache_pb2.LookupCompletionRequest(tenant_id="cevict-b", key=key_a))

        assert found_a.found
        assert not found_b.found

    run_with_cache(tmp_path, valkey_url, tenants, scenario)
