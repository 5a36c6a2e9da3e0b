"""Run the PyTorch worker: ``python -m services.worker_gpu [--config PATH]``."""

from __future__ import annotations

import sys

from services.common.service_main import run_service

from .server import serve


def main(argv: list[str] | None = None) -> int:
    return run_service("services.worker_gpu", "worker-gpu", __doc__, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
