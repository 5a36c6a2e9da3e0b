"""Mutual-TLS credentials and channels built from the certificate directory."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.certs import admin_cert_paths, ca_cert_path, service_cert_paths, tenant_cert_paths

logger = logging.getLogger(__name__)

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

# Servers that tenants connect to close each connection after about 15
# minutes (gRPC adds up to 10 % jitter) with GOAWAY, and give its open
# streams 5 more minutes, so that a rotated server certificate and a
# revoked client reach every connection. Clients reconnect by themselves.
MAX_CONNECTION_AGE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_connection_age_ms", 15 * 60_000),
    ("grpc.max_connection_age_grace_ms", 5 * 60_000),
)


def server_credentials(cert_dir: Path, service_name: str) -> grpc.ServerCredentials:
    """Return server credentials for a service that require a client certificate from the CA.

    The credentials reload the service certificate, its key and the CA
    certificate when their files change (see ``CertificateReloader``), so a
    rotated certificate needs no restart.
    """
    reloader = CertificateReloader(cert_dir, service_name)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial_configuration(), reloader.fetch, require_client_authentication=True
    )


class CertificateReloader:
    """The certificate-configuration fetcher of dynamic server credentials.

    gRPC calls ``fetch`` from its own threads before each TLS handshake.
    It compares the files' (inode, size, mtime) with the last load, so an
    unchanged directory costs three ``stat`` calls. New files apply to new
    connections only; open connections keep their certificate until they
    close (see MAX_CONNECTION_AGE_OPTIONS). A certificate whose key does not
    match, as while the two files are being replaced one after the other,
    is skipped and the previous pair stays in use until the next handshake
    finds a matching pair.
    """

    def __init__(self, cert_dir: Path, service_name: str) -> None:
        self._cert_path, self._key_path = service_cert_paths(cert_dir, service_name)
        self._ca_path = ca_cert_path(cert_dir)
        self._lock = threading.Lock()
        self._loaded_stamp: tuple[tuple[int, int, int], ...] | None = None

    def initial_configuration(self) -> grpc.ServerCertificateConfiguration:
        """Load the files; raise FileNotFoundError naming a missing one, or ValueError for a key mismatch."""
        with self._lock:
            stamp = self._stamp()
            configuration = self._load()
            if configuration is None:
                raise ValueError(f"the key {self._key_path} does not match the certificate {self._cert_path}")
            self._loaded_stamp = stamp
            return configuration

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Return a new configuration when the files changed since the last load, else None."""
        with self._lock:
            try:
                stamp = self._stamp()
                if stamp == self._loaded_stamp:
                    return None
                configuration = self._load()
            except (OSError, ValueError) as exc:
                logger.warning("reloading the server certificate %s failed: %s; keeping the loaded one", self._cert_path, exc)
                return None
            if configuration is None:
                logger.warning("the key %s does not match the certificate %s yet; keeping the loaded pair", self._key_path, self._cert_path)
                return None
            self._loaded_stamp = stamp
            logger.info("loaded the changed server certificate %s", self._cert_path)
            return configuration

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in (self._cert_path, self._key_path, self._ca_path):
            try:
                status = os.stat(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"certificate file {path} not found; create it with {INIT_HINT}") from None
            stamps.append((status.st_ino, status.st_size, status.st_mtime_ns))
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration | None:
        """Read the files; return None when the key does not belong to the certificate."""
        cert_pem = _read(self._cert_path, INIT_HINT)
        key_pem = _read(self._key_path, INIT_HINT)
        ca_pem = _read(self._ca_path, INIT_HINT)
        certificate = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if certificate.public_key() != key.public_key():
            return None
        return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca_pem)


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


def admin_channel_credentials(cert_dir: Path, admin_name: str) -> grpc.ChannelCredentials:
    """Return channel credentials that present an Admin API operator's certificate."""
    cert_path, key_path = admin_cert_paths(cert_dir, admin_name)
    return _channel_credentials(cert_dir, cert_path, key_path, f"`tenantserve certs add-admin {admin_name}`")


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
