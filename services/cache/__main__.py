"""Run the cache service: ``python -m services.cache [--config PATH]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from services.common.config import ConfigError, load_config
from services.common.logs import setup_logging

from .server import serve

logger = logging.getLogger("services.cache")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.cache", description=__doc__)
    parser.add_argument("--config", help="config file (default: $TENANTSERVE_CONFIG, else the packaged default)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    parser.add_argument("--log-format", choices=("json", "text"), default="json", help="log line format on stderr")
    args = parser.parse_args(argv)

    setup_logging("cache", args.log_level, json_lines=args.log_format == "json")
    try:
        config = load_config(args.config)
        asyncio.run(serve(config))
    except (ConfigError, FileNotFoundError) as exc:
        logger.error("cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
