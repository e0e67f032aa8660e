"""Stopping the benchmarks' child processes: SIGTERM (each service drains), then SIGKILL after a grace."""

from __future__ import annotations

import signal
import subprocess


def stop(child: subprocess.Popen[bytes], grace_seconds: float = 15.0) -> None:
    """Ask ``child`` to stop and wait for it; kill it when it outlives ``grace_seconds``."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        child.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
