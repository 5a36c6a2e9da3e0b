"""`tenantserve admin` against an in-process admission server."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import yaml

from services.admission.tenant_limits import get_tenant
from services.common import certs
from services.common.config import DEFAULT_CONFIG_PATH
from services.common.valkey import redis_client

from .support import make_cert_dir, make_config, running_admission

ROOT = Path(__file__).resolve().parents[2]


def unique_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def write_cli_config(path: Path, cert_dir: Path, port: int) -> Path:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["tls"]["cert_dir"] = str(cert_dir)
    raw["services"]["admission"]["listen"] = f"127.0.0.1:{port}"
    path.write_text(yaml.safe_dump(raw))
    return path


async def run_cli(config_path: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli.main",
        "--config",
        str(config_path),
        "admin",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def test_admin_cli_manages_tenants(tmp_path: Path, valkey_url: str) -> None:
    tenant, created = unique_name(), unique_name()
    cert_dir = make_cert_dir(tmp_path, [tenant])
    certs.add_admin(cert_dir, "admin")
    config = make_config(cert_dir, valkey_url, [{"name": tenant}])
    out_dir = tmp_path / "issued"

    async def main() -> dict[str, tuple[int, str, str]]:
        outputs = {}
        async with running_admission(config) as server:
            config_path = write_cli_config(tmp_path / "cli.yaml", cert_dir, server.port)
            outputs["create"] = await run_cli(config_path, "create", created, "--max-tokens", "64")
            outputs["set-limits"] = await run_cli(
                config_path,
                "set-limits",
                tenant,
                "--requests-per-minute",
                "5",
                "--allowed-service-classes",
                "interactive,batch",
                "--override",
                "batch.max_tokens=32",
            )
            outputs["set-limits none"] = await run_cli(config_path, "set-limits", tenant)
            outputs["disable"] = await run_cli(config_path, "disable", created)
            outputs["list"] = await run_cli(config_path, "list")
            outputs["issue-cert"] = await run_cli(config_path, "issue-cert", tenant, "--out", str(out_dir))
            outputs["revoke"] = await run_cli(config_path, "revoke", str(out_dir / f"{tenant}.crt"))
            outputs["revoke bad"] = await run_cli(config_path, "revoke", "not-a-fingerprint")
        return outputs

    outputs = asyncio.run(main())

    async def stored() -> tuple[object, object]:
        client = redis_client(valkey_url)
        try:
            return await get_tenant(client, tenant), await get_tenant(client, created)
        finally:
            await client.aclose()

    tenant_limits, created_limits = asyncio.run(stored())
    for command in ("create", "set-limits", "disable", "list", "issue-cert", "revoke"):
        assert outputs[command][0] == 0, f"{command}: {outputs[command][2]}"
    assert tenant_limits.requests_per_minute == 5
    assert tenant_limits.allowed_service_classes == ("interactive", "batch")
    assert tenant_limits.service_class_overrides == {"batch": {"max_tokens": 32}}
    assert created_limits.max_tokens == 64
    assert created_limits.requests_per_minute == 600
    assert created_limits.disabled
    assert f"{created} (disabled" in outputs["list"][1]
    assert f"{tenant} (enabled" in outputs["list"][1]
    assert (out_dir / f"{tenant}.key").stat().st_mode & 0o777 == 0o600
    issued_fingerprint = certs.certificate_fingerprint((out_dir / f"{tenant}.crt").read_bytes())
    assert f"certificate {issued_fingerprint} is revoked" in outputs["revoke"][1]
    assert outputs["set-limits none"][0] == 1
    assert "at least one limit flag" in outputs["set-limits none"][2]
    assert outputs["revoke bad"][0] == 1
    assert "INVALID_ARGUMENT" in outputs["revoke bad"][2]
