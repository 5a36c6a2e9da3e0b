"""docker-compose.yml is valid Compose and agrees with the config."""

import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from services.common.config import SERVICE_SECTIONS, load_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpu.yml")


def compose_schema() -> dict:
    # docker-compose 1.29.2 carries the Compose specification's JSON schema.
    spec = importlib.util.find_spec("compose")
    assert spec is not None, "install it with: pip install --no-deps docker-compose==1.29.2"
    path = Path(spec.submodule_search_locations[0]) / "config" / "compose_spec.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("file_name", COMPOSE_FILES)
def test_compose_file_matches_schema(file_name: str) -> None:
    document = yaml.safe_load((ROOT / file_name).read_text())
    validator = jsonschema.Draft201909Validator(compose_schema())

    errors = [f"{error.json_path}: {error.message}" for error in validator.iter_errors(document)]

    assert errors == []


def test_compose_environment_overrides_load() -> None:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in document["services"].items():
        if service.get("image") != "tenantserve:latest":
            continue
        environment = {key: str(value) for key, value in (service.get("environment") or {}).items()}
        known_prefixes = tuple(f"TENANTSERVE_{section.upper()}_" for section in SERVICE_SECTIONS)
        for key in environment:
            assert key in ("TENANTSERVE_CERT_DIR", "TENANTSERVE_REDIS_URL") or key.startswith(known_prefixes), key

        config = load_config(environ=environment)

        assert config.scheduler.target == "scheduler:50052", name


def test_compose_hosts_are_in_certificates() -> None:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    hosts = load_config(environ={}).tls.hosts
    for name in ("admission", "scheduler", "worker-gpu"):
        assert name in document["services"]
        assert name in hosts
