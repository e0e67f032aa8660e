"""Drive one scenario with N concurrent callers, bounded by time and by count."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx

from mesh.tools.load.mesh import Mesh
from mesh.tools.load.scenarios import HttpStatusError, ItemError, JobNotSucceeded, Scenario
from mesh.tools.load.stats import Recorder


async def call_once(scenario: Scenario, mesh: Mesh, recorder: Recorder, timeout: float | None = None) -> None:
    """Make one call and record its latency and status (the gRPC code name, or the error's own code).

    A call still running after ``timeout`` seconds is cancelled and recorded as ``CLIENT_TIMEOUT``.
    """
    started = time.perf_counter_ns()
    status, detail = "OK", ""
    try:
        async with asyncio.timeout(timeout):
            await scenario.run(mesh)
    except httpx.HTTPError as error:
        status, detail = "HTTP_" + type(error).__name__, str(error)
    except TimeoutError:
        status, detail = "CLIENT_TIMEOUT", f"still running {timeout:.1f}s after it started, at the run's end"
    except grpc.aio.AioRpcError as error:
        status, detail = error.code().name, error.details() or ""
    except (ItemError, JobNotSucceeded, HttpStatusError) as error:
        status, detail = error.code, str(error)
    recorder.add(time.perf_counter_ns() - started, status, detail)


async def run_scenario(
    scenario: Scenario, mesh: Mesh, *, concurrency: int, duration: float, count: int, grace: float = 10.0
) -> tuple[Recorder, int]:
    """Run ``scenario`` until ``duration`` seconds pass or ``count`` calls started; returns the recorder and
    the wall time in nanoseconds. Calls still in flight ``grace`` seconds after the end are cut off."""
    recorder = Recorder(scenario.name, scenario.call)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration
    started_calls = 0

    async def caller() -> None:
        nonlocal started_calls
        while loop.time() < deadline and started_calls < count:
            started_calls += 1
            await call_once(scenario, mesh, recorder, timeout=deadline - loop.time() + grace)

    began = time.perf_counter_ns()
    await asyncio.gather(*(caller() for _ in range(max(1, concurrency))))
    return recorder, time.perf_counter_ns() - began
