"""Processes started by `make up` stop when their supervisor dies, however it dies.

The supervisor starts each service in a session of its own (so that a terminal's Ctrl-C reaches only the
supervisor, which then stops them in order). It stops them on SIGINT, SIGTERM and SIGHUP; a supervisor that is
killed outright (SIGKILL, the OOM killer) cannot, and its services would run on holding the ports. Linux's
parent-death signal closes that gap: the kernel sends the service SIGTERM, which drains it as usual.
"""

from __future__ import annotations

import os
import signal
import sys

from mesh.kit.libc import linux_libc
from mesh.kit.text_fields import ascii_digits

SUPERVISOR_ENV = "MESH_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def stop_with_supervisor() -> bool:
    """Ask for SIGTERM when the supervisor named in MESH_SUPERVISOR_PID dies; True when that was arranged.

    Only for the supervisor's own children: a process started by a service (a worker) inherits the variable
    but has another parent, and is left alone. Elsewhere than Linux (no prctl) nothing happens.
    """
    supervisor = os.environ.get(SUPERVISOR_ENV, "")
    if (
        not ascii_digits(supervisor)
        or os.getppid() != int(supervisor)
        or not sys.platform.startswith("linux")
    ):
        return False
    libc = linux_libc()
    if libc is None:
        return False
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() != int(supervisor):  # it died between the check above and the prctl
        os.kill(os.getpid(), signal.SIGTERM)
    return True
