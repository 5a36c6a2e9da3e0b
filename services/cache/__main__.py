"""Run the cache service: ``python -m services.cache [--config PATH]``."""

from __future__ import annotations

import sys

from services.common.service_main import run_service

from .server import serve


def main(argv: list[str] | None = None) -> int:
    return run_service("services.cache", "cache", __doc__, serve, argv, startup_errors=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
