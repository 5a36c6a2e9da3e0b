"""`tenantserve admin`: manage tenants and certificates through the Admin API.

Every command connects to admission with an admin certificate
(``<cert_dir>/admins/<name>.crt``, created by ``tenantserve certs add-admin``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2

from services.common import certs, tls
from services.common.config import SERVICE_CLASS_NAMES, Config
from tenantserve.v1 import admin_pb2, admin_pb2_grpc, common_pb2

DEFAULT_ADMIN = "admin"
CALL_TIMEOUT_SECONDS = 10.0
INTEGER_LIMIT_FLAGS = {
    "requests_per_minute": "requests admitted in any 60 s window (>= 1)",
    "tokens_per_minute": "prompt plus completion tokens in any 60 s window; 0 = no limit",
    "max_concurrent_streams": "streams open at once (>= 1)",
    "daily_token_budget": "tokens per UTC day; 0 = no limit",
    "monthly_token_budget": "tokens per UTC month; 0 = no limit",
    "max_prompt_tokens": "largest prompt in tokens; 0 = no limit",
    "max_tokens": "largest sampling.max_tokens; 0 = no limit",
}
SERVICE_CLASS_VALUES = {
    "interactive": common_pb2.SERVICE_CLASS_INTERACTIVE,
    "batch": common_pb2.SERVICE_CLASS_BATCH,
    "background": common_pb2.SERVICE_CLASS_BACKGROUND,
}


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `admin` command and its subcommands to the `tenantserve` parser."""
    admin = commands.add_parser("admin", help="manage tenants and certificates (needs an admin certificate)")
    admin.add_argument(
        "--as", dest="admin_name", default=DEFAULT_ADMIN, help=f"admin certificate to use (default: {DEFAULT_ADMIN})"
    )
    admin_commands = admin.add_subparsers(dest="admin_command", required=True)

    admin_commands.add_parser("list", help="list tenants and their limits")

    create = admin_commands.add_parser("create", help="create a tenant; unset limits take their defaults")
    create.add_argument("name", help="tenant id")
    _add_limit_flags(create)

    set_limits = admin_commands.add_parser("set-limits", help="change some limits of a tenant; others stay")
    set_limits.add_argument("name", help="tenant id")
    _add_limit_flags(set_limits)

    for command, text in (("disable", "reject every request of a tenant"), ("enable", "admit a disabled tenant again")):
        parser = admin_commands.add_parser(command, help=text)
        parser.add_argument("name", help="tenant id")

    issue = admin_commands.add_parser("issue-cert", help="issue a new tenant certificate and write it with its key")
    issue.add_argument("name", help="tenant id")
    issue.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    issue.add_argument("--out", type=Path, help="directory for NAME.crt and NAME.key (default: <cert_dir>/tenants)")

    revoke = admin_commands.add_parser("revoke", help="revoke a certificate on every admission replica")
    revoke.add_argument("certificate", help="SHA-256 fingerprint (hex, colons allowed) or a PEM certificate file")


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    for limit, text in INTEGER_LIMIT_FLAGS.items():
        parser.add_argument(f"--{limit.replace('_', '-')}", dest=limit, type=int, metavar="N", help=text)
    parser.add_argument("--weight", type=float, help="share of capacity relative to other tenants (> 0)")
    parser.add_argument("--allowed-models", help="comma-separated model names; an empty string allows all")
    parser.add_argument(
        "--allowed-service-classes", help=f"comma-separated, from {', '.join(SERVICE_CLASS_NAMES)}; empty allows all"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="CLASS.LIMIT=VALUE",
        help="a limit for one service class, for example batch.requests_per_minute=5; repeat for more. "
        "Given once, it replaces every override of the tenant",
    )


def run(args: argparse.Namespace, config: Config) -> int:
    """Run one `tenantserve admin` subcommand; return the exit status."""
    try:
        return asyncio.run(_run(args, config))
    except grpc.aio.AioRpcError as exc:
        print(f"tenantserve admin: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"tenantserve admin: {exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, config: Config) -> int:
    credentials = tls.admin_channel_credentials(config.tls.cert_dir, args.admin_name)
    async with tls.secure_channel(config.admission.target, credentials) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        command = args.admin_command
        if command == "list":
            response = await stub.ListTenants(admin_pb2.ListTenantsRequest(), timeout=CALL_TIMEOUT_SECONDS)
            print_tenants(response.tenants)
        elif command == "create":
            tenant, _ = tenant_from_flags(args)
            print_tenants([await stub.CreateTenant(admin_pb2.CreateTenantRequest(tenant=tenant), timeout=CALL_TIMEOUT_SECONDS)])
        elif command == "set-limits":
            tenant, paths = tenant_from_flags(args)
            if not paths:
                raise ValueError("set-limits needs at least one limit flag, for example --requests-per-minute 5")
            request = admin_pb2.UpdateTenantRequest(tenant=tenant, update_mask=field_mask_pb2.FieldMask(paths=paths))
            print_tenants([await stub.UpdateTenant(request, timeout=CALL_TIMEOUT_SECONDS)])
        elif command == "disable":
            print_tenants([await stub.DisableTenant(admin_pb2.DisableTenantRequest(name=args.name), timeout=CALL_TIMEOUT_SECONDS)])
        elif command == "enable":
            print_tenants([await stub.EnableTenant(admin_pb2.EnableTenantRequest(name=args.name), timeout=CALL_TIMEOUT_SECONDS)])
        elif command == "issue-cert":
            await issue_certificate(stub, args, config)
        else:
            await revoke_certificate(stub, args.certificate)
    return 0


def tenant_from_flags(args: argparse.Namespace) -> tuple[admin_pb2.Tenant, list[str]]:
    """Return a Tenant with the flags' values and the field names that the flags set."""
    tenant = admin_pb2.Tenant(name=args.name)
    paths = []
    for limit in INTEGER_LIMIT_FLAGS:
        value = getattr(args, limit)
        if value is not None:
            setattr(tenant, limit, value)
            paths.append(limit)
    if args.weight is not None:
        tenant.weight = args.weight
        paths.append("weight")
    if args.allowed_models is not None:
        tenant.allowed_models.extend(_split(args.allowed_models))
        paths.append("allowed_models")
    if args.allowed_service_classes is not None:
        tenant.allowed_service_classes.extend(_service_class(name) for name in _split(args.allowed_service_classes))
        paths.append("allowed_service_classes")
    if args.override:
        tenant.service_class_overrides.extend(_parse_overrides(args.override))
        paths.append("service_class_overrides")
    if args.admin_command == "create":
        _fill_create_defaults(tenant, paths)
    return tenant, paths


def _fill_create_defaults(tenant: admin_pb2.Tenant, paths: list[str]) -> None:
    # The proto has no field presence, so unset required limits get the
    # config file's defaults here rather than an invalid 0.
    if "weight" not in paths:
        tenant.weight = 1.0
    if "requests_per_minute" not in paths:
        tenant.requests_per_minute = 600
    if "max_concurrent_streams" not in paths:
        tenant.max_concurrent_streams = 8


def _parse_overrides(values: list[str]) -> list[admin_pb2.ServiceClassOverride]:
    limits_by_class: dict[str, dict[str, int]] = {}
    for value in values:
        key, equals, number = value.partition("=")
        class_name, dot, limit = key.partition(".")
        if not equals or not dot:
            raise ValueError(f"--override {value!r} is invalid; use CLASS.LIMIT=VALUE, for example batch.max_tokens=256")
        _service_class(class_name)
        try:
            limits_by_class.setdefault(class_name, {})[limit] = int(number)
        except ValueError:
            raise ValueError(f"--override {value!r}: {number!r} is not an integer") from None
    return [
        admin_pb2.ServiceClassOverride(service_class=SERVICE_CLASS_VALUES[name], limits=limits)
        for name, limits in limits_by_class.items()
    ]


def _service_class(name: str) -> int:
    if name not in SERVICE_CLASS_VALUES:
        raise ValueError(f"service class {name!r} is invalid; use {', '.join(SERVICE_CLASS_NAMES)}")
    return SERVICE_CLASS_VALUES[name]


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


async def issue_certificate(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace, config: Config) -> None:
    out_dir = args.out or config.tls.cert_dir / "tenants"
    cert_path, key_path = out_dir / f"{args.name}.crt", out_dir / f"{args.name}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; pass --out DIR to write the new certificate elsewhere")
    request = admin_pb2.IssueCertificateRequest(tenant_id=args.name, valid_days=args.days)
    response = await stub.IssueCertificate(request, timeout=CALL_TIMEOUT_SECONDS)

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_new(key_path, response.private_key_pem.encode(), 0o600)
    _write_new(cert_path, response.certificate_pem.encode(), 0o644)
    print(f"tenant {args.name}: certificate {cert_path}, key {key_path}")
    print(f"fingerprint (SHA-256) {response.fingerprint_sha256}")


async def revoke_certificate(stub: admin_pb2_grpc.AdminStub, certificate: str) -> None:
    path = Path(certificate)
    fingerprint = certs.certificate_fingerprint(path.read_bytes()) if path.is_file() else certificate
    request = admin_pb2.RevokeCertificateRequest(fingerprint_sha256=fingerprint)
    response = await stub.RevokeCertificate(request, timeout=CALL_TIMEOUT_SECONDS)
    state = "was already revoked" if response.already_revoked else "is revoked"
    print(f"certificate {response.fingerprint_sha256} {state}")


def print_tenants(tenants: list[admin_pb2.Tenant]) -> None:
    """Print one block per tenant: its state, then every limit that is set."""
    for tenant in tenants:
        state = "disabled" if tenant.disabled else "enabled"
        print(f"{tenant.name} ({state}, version {tenant.version})")
        print(f"  weight {tenant.weight:g}")
        for limit in INTEGER_LIMIT_FLAGS:
            value = getattr(tenant, limit)
            print(f"  {limit} {value if value else 'no limit'}")
        models = ", ".join(tenant.allowed_models) or "all"
        classes = ", ".join(_class_name(value) for value in tenant.allowed_service_classes) or "all"
        print(f"  allowed_models {models}")
        print(f"  allowed_service_classes {classes}")
        for override in tenant.service_class_overrides:
            limits = ", ".join(f"{name} {value}" for name, value in sorted(override.limits.items()))
            print(f"  {_class_name(override.service_class)} overrides: {limits}")


def _class_name(value: int) -> str:
    return next((name for name, number in SERVICE_CLASS_VALUES.items() if number == value), str(value))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
