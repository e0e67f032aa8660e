"""``python -m mesh.services.gateway`` starts, says how authentication is set, serves, and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import httpx

from tests.conftest import free_port

# Every service on a port where nothing listens (a mesh on the default ports may be running nearby).
NO_SERVICES = {
    **{f"MESH_{name}_SERVICE_ADDRESS": "127.0.0.1:1" for name in ("FILE", "IMAGE", "INFERENCE", "QUEUE")},
    **{f"MESH_{name}_SERVICE_HTTP": "127.0.0.1:1" for name in ("FILE", "IMAGE", "INFERENCE", "QUEUE")},
    "MESH_GRACE_SECONDS": "1",
    "MESH_HEALTH_TIMEOUT_SECONDS": "0.5",
}


async def _gateway(port: int) -> asyncio.subprocess.Process:
    """The gateway as a process on ``port`` of 127.0.0.1, every service it calls away; its stderr piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.services.gateway",
        env={**os.environ, **NO_SERVICES, "MESH_HTTP_PORT": str(port), "MESH_HTTP_HOST": "127.0.0.1"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_process_starts_logs_auth_mode_and_stops_on_sigterm() -> None:
    """The process serves /healthz on its port, logs that authentication is off, and exits 0 on SIGTERM."""
    port = free_port()
    process = await _gateway(port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(150):
                try:
                    response = await client.get("/healthz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the gateway never answered")
            assert response.status_code == 200
            assert "traceparent" in response.headers
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert {c["name"] for c in ready.json()["failing"]} >= {"file service", "queue service"}
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    log = stderr.decode()
    assert "authentication is OFF" in log
    assert '"auth_mode": "off"' in log


async def test_bad_setting_exits_2_naming_the_variable() -> None:
    """An invalid MESH_AUTH_MODE stops the start with status 2 and names the variable."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.services.gateway",
        env={**os.environ, "MESH_AUTH_MODE": "maybe"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert "MESH_AUTH_MODE" in stderr.decode()


async def test_a_port_in_use_stops_the_start_with_one_line() -> None:
    """An HTTP port another process holds: exit 2 with one line naming it (uvicorn's own exit left status 3)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        process = await _gateway(port)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2, stderr.decode()
    last = stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"gateway: cannot start: HTTP port 127.0.0.1:{port} could not be bound")
