"""Child process helpers shared by the launchers of Valkey and the services."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

# From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent dies.

    Meant as a Popen ``preexec_fn``, so that children of a launcher killed
    with SIGKILL do not live on as orphans. Does nothing on other systems.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
