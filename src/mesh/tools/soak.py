"""A soak test of the running mesh: N minutes (default 10) of mixed load with each process's memory sampled.

The mix: uploads (1080p JPEG streamed, strip photos unary), synchronous processing of the 1080p photo,
strip-reader predictions and jobs (submit, then every job is followed to a terminal state). Every
``--sample-seconds`` the resident memory (RSS) of each process whose command line names
``mesh.services.`` is recorded (psutil).

Pass criteria, printed with the numbers as one JSON object (exit 0 only if all hold):

- zero errors: every call OK and every job SUCCEEDED;
- zero lost jobs: every accepted job reaches a terminal state within ``--drain-seconds`` after the load;
- no process exits during the run;
- memory growth per process under the bound: the median RSS of the last tenth of the run minus the median of
  the tenth after warm-up (the first tenth is warm-up: caches, pools and allocator arenas fill) is at most
  ``--memory-bound-mib`` (default 64 MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil

from mesh.kit.cli import positive_float, positive_int
from mesh.kit.settings import MeshSettings, load_settings
from mesh.queue.v1 import job_pb2, queue_service_pb2
from mesh.tools.load.mesh import (
    DEFAULT_GATEWAY_URL,
    SERVICES,
    TERMINAL_STATES,
    Mesh,
    MeshNotUp,
    address_of,
    is_loopback,
    url_address,
)
from mesh.tools.load.runner import call_once
from mesh.tools.load.scenarios import SCENARIOS, Scenario
from mesh.tools.load.stats import Recorder

PROCESS_MARKER = "mesh.services."
MIB = 1024 * 1024
# Scenario -> weight in the mix.
MIX = {
    "file.upload": 1,
    "file.create": 2,
    "image.process": 2,
    "inference.predict": 3,
    "queue.submit": 2,
    "queue.submit_pipeline": 1,
    "queue.get": 1,
    "gateway.predict": 1,
    "gateway.get_image": 1,
}


@dataclass
class MemorySeries:
    """RSS samples of one process."""

    label: str
    samples: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since start, RSS bytes)."""
    exited_at: float | None = None


def discover_processes(marker: str = PROCESS_MARKER, ports: Collection[int] = ()) -> dict[int, str]:
    """pid -> label (``module[pid]``) of every process whose command line mentions ``marker``.

    With ``ports``, only the processes listening on one of them, and their children that also match
    ``marker`` (workers), count: other copies of the services on this machine (tests) are left out.
    """
    candidates = {}
    for process in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        module = next((part for part in cmdline if part.startswith(marker)), None)
        if module is not None:
            candidates[process.info["pid"]] = (f"{module}[{process.info['pid']}]", process.info["ppid"])
    if not ports:
        return {pid: label for pid, (label, _) in candidates.items()}
    listening = {
        conn.pid
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in ports and conn.pid
    }
    chosen = {pid for pid in candidates if pid in listening}
    chosen |= {pid for pid, (_, parent) in candidates.items() if parent in chosen}
    return {pid: candidates[pid][0] for pid in sorted(chosen)}


def mesh_ports(settings: MeshSettings, gateway_url: str = DEFAULT_GATEWAY_URL) -> set[int]:
    """The gRPC ports of the services under test, and the gateway's HTTP port."""
    ports = {int(address_of(settings, service).rsplit(":", 1)[1]) for service in SERVICES}
    return ports | {int(url_address(gateway_url).rsplit(":", 1)[1])}


def sample_memory(series: dict[int, MemorySeries], elapsed: float) -> None:
    """Add one RSS sample per known process; mark the ones that have gone."""
    for pid, entry in series.items():
        if entry.exited_at is not None:
            continue
        try:
            entry.samples.append((elapsed, psutil.Process(pid).memory_info().rss))
        except psutil.NoSuchProcess:
            entry.exited_at = elapsed


def memory_verdict(entry: MemorySeries, duration: float, bound_mib: float) -> dict[str, Any]:
    """Baseline (median of the second tenth), final (median of the last tenth), peak, growth and slope."""
    tenth = duration / 10
    baseline = [rss for t, rss in entry.samples if tenth <= t < 2 * tenth]
    final = [rss for t, rss in entry.samples if t >= duration - tenth]
    after_warmup = [(t, rss) for t, rss in entry.samples if t >= tenth]
    if not baseline or not final:
        return {
            "process": entry.label,
            "ok": False,
            "reason": "too few samples",
            "samples": len(entry.samples),
        }
    growth = (statistics.median(final) - statistics.median(baseline)) / MIB
    slope = 0.0
    if len(after_warmup) >= 2:
        times = [t / 60 for t, _ in after_warmup]
        values = [rss / MIB for _, rss in after_warmup]
        slope = statistics.linear_regression(times, values).slope
    ok = growth <= bound_mib and entry.exited_at is None
    return {
        "process": entry.label,
        "baseline_mib": round(statistics.median(baseline) / MIB, 1),
        "final_mib": round(statistics.median(final) / MIB, 1),
        "peak_mib": round(max(rss for _, rss in entry.samples) / MIB, 1),
        "growth_mib": round(growth, 1),
        "slope_mib_per_min": round(slope, 2),
        "bound_mib": bound_mib,
        "exited": entry.exited_at is not None,
        "samples": len(entry.samples),
        "ok": ok,
    }


def job_accounting(states: Mapping[str, int]) -> dict[str, int]:
    """Counts of submitted jobs by outcome; ``lost`` are those not terminal (or not found) at the end."""
    counts = {"submitted": len(states), "succeeded": 0, "failed": 0, "dead": 0, "cancelled": 0, "lost": 0}
    names: dict[int, str] = {
        job_pb2.JOB_STATE_SUCCEEDED: "succeeded",
        job_pb2.JOB_STATE_FAILED: "failed",
        job_pb2.JOB_STATE_DEAD: "dead",
        job_pb2.JOB_STATE_CANCELLED: "cancelled",
    }
    for state in states.values():
        counts[names.get(state, "lost")] += 1
    return counts


def pick(rng: random.Random, mix: dict[str, int]) -> str:
    """A scenario name drawn with the mix's weights."""
    return rng.choices(list(mix), weights=list(mix.values()))[0]


async def final_states(mesh: Mesh, job_ids: list[str], drain_seconds: float) -> dict[str, int]:
    """Poll every job until all are terminal or the drain time is over; returns job id -> last state."""
    states: dict[str, int] = dict.fromkeys(job_ids, int(job_pb2.JOB_STATE_UNSPECIFIED))
    deadline = time.monotonic() + drain_seconds
    while True:
        pending = [job_id for job_id, state in states.items() if state not in TERMINAL_STATES]
        for job_id in pending:
            try:
                job = (
                    await mesh.queue.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id), timeout=10)
                ).job
                states[job_id] = int(job.state)
            except grpc.aio.AioRpcError:
                continue
        if all(state in TERMINAL_STATES for state in states.values()) or time.monotonic() > deadline:
            return states
        await asyncio.sleep(1.0)


async def soak(args: argparse.Namespace, settings: MeshSettings) -> dict[str, Any]:
    duration = args.minutes * 60
    mesh = Mesh(settings, gateway_url=args.gateway_url)
    try:
        await mesh.check_up({*SERVICES, "gateway"})
        await mesh.seed(set(SERVICES))
        processes = discover_processes(ports=mesh_ports(settings, args.gateway_url))
        if not processes:
            raise MeshNotUp(
                "no process listening on the mesh's ports has `mesh.services.` on its command line"
            )
        series = {pid: MemorySeries(label) for pid, label in processes.items()}
        recorders = {name: Recorder(name, SCENARIOS[name].call) for name in MIX}
        rng = random.Random(args.seed)
        started = time.monotonic()
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                sample_memory(series, time.monotonic() - started)
                if any(entry.exited_at is not None for entry in series.values()):
                    stop.set()  # a mesh process died: the run has failed, stop loading a broken mesh
                    return
                try:
                    await asyncio.wait_for(stop.wait(), args.sample_seconds)
                except TimeoutError:
                    continue

        async def caller() -> None:
            while time.monotonic() - started < duration and not stop.is_set():
                name = pick(rng, MIX)
                scenario: Scenario = SCENARIOS[name]
                await call_once(scenario, mesh, recorders[name])
                if len(mesh.uploaded) > 200:  # keep the blob store from growing without bound
                    await mesh.delete_uploaded()

        sampling = asyncio.create_task(sampler())
        await asyncio.gather(*(caller() for _ in range(args.concurrency)))
        elapsed = time.monotonic() - started
        stop.set()
        await sampling
        states = await final_states(mesh, list(mesh.submitted), args.drain_seconds)
        await mesh.delete_uploaded()
    finally:
        await mesh.close()

    jobs = job_accounting(states)
    memory = [memory_verdict(entry, elapsed, args.memory_bound_mib) for entry in series.values()]
    call_errors = sum(r.error_count for r in recorders.values())
    job_errors = jobs["failed"] + jobs["dead"] + jobs["cancelled"]
    return {
        "soak": {
            "minutes": round(elapsed / 60, 2),
            "concurrency": args.concurrency,
            "calls": sum(r.count for r in recorders.values()),
            "errors": call_errors + job_errors,
            "lost_jobs": jobs["lost"],
            "memory_ok": all(m["ok"] for m in memory) and bool(memory),
            "passed": call_errors + job_errors == 0
            and jobs["lost"] == 0
            and bool(memory)
            and all(m["ok"] for m in memory),
        },
        "jobs": jobs,
        "memory": memory,
        "scenarios": [
            recorder.report(int(elapsed * 1e9), {"concurrency": args.concurrency})
            for recorder in recorders.values()
        ],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mesh.tools.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=positive_float, default=10.0)
    parser.add_argument("--concurrency", type=positive_int, default=4)
    parser.add_argument("--sample-seconds", type=positive_float, default=5.0)
    parser.add_argument(
        "--drain-seconds",
        type=positive_float,
        default=120.0,
        help="how long jobs may take to end after the load",
    )
    parser.add_argument(
        "--memory-bound-mib", type=positive_float, default=64.0, help="allowed RSS growth per process"
    )
    parser.add_argument("--gateway-url", default=DEFAULT_GATEWAY_URL)
    parser.add_argument("--seed", type=int, default=6, help="seed of the scenario mix")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(MeshSettings)
    remote = [s for s in SERVICES if not is_loopback(address_of(settings, s))]
    if not is_loopback(url_address(args.gateway_url)):
        remote.append("gateway")
    if remote:
        print(f"soak: refusing non-loopback targets: {', '.join(remote)}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(soak(args, settings))
    except MeshNotUp as error:
        print(f"soak: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0 if report["soak"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
