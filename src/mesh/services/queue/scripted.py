"""A job handler whose behaviour is written in the job's model name, for fault tests and benchmarks.

``model`` = ``script:<directive>[,<directive>...]``; directives run in order:

- ``noop``: nothing;
- ``sleep=S``: sleep S seconds, reporting progress every 50 ms (so cancel is seen within a beat);
- ``fail=CATEGORY[:N]``: fail with that error category (TRANSIENT, SYSTEM, PERMANENT, DATA) while the attempt
  number is at most N (always when N is left out);
- ``flaky=P``: fail TRANSIENT with probability P;
- ``crash``: end the worker process at once (``os._exit``), like a segfault or an OOM kill.

The result names the attempt's ``result_key``, so a test can tell which attempt's result was kept.
``python -m mesh.services.queue.scripted --queue Q`` runs a worker process with this handler (``--noop``:
with :func:`noop_handler` instead, for benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal

from mesh.kit import errors
from mesh.kit.jobs import JobContext
from mesh.kit.logging import configure_logging
from mesh.kit.settings import BrokerSettings, load_settings
from mesh.queue.v1 import job_pb2
from mesh.services.queue.worker import JobWorker, WorkerOptions

PREFIX = "script:"
_ERRORS: dict[str, type[errors.MeshError]] = {
    "TRANSIENT": errors.Unavailable,
    "SYSTEM": errors.Internal,
    "PERMANENT": errors.InvalidArgument,
    "DATA": errors.InvalidData,
}


async def scripted_handler(context: JobContext) -> job_pb2.JobResult:
    """Run the directives of ``context.job.model``."""
    job = context.job
    script = job.model.removeprefix(PREFIX) if job.model.startswith(PREFIX) else "noop"
    for directive in filter(None, script.split(",")):
        name, _, argument = directive.partition("=")
        if name == "noop":
            continue
        if name == "sleep":
            await _sleep(context, float(argument))
        elif name == "fail":
            category, _, limit = argument.partition(":")
            if not limit or job.attempt <= int(limit):
                raise _ERRORS[category](f"scripted {category} failure on attempt {job.attempt}")
        elif name == "flaky":
            if random.random() < float(argument):
                raise errors.Unavailable(f"scripted flaky failure on attempt {job.attempt}")
        elif name == "crash":
            os._exit(70)
        else:
            raise errors.InvalidArgument(f"unknown script directive {directive!r}")
    await context.progress(1.0, "done")
    return job_pb2.JobResult(output_image_id=context.result_key)


async def noop_handler(context: JobContext) -> job_pb2.JobResult:
    """Does nothing at all (no progress write): the cost of the queue itself, for benchmarks."""
    return job_pb2.JobResult(output_image_id=context.result_key)


async def _sleep(context: JobContext, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        await context.progress(1.0 - left / seconds, "sleep")
        await asyncio.sleep(min(0.05, left))


async def _main(args: argparse.Namespace) -> None:
    settings = load_settings(BrokerSettings)
    configure_logging("scripted-worker", level="warning", fmt="json")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    options = WorkerOptions(
        lease_seconds=args.lease,
        heartbeat_seconds=args.heartbeat,
        progress_interval_seconds=args.progress_interval,
        delivery_limit=args.delivery_limit,
        drain_seconds=args.drain,
        reconnect_seconds=0.5,
    )
    handler = noop_handler if args.noop else scripted_handler
    worker = JobWorker(
        settings, queue=args.queue, handler=handler, concurrency=args.concurrency, options=options
    )
    task = asyncio.create_task(worker.run(stopping))
    await worker.ready.wait()
    print("ready", flush=True)
    await task


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queue", required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--progress-interval", type=float, default=0.5)
    parser.add_argument("--delivery-limit", type=int, default=WorkerOptions().delivery_limit)
    parser.add_argument("--drain", type=float, default=10.0)
    parser.add_argument("--noop", action="store_true", help="run every job as a no-op, ignoring its script")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
