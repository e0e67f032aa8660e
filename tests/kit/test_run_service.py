"""``run_service``, the one start of every service process: the wiring's resources are closed in reverse order
whether ``run()`` ends, ``run()`` fails or the wiring fails half way, and a StartupError is one line and exit 2.

Each case runs in a process of its own, as ``python -m mesh.services.<name>`` does: ``run_service`` sets up the
process's logging and tracing, which a test must not do to pytest's."""

from __future__ import annotations

import os
import subprocess
import sys

# A service whose wiring opens two resources; PROBE_FAILS says where it fails: "wiring" (a StartupError once the
# pool is open), "run" (run() raises) or nowhere (run() returns, as after SIGTERM and a drain).
SERVICE = """
import contextlib, os
from mesh.kit.errors import StartupError
from mesh.kit.runtime import run_service
from mesh.kit.settings import ServerSettings

FAILS = os.environ.get("PROBE_FAILS", "")

@contextlib.asynccontextmanager
async def resource(name):
    print("open", name, flush=True)
    try:
        yield
    finally:
        print("close", name, flush=True)

class Runtime:
    async def run(self):
        print("run", flush=True)
        if FAILS == "run":
            raise RuntimeError("the gRPC port could not be bound")

@contextlib.asynccontextmanager
async def probe_service(settings):
    async with resource("pool"):
        if FAILS == "wiring":
            raise StartupError("the blob directory /data is read-only; give uid 10001 write access")
        async with resource("channel"):
            yield Runtime()

run_service("probe", ServerSettings, probe_service)
"""


def _run(fails: str) -> subprocess.CompletedProcess[str]:
    # Without the caller's MESH_* variables, which start_service would report (one warning line each).
    env = {name: value for name, value in os.environ.items() if not name.startswith("MESH_")}
    return subprocess.run(
        [sys.executable, "-c", SERVICE],
        env={**env, "PROBE_FAILS": fails},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_wiring_is_entered_then_run_then_closed_in_reverse_order() -> None:
    """run() serves once the wiring has opened everything; when it returns (after a drain) the process closes
    what the wiring opened, last opened first, and exits 0."""
    done = _run("")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["open pool", "open channel", "run", "close channel", "close pool"]


def test_a_startup_error_half_way_through_the_wiring_closes_what_was_opened_and_exits_2_with_one_line() -> (
    None
):
    """A StartupError raised after the pool is open: the pool is closed, run() never starts, and the process
    exits 2 with exactly one stderr line naming the service and the fix (no traceback)."""
    done = _run("wiring")
    assert done.returncode == 2
    assert done.stdout.splitlines() == ["open pool", "close pool"]
    assert done.stderr == (
        "probe: cannot start: the blob directory /data is read-only; give uid 10001 write access\n"
    )


def test_a_run_that_fails_still_closes_the_wiring_and_exits_1() -> None:
    """Any other error out of run() (a port in use) closes every resource, last opened first, and ends the
    process with its traceback and status 1, for its supervisor to restart it."""
    done = _run("run")
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["open pool", "open channel", "run", "close channel", "close pool"]
    assert "RuntimeError: the gRPC port could not be bound" in done.stderr
