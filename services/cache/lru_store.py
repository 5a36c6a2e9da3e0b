"""A per-tenant key-value store in Redis with a TTL, a byte budget and LRU eviction.

For a namespace such as ``{tenant}:emb:all-minilm-l6-v2`` the store keeps:

- ``<namespace>:<digest>``: the value, with a TTL that every read renews;
- ``<namespace>:index``: sorted set of digests scored by last access
  (microseconds of the Redis server's clock);
- ``<namespace>:sizes``: hash digest -> bytes charged for the entry;
- ``<namespace>:bytes``: bytes charged for all entries.

Every read or write of an entry renews its TTL and its index score. All
entries of a namespace have the same TTL, so the ones that expired are
always the least recently used and are the first to go when the budget
is exceeded. Until then they still count against the budget. Eviction only ever walks the namespace's own index, so one
tenant can never evict another's entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio

# KEYS[1] = index, KEYS[2..] = entry keys. ARGV[1] = TTL in ms, ARGV[2..] =
# digests, in the order of the entry keys. Returns each value or false.
LOOKUP_SCRIPT = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local values = {}
for i = 2, #KEYS do
  local value = redis.call('GET', KEYS[i])
  if value then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    redis.call('ZADD', KEYS[1], now, ARGV[i])
    values[i - 1] = value
  else
    values[i - 1] = false
  end
end
return values
"""

# KEYS[1] = index, KEYS[2] = sizes, KEYS[3] = bytes, KEYS[4..] = entry keys.
# ARGV[1] = TTL in ms, ARGV[2] = byte budget, ARGV[3] = namespace, then
# (digest, value) pairs in the order of the entry keys. Returns the number
# of entries evicted.
# NOTE: eviction deletes entry keys that are not declared in KEYS. They
# share the namespace's {tenant} hash tag, so they live in the same slot on
# a Redis Cluster, but a server that enforces declared keys rejects it.
STORE_SCRIPT = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local ttl = ARGV[1]
local max_bytes = tonumber(ARGV[2])
for i = 4, #KEYS do
  local digest = ARGV[2 * i - 4]
  local value = ARGV[2 * i - 3]
  local size = #value + #KEYS[i]
  local old_size = redis.call('HGET', KEYS[2], digest)
  if old_size then
    redis.call('DECRBY', KEYS[3], old_size)
  end
  redis.call('SET', KEYS[i], value, 'PX', ttl)
  redis.call('HSET', KEYS[2], digest, size)
  redis.call('INCRBY', KEYS[3], size)
  redis.call('ZADD', KEYS[1], now, digest)
end
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
local num_evicted = 0
while total > max_bytes do
  local oldest = redis.call('ZPOPMIN', KEYS[1])
  if #oldest == 0 then
    break
  end
  local digest = oldest[1]
  local size = tonumber(redis.call('HGET', KEYS[2], digest) or '0')
  redis.call('DEL', ARGV[3] .. ':' .. digest)
  redis.call('HDEL', KEYS[2], digest)
  total = redis.call('DECRBY', KEYS[3], size)
  num_evicted = num_evicted + 1
end
return num_evicted
"""


@dataclass(frozen=True)
class StoreUsage:
    """Number of entries in a namespace's index and the bytes charged for them."""

    num_entries: int
    num_bytes: int


class LruStore:
    """Read and write entries of namespaces; each call touches one namespace only."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._lookup = client.register_script(LOOKUP_SCRIPT)
        self._store = client.register_script(STORE_SCRIPT)

    async def lookup(self, namespace: str, digests: list[str], ttl_seconds: int) -> list[bytes | None]:
        """Return the value of each digest, or None; found entries become the most recently used.

        Raises redis.exceptions.RedisError when the server fails.
        """
        keys = [f"{namespace}:index", *(f"{namespace}:{digest}" for digest in digests)]
        values = await self._lookup(keys=keys, args=[ttl_seconds * 1000, *digests])
        return [value if value else None for value in values]

    async def store(self, namespace: str, entries: dict[str, bytes], ttl_seconds: int, max_bytes: int) -> int:
        """Write ``entries`` (digest -> value), then evict the least recently used over ``max_bytes``.

        Returns the number of entries evicted. Raises
        redis.exceptions.RedisError when the server fails.
        """
        keys = [f"{namespace}:index", f"{namespace}:sizes", f"{namespace}:bytes"]
        keys.extend(f"{namespace}:{digest}" for digest in entries)
        args: list[str | bytes | int] = [ttl_seconds * 1000, max_bytes, namespace]
        for digest, value in entries.items():
            args.extend((digest, value))
        return int(await self._store(keys=keys, args=args))

    async def usage(self, namespace: str) -> StoreUsage:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zcard(f"{namespace}:index")
            pipe.get(f"{namespace}:bytes")
            num_entries, num_bytes = await pipe.execute()
        return StoreUsage(num_entries=int(num_entries), num_bytes=int(num_bytes or 0))
