"""Helpers for tests that run a service of the mesh as a process of its own."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Mapping


async def read_started(process: asyncio.subprocess.Process) -> dict[str, object]:
    """The JSON log line that announces the started service (its ports), read from the process's stderr."""
    assert process.stderr is not None
    while True:
        line = await process.stderr.readline()
        if not line:
            raise AssertionError("the service exited before it started")
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "service started":
            return dict(event)


def refused_start(
    command: list[str], env: Mapping[str, str], *, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``command`` (a service's process) run to its end, having checked that it refused to start as a
    :class:`~mesh.kit.errors.StartupError` makes it: status 2 and no traceback (its reason: :func:`reason`)."""
    done = subprocess.run(command, env=dict(env), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    return done


def reason(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused start ends its stderr with (``<service>: cannot start: ...``)."""
    return done.stderr.strip().splitlines()[-1]
