"""Build and start a tenantserve gRPC server: mutual TLS, peer check, health, reflection."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.identity import PeerKind, peer_from_context
from services.common.tls import SERVER_OPTIONS, server_credentials

logger = logging.getLogger(__name__)

# Reachable by any peer with a verified certificate, whatever the allowed_peer setting.
OPEN_SERVICE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

RegisterFn = Callable[[grpc.aio.Server], Iterable[str]]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    # Port the server bound; the real one when ``listen`` asked for port 0.
    port: int
    health: health.aio.HealthServicer

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, then stop, letting running RPCs finish for ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    service_name: str,
    listen: str,
    cert_dir: Path,
    register: RegisterFn,
    *,
    allowed_peer: PeerKind | None = PeerKind.SERVICE,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    extra_options: Sequence[tuple[str, int]] = (),
) -> RunningServer:
    """Start a gRPC server for ``service_name`` on ``listen`` (host:port, port 0 picks a free one).

    ``register(server)`` adds the servicers and returns their full service
    names (for example ``tenantserve.v1.Worker``). The server requires a
    client certificate signed by the CA in ``cert_dir``. With
    ``allowed_peer`` set, every RPC from a peer of another kind fails with
    PERMISSION_DENIED, except health checks and reflection; None leaves
    the peer check to the servicers. ``interceptors`` run after that
    check. ``extra_options`` are added to ``SERVER_OPTIONS``, for example
    ``MAX_CONNECTION_AGE_OPTIONS`` on servers that tenants connect to. That
    one is not for servers between services, because closing a connection
    also ends its long-lived streams once the grace period passes. The
    server certificate is reloaded when its files change. Raises
    RuntimeError when ``listen`` cannot be bound.
    """
    all_interceptors = [PeerKindInterceptor(allowed_peer)] if allowed_peer is not None else []
    all_interceptors += interceptors
    options = [*SERVER_OPTIONS, *extra_options]
    server = grpc.aio.server(interceptors=all_interceptors, options=options)
    service_names = list(register(server))

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )

    port = _bind(server, listen, server_credentials(cert_dir, service_name))
    await server.start()
    logger.info("%s gRPC server started on %s (port %d), services: %s", service_name, listen, port, service_names)
    return RunningServer(server=server, port=port, health=health_servicer)


def _bind(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials) -> int:
    try:
        port = server.add_secure_port(listen, credentials)
    except RuntimeError as exc:
        raise RuntimeError(f"failed to bind gRPC server to {listen}: {exc}") from exc
    # Older grpcio versions return 0 instead of raising.
    if port == 0:
        raise RuntimeError(f"failed to bind gRPC server to {listen}; is the address in use?")
    return port


class PeerKindInterceptor(grpc.aio.ServerInterceptor):
    """Reject RPCs whose client certificate is not of the allowed peer kind.

    The check runs inside the handler because only the servicer context
    carries the peer's certificate; it happens before the handler's code.
    """

    def __init__(self, allowed_peer: PeerKind) -> None:
        self._allowed_peer = allowed_peer
        self._message = f"a {allowed_peer.value} certificate is required for this service"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICE_PREFIXES):
            return handler
        return wrap_handler(handler, self._check_peer)

    async def _check_peer(self, context: grpc.aio.ServicerContext) -> None:
        peer = peer_from_context(context)
        if peer is None or peer.kind is not self._allowed_peer:
            logger.warning("rejected peer %s: %s", context.peer(), "no tenantserve identity" if peer is None else peer)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, self._message)


CheckFn = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


def wrap_handler(handler: grpc.RpcMethodHandler, check: CheckFn) -> grpc.RpcMethodHandler:
    """Return ``handler`` with ``check(context)`` awaited before its behavior; ``check`` may abort."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_checked_unary(handler.unary_unary, check), **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_checked_unary(handler.stream_unary, check), **serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_checked_stream(handler.unary_stream, check), **serializers)
    return grpc.stream_stream_rpc_method_handler(_checked_stream(handler.stream_stream, check), **serializers)


def _checked_unary(behavior: Callable[..., Any], check: CheckFn) -> Callable[..., Awaitable[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(context)
        result = behavior(request, context)
        if inspect.isawaitable(result):
            result = await result
        return result

    return checked


def _checked_stream(behavior: Callable[..., Any], check: CheckFn) -> Callable[..., Any]:
    # grpc.aio rejects mixing yield and context.write in one handler, so the
    # wrapper keeps the style of the wrapped behavior.
    if inspect.isasyncgenfunction(behavior):

        async def checked_generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(context)
            async for response in behavior(request, context):
                yield response

        return checked_generator

    async def checked_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
        await check(context)
        result = behavior(request, context)
        if inspect.isawaitable(result):
            await result
        elif hasattr(result, "__aiter__"):
            async for response in result:
                await context.write(response)
        elif result is not None:
            for response in result:
                await context.write(response)

    return checked_writer
