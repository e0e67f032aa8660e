"""``make load``: a bounded load test of the running mesh on loopback, one scenario per RPC.

Checks the mesh answers first (gRPC health of every service a scenario needs) and says clearly when it
does not; seeds an image and a job; then runs each scenario for ``--duration`` seconds or ``--count`` calls,
whichever comes first, with ``--concurrency`` callers, and prints one ghz-style JSON object per scenario.
The same scenarios, for ghz, are the configs in deploy/load/ (``--write-payloads`` writes their data files).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mesh.kit.cli import positive_float, positive_int
from mesh.kit.settings import MeshSettings, load_settings
from mesh.tools.load import payloads
from mesh.tools.load.mesh import DEFAULT_GATEWAY_URL, Mesh, MeshNotUp, address_of, is_loopback, url_address
from mesh.tools.load.runner import run_scenario
from mesh.tools.load.scenarios import SCENARIOS

PAYLOAD_DIR = Path("deploy/load/payloads")
# The gRPC scenarios, as in the ghz configs. The REST ones (gateway.*) are opt-in: the gateway's rate limit
# (MESH_RATE_LIMIT, 600/minute per client by default) answers 429 long before the mesh is saturated.
DEFAULT_SCENARIOS = [name for name in SCENARIOS if not name.startswith("gateway.")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mesh.tools.load", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="repeatable; default every gRPC scenario",
    )
    parser.add_argument(
        "--duration", type=positive_float, default=5.0, help="seconds per scenario (default 5)"
    )
    parser.add_argument(
        "--count", type=positive_int, default=2000, help="most calls per scenario (default 2000)"
    )
    parser.add_argument("--concurrency", type=positive_int, default=8, help="concurrent callers (default 8)")
    parser.add_argument(
        "--gateway-url", default=DEFAULT_GATEWAY_URL, help="the gateway, for the REST scenarios"
    )
    parser.add_argument("--output", type=Path, help="also write the reports as a JSON array here")
    parser.add_argument("--payload-dir", type=Path, default=PAYLOAD_DIR, help="where ghz data files go")
    parser.add_argument(
        "--write-payloads", action="store_true", help="only seed the mesh and write the ghz data files"
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, settings: MeshSettings) -> int:
    chosen = [SCENARIOS[name] for name in (args.scenario or DEFAULT_SCENARIOS)]
    services = set().union(*(s.services for s in chosen)) | (
        {"file", "queue"} if args.write_payloads else set()
    )
    targets = {s: address_of(settings, s) for s in services - {"gateway"}}
    if "gateway" in services:
        targets["gateway"] = url_address(args.gateway_url)
    remote = [f"{s}={address}" for s, address in sorted(targets.items()) if not is_loopback(address)]
    if remote:
        print(
            f"load: refusing non-loopback targets ({', '.join(remote)}); this tool loads a local mesh only",
            file=sys.stderr,
        )
        return 2
    mesh = Mesh(settings, gateway_url=args.gateway_url)
    try:
        try:
            await mesh.check_up(services)
        except MeshNotUp as error:
            print(f"load: {error}", file=sys.stderr)
            return 2
        await mesh.seed(services)
        payloads.write_payloads(args.payload_dir, mesh.ids)
        print(f"load: seeded {mesh.ids}; ghz data files in {args.payload_dir}", file=sys.stderr)
        for warning in mesh.warnings:
            print(f"load: warning: {warning}", file=sys.stderr)
        if args.write_payloads:
            return 0
        reports: list[dict[str, Any]] = []
        for scenario in chosen:
            recorder, total_ns = await run_scenario(
                scenario, mesh, concurrency=args.concurrency, duration=args.duration, count=args.count
            )
            options = {
                "concurrency": args.concurrency,
                "duration": f"{args.duration:g}s",
                "total": args.count,
            }
            report = recorder.report(total_ns, options)
            reports.append(report)
            print(json.dumps(report), flush=True)
        if args.output:
            args.output.write_text(json.dumps(reports, indent=2), encoding="utf-8")
        return 1 if any(r["errors"] for r in reports) else 0
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels this task, then raises KeyboardInterrupt
        print("load: interrupted", file=sys.stderr)
        raise
    finally:
        # Also after Ctrl-C, so that an interrupted run leaves no images behind.
        if mesh.uploaded and not args.write_payloads:
            deleted = await mesh.delete_uploaded()
            print(f"load: deleted {deleted} uploaded image(s)", file=sys.stderr)
        await mesh.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(MeshSettings)
    try:
        return asyncio.run(run(args, settings))
    except KeyboardInterrupt:
        return 130  # what a shell reports for Ctrl-C; run() has said so and cleaned up, without a traceback
