"""The command-line entry point and stop signal handling shared by every service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from services.common.config import Config, ConfigError, load_config
from services.common.logs import setup_logging


def run_service(
    module: str,
    service_name: str,
    description: str,
    serve: Callable[[Config], Coroutine[Any, Any, None]],
    argv: list[str] | None = None,
    startup_errors: tuple[type[Exception], ...] = (),
) -> int:
    """Parse ``python -m MODULE`` arguments, set up logging and run ``serve`` until it returns.

    Returns 2, after logging the reason, when the config is invalid or
    ``serve`` raises one of ``startup_errors``; otherwise 0.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--config", help="config file (default: $TENANTSERVE_CONFIG, else the packaged default)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    parser.add_argument("--log-format", choices=("json", "text"), default="json", help="log line format on stderr")
    args = parser.parse_args(argv)

    setup_logging(service_name, args.log_level, json_lines=args.log_format == "json")
    try:
        config = load_config(args.config)
        asyncio.run(serve(config))
    except (ConfigError, *startup_errors) as exc:
        logging.getLogger(module).error("cannot start: %s", exc)
        return 2
    return 0


async def wait_for_stop_signal() -> None:
    """Return once the process receives SIGTERM or SIGINT."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop_requested.set)
    await stop_requested.wait()
