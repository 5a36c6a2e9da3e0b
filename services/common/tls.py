"""Mutual-TLS credentials and channels built from the certificate directory."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.common.certs import ca_cert_path, service_cert_paths, tenant_cert_paths

INIT_HINT = "`tenantserve certs init`"

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Client keepalive: a ping every 30 s on an idle connection finds a dead peer
# (for example a worker host that lost power) within about 40 s (30 s idle + 10 s timeout).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

# Server side: accept the client pings above. After max_ping_strikes pings
# closer together than min_ping_interval the server closes the connection
# with GOAWAY, so that interval stays below the client's 30 s.
# grpcio sets SO_REUSEPORT by default. A second server could then bind the
# same port and silently take part of its connections, so it is turned off
# and binding a port in use fails.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.http2.max_ping_strikes", 2),
)


def server_credentials(cert_dir: Path, service_name: str) -> grpc.ServerCredentials:
    """Return server credentials for a service that require a client certificate from the CA."""
    cert_path, key_path = service_cert_paths(cert_dir, service_name)
    return grpc.ssl_server_credentials(
        [(_read(key_path, INIT_HINT), _read(cert_path, INIT_HINT))],
        root_certificates=_read(ca_cert_path(cert_dir), INIT_HINT),
        require_client_auth=True,
    )


def service_channel_credentials(cert_dir: Path, service_name: str) -> grpc.ChannelCredentials:
    """Return channel credentials that present the service's certificate."""
    cert_path, key_path = service_cert_paths(cert_dir, service_name)
    return _channel_credentials(cert_dir, cert_path, key_path, INIT_HINT)


def tenant_channel_credentials(cert_dir: Path, tenant_id: str) -> grpc.ChannelCredentials:
    """Return channel credentials that present the tenant's certificate."""
    cert_path, key_path = tenant_cert_paths(cert_dir, tenant_id)
    return _channel_credentials(cert_dir, cert_path, key_path, f"`tenantserve certs add-tenant {tenant_id}`")


def secure_channel(
    target: str, credentials: grpc.ChannelCredentials, server_name: str | None = None
) -> grpc.aio.Channel:
    """Open an asyncio TLS channel to ``target`` (host:port).

    ``server_name`` replaces the host of ``target`` when checking the
    server certificate, for a target reached by an address that is not
    among the certificate's SANs.
    """
    options = list(CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, credentials, options=options)


def _channel_credentials(cert_dir: Path, cert_path: Path, key_path: Path, hint: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_cert_path(cert_dir), INIT_HINT),
        private_key=_read(key_path, hint),
        certificate_chain=_read(cert_path, hint),
    )


def _read(path: Path, hint: str) -> bytes:
    """Read a PEM file. ``hint`` names the command that creates it, for the error message."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"certificate file {path} not found; create it with {hint}") from None
