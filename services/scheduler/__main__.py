"""Run the scheduler service: ``python -m services.scheduler [--config PATH]``."""

from __future__ import annotations

import sys

from services.common.service_main import run_service

from .server import serve


def main(argv: list[str] | None = None) -> int:
    return run_service("services.scheduler", "scheduler", __doc__, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
