"""Keep the worker registered with the scheduler.

The worker opens Scheduler.RegisterWorker, sends a WorkerReport at once and
then every third of the heartbeat timeout that the scheduler returns. When
the scheduler is unreachable or the stream ends, it reconnects with
exponential backoff. Each change between registered and unregistered is
logged once, not every retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from services.common.tls import secure_channel
from tenantserve.v1 import scheduler_pb2, scheduler_pb2_grpc

logger = logging.getLogger(__name__)

# The scheduler's certificate always carries its service name as a DNS SAN,
# whatever address the worker reaches it by.
SCHEDULER_SERVER_NAME = "scheduler"
MIN_BACKOFF_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 5.0
# Used until the scheduler's first response sets the timeout.
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 5.0
MIN_HEARTBEAT_INTERVAL_SECONDS = 0.05


class SchedulerRegistration:
    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials,
        build_report: Callable[[], scheduler_pb2.WorkerReport],
    ) -> None:
        self._target = target
        self._credentials = credentials
        self._build_report = build_report
        self._heartbeat_timeout = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
        self._is_registered = False
        # Status code name of the last failure while unregistered; a new
        # code is logged once, a repeat of the same code is not.
        self._last_failure_code: str | None = None
        # Set whenever the scheduler accepts a report; tests wait on it.
        self.registered = asyncio.Event()

    async def run(self) -> None:
        """Register and send heartbeats until cancelled."""
        backoff = MIN_BACKOFF_SECONDS
        while True:
            try:
                async with secure_channel(self._target, self._credentials, server_name=SCHEDULER_SERVER_NAME) as channel:
                    await self._session(scheduler_pb2_grpc.SchedulerStub(channel))
                code, failure = "OK", "the scheduler closed the registration stream"
            except grpc.aio.AioRpcError as exc:
                code, failure = exc.code().name, f"{exc.code().name}: {exc.details()}"
            except asyncio.InvalidStateError:
                # grpc.aio raises it for a write after the scheduler ended the call.
                code, failure = "OK", "the scheduler closed the registration stream"
            except Exception as exc:
                logger.exception("registration with the scheduler at %s failed", self._target)
                code, failure = type(exc).__name__, str(exc)
            if self._is_registered:
                # The connection worked, so retry from the shortest backoff.
                backoff = MIN_BACKOFF_SECONDS
            self._set_unregistered(code, failure)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _session(self, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        """Send reports until the stream ends; returns on a clean end, raises AioRpcError otherwise."""
        call = stub.RegisterWorker()
        reader = asyncio.create_task(self._read_responses(call))
        try:
            while not reader.done():
                await call.write(self._build_report())
                interval = max(self._heartbeat_timeout / 3, MIN_HEARTBEAT_INTERVAL_SECONDS)
                await asyncio.wait({reader}, timeout=interval)
            await reader
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            call.cancel()

    async def _read_responses(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            if response.heartbeat_timeout_seconds > 0:
                self._heartbeat_timeout = response.heartbeat_timeout_seconds
            self._set_registered()

    def _set_registered(self) -> None:
        if not self._is_registered:
            logger.info("registered with the scheduler at %s", self._target)
        self._is_registered = True
        self._last_failure_code = None
        self.registered.set()

    def _set_unregistered(self, code: str, failure: str) -> None:
        if self._is_registered:
            logger.warning("lost the scheduler at %s (%s); reconnecting", self._target, failure)
        elif code != self._last_failure_code:
            logger.warning("cannot register with the scheduler at %s (%s); retrying with backoff", self._target, failure)
        self._is_registered = False
        self._last_failure_code = code
        self.registered.clear()
