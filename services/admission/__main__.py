"""Run the admission service: ``python -m services.admission [--config PATH]``."""

from __future__ import annotations

import sys

from services.common.service_main import run_service

from .server import serve


def main(argv: list[str] | None = None) -> int:
    return run_service("services.admission", "admission", __doc__, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
