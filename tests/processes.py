"""Helpers for tests that run a service of the mesh as a process of its own."""

from __future__ import annotations

import asyncio
import json


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
