"""Per-tenant limits stored in Redis, read by the admission decision script.

Each tenant's limits live in the hash ``{tenant}:limits``, so the decision
script reads them in the same atomic step as the counters, and a changed
limit applies to the very next request. Fields:

- ``version``: incremented by every write.
- ``disabled``: ``1`` rejects every request of the tenant with PERMISSION_DENIED.
- ``weight`` and every integer limit of ``TenantLimits``; 0 means no limit.
- ``allowed_models`` and ``allowed_service_classes``: comma-separated
  names; empty allows all.
- ``<class>.<limit>``, for example ``batch.requests_per_minute``: a limit
  that replaces the tenant's limit for requests of that service class.

The set ``tenantserve:tenants`` lists the tenant ids that have limits. It
does not share a tenant's hash tag, so it is written after the tenant's own
hash, and a reader treats an id without a hash as absent.

The config file seeds a tenant's hash only when it is missing, so changes
made at runtime survive an admission restart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import redis.asyncio

from services.common.config import OVERRIDABLE_LIMITS, SERVICE_CLASS_NAMES, TENANT_NAME_PATTERN, TenantConfig

TENANTS_KEY = "tenantserve:tenants"
INTEGER_LIMITS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent_streams",
    "daily_token_budget",
    "monthly_token_budget",
    "max_prompt_tokens",
    "max_tokens",
)
# Limits that must be >= 1: a tenant always has a rate and a concurrency limit.
REQUIRED_LIMITS = ("requests_per_minute", "max_concurrent_streams")

# KEYS[1] = {tenant}:limits. ARGV[1] = mode: "create" fails when the hash
# exists, "update" fails when it is missing, "seed" writes only when it is
# missing, "replace" writes in any case. ARGV[2] = "1" to delete every
# service class override first. ARGV[3..] = field, value pairs.
# Returns the new version, or -1 when the mode forbade the write.
WRITE_LIMITS_SCRIPT = """
local exists = redis.call('EXISTS', KEYS[1]) == 1
local mode = ARGV[1]
if (mode == 'create' or mode == 'seed') and exists then
  return -1
end
if mode == 'update' and not exists then
  return -1
end
if ARGV[2] == '1' then
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.find(field, '.', 1, true) then
      redis.call('HDEL', KEYS[1], field)
    end
  end
end
if #ARGV > 2 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
end
return redis.call('HINCRBY', KEYS[1], 'version', 1)
"""


class TenantNotFound(LookupError):
    """No limits are stored for the tenant."""


class TenantExists(ValueError):
    """Limits are already stored for the tenant."""


class InvalidLimits(ValueError):
    """A limit value is invalid; the message names the field and the rule."""


@dataclasses.dataclass(frozen=True)
class TenantLimits:
    """One tenant's limits as stored in ``{tenant}:limits``; integer limits of 0 mean no limit."""

    name: str
    weight: float = 1.0
    requests_per_minute: int = 600
    tokens_per_minute: int = 0
    max_concurrent_streams: int = 8
    daily_token_budget: int = 0
    monthly_token_budget: int = 0
    max_prompt_tokens: int = 0
    max_tokens: int = 0
    allowed_models: tuple[str, ...] = ()
    allowed_service_classes: tuple[str, ...] = ()
    # Service class name -> {limit name: value}.
    service_class_overrides: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict, hash=False)
    disabled: bool = False
    # Incremented by every write; 0 for limits not read from Redis.
    version: int = 0

    def limit_for(self, limit: str, service_class: str) -> int:
        """Return ``limit`` for a request of ``service_class``, with the class's override applied."""
        override = self.service_class_overrides.get(service_class, {})
        return int(override.get(limit, getattr(self, limit)))


def limits_key(tenant_id: str) -> str:
    return f"{{{tenant_id}}}:limits"


def limits_from_config(tenant: TenantConfig) -> TenantLimits:
    """Convert a tenant of the config file to its stored limits."""
    return TenantLimits(
        name=tenant.name,
        weight=tenant.weight,
        **{limit: getattr(tenant, limit) for limit in INTEGER_LIMITS},
        allowed_models=tuple(tenant.allowed_models),
        allowed_service_classes=tuple(tenant.allowed_service_classes),
        service_class_overrides={name: dict(values) for name, values in tenant.service_class_overrides.items()},
    )


def validate_limits(limits: TenantLimits) -> None:
    """Raise InvalidLimits naming the first invalid field of ``limits``."""
    if not TENANT_NAME_PATTERN.match(limits.name):
        raise InvalidLimits(f"name {limits.name!r} is invalid; use 1 to 63 lowercase letters, digits or '-'")
    if not limits.weight > 0:
        raise InvalidLimits(f"weight must be > 0, got {limits.weight}")
    for limit in INTEGER_LIMITS:
        minimum = 1 if limit in REQUIRED_LIMITS else 0
        value = getattr(limits, limit)
        if not isinstance(value, int) or value < minimum:
            raise InvalidLimits(f"{limit} must be an integer >= {minimum}, got {value!r}")
    for model in limits.allowed_models:
        if not model or "," in model:
            raise InvalidLimits(f"allowed_models: {model!r} is not a model name")
    for class_name in limits.allowed_service_classes:
        if class_name not in SERVICE_CLASS_NAMES:
            raise InvalidLimits(f"allowed_service_classes: {class_name!r} is invalid; use {', '.join(SERVICE_CLASS_NAMES)}")
    for class_name, overrides in limits.service_class_overrides.items():
        if class_name not in SERVICE_CLASS_NAMES:
            raise InvalidLimits(f"service_class_overrides: {class_name!r} is invalid; use {', '.join(SERVICE_CLASS_NAMES)}")
        for limit, value in overrides.items():
            if limit not in OVERRIDABLE_LIMITS:
                raise InvalidLimits(f"service_class_overrides.{class_name}: {limit!r} cannot be overridden")
            minimum = 1 if limit in REQUIRED_LIMITS else 0
            if not isinstance(value, int) or value < minimum:
                raise InvalidLimits(f"service_class_overrides.{class_name}.{limit} must be an integer >= {minimum}")


def encode_limits(limits: TenantLimits) -> dict[str, str]:
    """Return the hash fields of ``limits``, without ``version``."""
    fields = {
        "weight": repr(float(limits.weight)),
        "disabled": "1" if limits.disabled else "0",
        "allowed_models": ",".join(limits.allowed_models),
        "allowed_service_classes": ",".join(limits.allowed_service_classes),
    }
    fields.update({limit: str(int(getattr(limits, limit))) for limit in INTEGER_LIMITS})
    for class_name, overrides in limits.service_class_overrides.items():
        fields.update({f"{class_name}.{limit}": str(int(value)) for limit, value in overrides.items()})
    return fields


def decode_limits(tenant_id: str, fields: Mapping[bytes, bytes]) -> TenantLimits:
    """Build TenantLimits from the hash fields that HGETALL returns."""
    text = {key.decode(): value.decode() for key, value in fields.items()}
    overrides: dict[str, dict[str, int]] = {}
    for field, value in text.items():
        class_name, dot, limit = field.partition(".")
        if dot:
            overrides.setdefault(class_name, {})[limit] = int(value)
    return TenantLimits(
        name=tenant_id,
        weight=float(text.get("weight", "1.0")),
        **{limit: int(text.get(limit, "0")) for limit in INTEGER_LIMITS},
        allowed_models=_split_names(text.get("allowed_models", "")),
        allowed_service_classes=_split_names(text.get("allowed_service_classes", "")),
        service_class_overrides=overrides,
        disabled=text.get("disabled", "0") == "1",
        version=int(text.get("version", "0")),
    )


def _split_names(value: str) -> tuple[str, ...]:
    return tuple(name for name in value.split(",") if name)


async def _write(client: redis.asyncio.Redis, tenant_id: str, mode: str, replace_overrides: bool, fields: Mapping[str, str]) -> int:
    args: list[str] = [mode, "1" if replace_overrides else "0"]
    for field, value in fields.items():
        args.extend((field, value))
    version = int(await client.eval(WRITE_LIMITS_SCRIPT, 1, limits_key(tenant_id), *args))
    if version > 0:
        await client.sadd(TENANTS_KEY, tenant_id)
    return version


async def seed_tenants(client: redis.asyncio.Redis, tenants: Iterable[TenantConfig]) -> list[str]:
    """Store the limits of each config tenant that has none in Redis yet; return the ids written.

    A tenant whose limits already exist keeps them, so runtime changes
    survive restarts. Raises redis.exceptions.RedisError when Redis fails.
    """
    seeded = []
    for tenant in tenants:
        limits = limits_from_config(tenant)
        if await _write(client, tenant.name, "seed", True, encode_limits(limits)) > 0:
            seeded.append(tenant.name)
        else:
            # Listed again in case an earlier seed stopped between the two writes.
            await client.sadd(TENANTS_KEY, tenant.name)
    return seeded


async def get_tenant(client: redis.asyncio.Redis, tenant_id: str) -> TenantLimits | None:
    """Return the tenant's stored limits, or None when it has none."""
    fields = await client.hgetall(limits_key(tenant_id))
    return decode_limits(tenant_id, fields) if fields else None


async def list_tenants(client: redis.asyncio.Redis) -> list[TenantLimits]:
    """Return the limits of every stored tenant, disabled ones included, sorted by name."""
    tenant_ids = sorted(member.decode() for member in await client.smembers(TENANTS_KEY))
    tenants = [await get_tenant(client, tenant_id) for tenant_id in tenant_ids]
    return [tenant for tenant in tenants if tenant is not None]


async def create_tenant(client: redis.asyncio.Redis, limits: TenantLimits) -> TenantLimits:
    """Store a new tenant's limits. Raises InvalidLimits, or TenantExists when it already has limits."""
    validate_limits(limits)
    if await _write(client, limits.name, "create", True, encode_limits(limits)) < 0:
        raise TenantExists(f"tenant {limits.name!r} already exists; update it instead")
    return await _get_existing(client, limits.name)


async def set_tenant(client: redis.asyncio.Redis, limits: TenantLimits) -> TenantLimits:
    """Store ``limits`` in full, creating the tenant or replacing every limit it had. Raises InvalidLimits."""
    validate_limits(limits)
    await _write(client, limits.name, "replace", True, encode_limits(limits))
    return await _get_existing(client, limits.name)


async def update_tenant(client: redis.asyncio.Redis, tenant_id: str, **changes: Any) -> TenantLimits:
    """Change some of a tenant's limits; the next decision uses them.

    ``changes`` are TenantLimits field names (not name or version). A
    ``service_class_overrides`` change replaces every override. Raises
    TenantNotFound, and InvalidLimits for an unknown field or invalid value.
    """
    current = await get_tenant(client, tenant_id)
    if current is None:
        raise TenantNotFound(f"tenant {tenant_id!r} not found")
    writable = {field.name for field in dataclasses.fields(TenantLimits)} - {"name", "version"}
    unknown = sorted(set(changes) - writable)
    if unknown:
        raise InvalidLimits(f"unknown or read-only field(s): {', '.join(unknown)}")
    if "allowed_models" in changes:
        changes["allowed_models"] = tuple(changes["allowed_models"])
    if "allowed_service_classes" in changes:
        changes["allowed_service_classes"] = tuple(changes["allowed_service_classes"])
    updated = dataclasses.replace(current, **changes)
    validate_limits(updated)
    fields = encode_limits(updated)
    changed = {field: value for field, value in fields.items() if field in _fields_of(changes)}
    replace_overrides = "service_class_overrides" in changes
    if await _write(client, tenant_id, "update", replace_overrides, changed) < 0:
        raise TenantNotFound(f"tenant {tenant_id!r} not found")
    return await _get_existing(client, tenant_id)


async def disable_tenant(client: redis.asyncio.Redis, tenant_id: str) -> TenantLimits:
    """Reject the tenant's next requests with PERMISSION_DENIED; its counters stay. Raises TenantNotFound."""
    return await update_tenant(client, tenant_id, disabled=True)


async def enable_tenant(client: redis.asyncio.Redis, tenant_id: str) -> TenantLimits:
    """Admit the tenant's requests again after ``disable_tenant``. Raises TenantNotFound."""
    return await update_tenant(client, tenant_id, disabled=False)


def _fields_of(changes: Mapping[str, Any]) -> set[str]:
    """Return the hash fields that the changed TenantLimits fields map to."""
    fields = set(changes) - {"service_class_overrides"}
    if "service_class_overrides" in changes:
        for class_name, overrides in changes["service_class_overrides"].items():
            fields.update(f"{class_name}.{limit}" for limit in overrides)
    return fields


async def _get_existing(client: redis.asyncio.Redis, tenant_id: str) -> TenantLimits:
    limits = await get_tenant(client, tenant_id)
    if limits is None:
        raise TenantNotFound(f"tenant {tenant_id!r} not found")
    return limits
