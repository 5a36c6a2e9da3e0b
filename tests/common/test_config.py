"""Loading the config file, environment overrides and validation errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.config import DEFAULT_CONFIG_PATH, ConfigError, load_config


def write_config(tmp_path: Path, changes: dict[str, Any] | None = None) -> Path:
    """Write the default config with ``changes`` merged into it (one level deep per section)."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    for key, value in (changes or {}).items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            for inner_key, inner_value in value.items():
                if isinstance(inner_value, dict) and isinstance(raw[key].get(inner_key), dict):
                    raw[key][inner_key] = {**raw[key][inner_key], **inner_value}
                else:
                    raw[key][inner_key] = inner_value
        else:
            raw[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_default_config_loads() -> None:
    config = load_config(environ={})

    assert config.scheduler.listen == "127.0.0.1:50052"
    assert config.worker_gpu.model == "smollm2-135m-instruct"
    assert [tenant.name for tenant in config.tenants] == ["alpha", "beta", "gamma"]
    assert config.model("smollm2-135m-instruct") is not None
    assert config.tenant("delta") is None


def test_default_cert_dir_is_under_state_dir() -> None:
    config = load_config(environ={"TENANTSERVE_STATE_DIR": "/srv/tenantserve"})

    assert config.state_dir == Path("/srv/tenantserve")
    assert config.tls.cert_dir == Path("/srv/tenantserve/certs")


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"services": {"scheduler": {"max_queue_size": 7}}})

    config = load_config(environ={"TENANTSERVE_CONFIG": str(path)})

    assert config.scheduler.max_queue_size == 7


def test_explicit_path_wins_over_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"services": {"scheduler": {"max_queue_size": 7}}})

    config = load_config(path, environ={"TENANTSERVE_CONFIG": str(tmp_path / "missing.yaml")})

    assert config.scheduler.max_queue_size == 7


def test_environment_overrides_service_fields() -> None:
    environ = {
        "TENANTSERVE_SCHEDULER_ADDRESS": "scheduler:50052",
        "TENANTSERVE_WORKER_GPU_MAX_BATCH_SIZE": "4",
        "TENANTSERVE_WORKER_GPU_DTYPE": "bfloat16",
        "TENANTSERVE_SCHEDULER_HEARTBEAT_TIMEOUT_SECONDS": "2.5",
        "TENANTSERVE_ADMISSION_METRICS_HOST": "0.0.0.0",
    }

    config = load_config(environ=environ)

    assert config.scheduler.target == "scheduler:50052"
    assert config.worker_gpu.max_batch_size == 4
    assert config.worker_gpu.dtype == "bfloat16"
    assert config.scheduler.heartbeat_timeout_seconds == 2.5
    assert config.admission.metrics_host == "0.0.0.0"


def test_environment_overrides_top_level_values() -> None:
    environ = {"TENANTSERVE_REDIS_URL": "redis://127.0.0.1:6400/0", "TENANTSERVE_CERT_DIR": "/etc/tenantserve"}

    config = load_config(environ=environ)

    assert config.redis_url == "redis://127.0.0.1:6400/0"
    assert config.tls.cert_dir == Path("/etc/tenantserve")


def test_target_defaults_to_listen() -> None:
    config = load_config(environ={})

    assert config.worker_gpu.target == config.worker_gpu.listen


def test_invalid_integer_override_fails() -> None:
    with pytest.raises(ConfigError, match="TENANTSERVE_WORKER_GPU_MAX_BATCH_SIZE='many'"):
        load_config(environ={"TENANTSERVE_WORKER_GPU_MAX_BATCH_SIZE": "many"})


def test_missing_file_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_invalid_yaml_fails(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("services: [unclosed\n")

    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path, environ={})


def test_top_level_list_fails(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("- a\n- b\n")

    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"services": {"scheduler": {"max_queu_size": 3}}}, r"services.scheduler: unknown field\(s\) max_queu_size"),
        ({"services": {"worker_gpu": {"dtype": "int8"}}}, "services.worker_gpu.dtype: 'int8' is invalid"),
        ({"services": {"worker_gpu": {"model": "llama"}}}, "'llama' is not among models"),
        ({"services": {"worker_gpu": {"max_batch_size": 0}}}, "max_batch_size must be >= 1"),
        ({"services": {"scheduler": {"max_queue_size": 0}}}, "max_queue_size must be >= 1"),
        ({"tenants": [{"name": "Alpha"}]}, "name 'Alpha' is invalid"),
        ({"tenants": [{"name": "alpha"}, {"name": "alpha"}]}, "names must be unique"),
        ({"tenants": [{"name": "alpha", "weight": 0}]}, r"tenants\[alpha\].weight must be > 0"),
        ({"tenants": [{"name": "alpha", "requests_per_minute": 0}]}, "requests_per_minute must be >= 1"),
        ({"tenants": ["alpha"]}, "tenants: expected a mapping"),
        (
            {"models": [{"name": "smollm2-135m-instruct", "gguf": "m.gguf", "max_completion_tokens": 4096}]},
            "max_completion_tokens must be >= 1 and < max_context_tokens",
        ),
        ({"models": [{"name": "smollm2-135m-instruct"}]}, "models: .*gguf"),
    ],
)
def test_invalid_config_names_field(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    path = write_config(tmp_path, changes)

    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_missing_package_for_model_fails() -> None:
    config = load_config(environ={})
    model = config.model("smollm2-135m-instruct")
    assert model is not None
    missing = type(model)(name="m", gguf="package:no_such_package_here/model.gguf")

    with pytest.raises(ConfigError, match="package 'no_such_package_here' is not installed"):
        missing.gguf_path()


def test_gguf_plain_path_expands_home() -> None:
    config = load_config(environ={})
    model = config.model("smollm2-135m-instruct")
    assert model is not None
    local = type(model)(name="m", gguf="~/models/m.gguf")

    assert local.gguf_path() == Path.home() / "models" / "m.gguf"
