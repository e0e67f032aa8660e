"""`make up`: run the whole mesh on localhost in the foreground.

Checks that PostgreSQL answers and that RabbitMQ accepts a login (and says how to start them, or what to
fix, when they do not), creates the database, starts every service, worker and the gateway as child
processes, waits until each says it is healthy, prints the web page's address, and on Ctrl-C / SIGTERM stops
them gracefully one after the other, callers before what they call (SIGTERM, its drain, SIGKILL when the
grace runs out). If one process dies, the others are stopped too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import aiormq
import httpx
import psycopg
from psycopg.conninfo import conninfo_to_dict

from mesh.kit.cli import positive_float
from mesh.kit.db import ensure_database
from mesh.kit.logging import configure_logging
from mesh.kit.settings import MeshSettings, load_settings
from mesh.kit.supervision import SUPERVISOR_ENV


@dataclass(frozen=True)
class Process:
    """One child process of the local mesh, with its default ports (CONTRACT.md)."""

    name: str
    module: str
    http_port: int
    grpc_port: int | None

    def health_url(self, offset: int) -> str:
        return f"http://127.0.0.1:{self.http_port + offset}/healthz"


PROCESSES = (
    Process("file", "mesh.services.file", 9101, 50051),
    Process("image", "mesh.services.image_processing", 9102, 50052),
    Process("inference", "mesh.services.inference", 9103, 50053),
    Process("queue", "mesh.services.queue", 9104, 50054),
    Process("gateway", "mesh.services.gateway", 8080, None),
)

# Ctrl-C stops a process only once every process that calls it has exited. A worker finishes its running
# jobs in its drain, and then still has to store each result in the file service (and an image job with a
# model asks the inference service first); stopped all at once, the file service was gone in 0.2 s and every
# running job's attempt was thrown away as TRANSIENT. The gateway calls everything and brings new jobs, the
# queue service is called only by the gateway, and everything stores in the file service.
STOP_ORDER = ("gateway", "image", "inference", "queue", "file")
# What a process gets between SIGTERM and SIGKILL once the grace is spent on those stopped before it: an idle
# service stops in well under that, and is not killed for another's slow drain.
LEAST_STOP_SECONDS = 3.0


def port_env(offset: int) -> dict[str, dict[str, str]]:
    """Per-process environment that moves every port by ``offset`` (so a second mesh can run beside
    the first, as the system tests do); empty when the offset is 0, so the defaults and the user's own
    MESH_* variables apply."""
    if offset == 0:
        return {p.name: {} for p in PROCESSES}
    shared: dict[str, str] = {}
    for process in PROCESSES:
        if process.grpc_port is not None:
            shared[f"MESH_{process.name.upper()}_SERVICE_ADDRESS"] = f"localhost:{process.grpc_port + offset}"
            shared[f"MESH_{process.name.upper()}_SERVICE_HTTP"] = f"localhost:{process.http_port + offset}"
    env = {}
    for process in PROCESSES:
        own = {**shared, "MESH_HTTP_PORT": str(process.http_port + offset)}
        if process.grpc_port is not None:
            own["MESH_GRPC_PORT"] = str(process.grpc_port + offset)
        env[process.name] = own
    return env


HOW_TO_START = {
    "PostgreSQL": "start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
    "(Debian) or `sudo systemctl start postgresql`, or point MESH_DATABASE_URL at a running server",
    "RabbitMQ": "start it with `rabbitmq-server -detached` or `sudo systemctl start rabbitmq-server`, "
    "or point MESH_AMQP_URL at a running broker",
}
HOW_TO_LOG_IN = (
    "fix the user, password or virtual host in MESH_AMQP_URL (amqp://USER:PASSWORD@HOST:5672/VHOST, `%2F` for "
    "the default vhost `/`); `rabbitmqctl list_users` and `rabbitmqctl list_vhosts` show what exists, "
    "`rabbitmqctl add_vhost NAME` and `rabbitmqctl set_permissions -p NAME USER '.*' '.*' '.*'` set one up"
)
HOW_TO_LOG_IN_PG = (
    "fix the user, password or database in MESH_DATABASE_URL (postgresql://USER:PASSWORD@HOST:5432/DATABASE); "
    "`psql -c '\\du'` lists the roles, and pg_hba.conf says who may connect from where"
)
AMQP_CHECK_SECONDS = 5.0


def child_environment(base: Mapping[str, str], *, terminal: bool) -> dict[str, str]:
    """The environment of every process: ``base``, unbuffered, naming this supervisor (the processes stop
    when it dies: mesh.kit.supervision), and on a terminal logs for people (one
    coloured line each, with the same fields) unless MESH_LOG_FORMAT says otherwise; piped (CI, a file,
    a log shipper), the JSON lines stay."""
    env = {**base, "PYTHONUNBUFFERED": "1", SUPERVISOR_ENV: str(os.getpid())}
    if terminal and "MESH_LOG_FORMAT" not in base:
        env["MESH_LOG_FORMAT"] = "console"
    return env


def say(message: str) -> None:
    """A line for the person at the terminal (logs of the services are JSON on stderr)."""
    print(f"[mesh] {message}", flush=True)


def check_postgres(url: str) -> tuple[str, str] | None:
    """None when the server lets MESH_DATABASE_URL's user into its database (or the database does not exist
    yet: each service creates it), else what is wrong and what to do about it. A server that answers with a
    refusal (a wrong password, an unknown role, pg_hba.conf) was reported "not reachable" with the advice to
    start it."""
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as error:
        reason = str(error).strip().splitlines()[0]
        # libpq gives no SQLSTATE for a refused connection; the server's own refusals are its FATAL lines.
        if "FATAL:" not in reason:
            return f"PostgreSQL is not reachable ({reason})", HOW_TO_START["PostgreSQL"]
        if "does not exist" in reason and "database" in reason:
            return None
        return f"PostgreSQL refused the connection ({reason.split('FATAL:', 1)[1].strip()})", HOW_TO_LOG_IN_PG
    return None


async def check_rabbitmq(url: str) -> tuple[str, str] | None:
    """None when the broker lets MESH_AMQP_URL's user into its virtual host, else what is wrong and what to do
    about it. An open port is not enough: with a wrong password or a missing vhost every process came up
    healthy while no job was ever dispatched, and the cause was one warning among the JSON lines."""
    parsed = urlparse(url)
    broker = f"{parsed.hostname or 'localhost'}:{parsed.port or 5672}"
    user = unquote(parsed.username or "guest")
    try:
        async with asyncio.timeout(AMQP_CHECK_SECONDS):
            connection = await aiormq.connect(url)
    except aiormq.exceptions.ProbableAuthenticationError as error:
        return f"RabbitMQ at {broker} refused the login of user {user!r} ({error})", HOW_TO_LOG_IN
    except (aiormq.exceptions.ConnectionClosed, aiormq.exceptions.InvalidFrameError) as error:
        # The login passed and the broker closed the connection instead of opening the vhost: its answer to
        # a vhost that does not exist or that the user has no permissions on. aiormq 7 reports that as an
        # unexpected frame and drops the broker's reason, so the vhost is named here.
        at_open = isinstance(error, aiormq.exceptions.ConnectionClosed) or "Connection.OpenOk" in str(error)
        if not at_open:
            return f"RabbitMQ at {broker} answered unlike an AMQP broker ({error})", HOW_TO_START["RabbitMQ"]
        vhost = unquote(parsed.path[1:]) or "/"
        reason = f" ({error})" if isinstance(error, aiormq.exceptions.ConnectionClosed) else ""
        return (
            f"RabbitMQ at {broker} did not let user {user!r} into virtual host {vhost!r}: it does not "
            f"exist, or the user has no permissions on it{reason}",
            HOW_TO_LOG_IN,
        )
    except (OSError, aiormq.exceptions.AMQPError) as error:
        reason = str(error) or f"no answer within {AMQP_CHECK_SECONDS:g}s"
        return f"RabbitMQ is not reachable ({broker}: {reason})", HOW_TO_START["RabbitMQ"]
    await connection.close()
    return None


def busy_ports(processes: list[Process], offset: int) -> list[str]:
    """The ports ``processes`` would listen on that something already accepts connections on, each named."""
    taken = []
    for process in processes:
        for kind, port in (("HTTP", process.http_port), ("gRPC", process.grpc_port)):
            if port is None:
                continue
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port + offset), timeout=1),
            ):
                taken.append(f"{port + offset} ({process.name} {kind})")
    return taken


def available(process: Process) -> bool:
    """Whether the service's package exists in this checkout."""
    return importlib.util.find_spec(f"{process.module}.__main__") is not None


async def wait_healthy(client: httpx.AsyncClient, url: str, deadline: float) -> bool:
    """Poll the process's /healthz until it answers 200 or the deadline passes."""
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(url, timeout=1.0)).status_code == 200:
                return True
        await asyncio.sleep(0.25)
    return False


async def stop_all(children: dict[str, asyncio.subprocess.Process], grace: float) -> None:
    """Stop the children one at a time in STOP_ORDER: SIGTERM, wait for its drain until ``grace`` (for the
    whole mesh) runs out, at least LEAST_STOP_SECONDS, then SIGKILL it if it is still there."""
    deadline = time.monotonic() + grace
    for name in sorted(children, key=STOP_ORDER.index):
        child = children[name]
        if child.returncode is not None:
            continue
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        allowed = max(deadline - time.monotonic(), LEAST_STOP_SECONDS)
        try:
            await asyncio.wait_for(child.wait(), allowed)
        except TimeoutError:
            say(f"{name} did not stop within {allowed:.3g}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), 5)


async def run(settings: MeshSettings, startup_timeout: float, grace: float, port_offset: int = 0) -> int:
    for problem in (check_postgres(settings.database_url), await check_rabbitmq(settings.amqp_url)):
        if problem is not None:
            what, how_to = problem
            say(f"{what}.")
            say(f"  -> {how_to}.")
            return 1
    if await ensure_database(settings.database_url):
        # Its name only: a connection string may be key=value pairs, and may hold a password.
        say(f"created database {conninfo_to_dict(settings.database_url).get('dbname', '')}")
    settings.blob_dir.mkdir(parents=True, exist_ok=True)

    wanted = [p for p in PROCESSES if available(p)]
    missing = [p.name for p in PROCESSES if not available(p)]
    if missing:
        say(f"not in this checkout, so not started: {', '.join(missing)}")
    taken = busy_ports(wanted, port_offset)
    if taken:
        # Found before anything starts: otherwise one process fails to bind, and its reason is a log line
        # among the others' while the whole mesh stops.
        say(f"already in use on this machine: port {', '.join(taken)}.")
        say(
            f"  -> stop what holds them (another `make up`?), or run beside it with `{_python()} -m "
            "mesh.tools.up --port-offset 1000`."
        )
        return 1
    env = child_environment(os.environ, terminal=sys.stdout.isatty())
    if port_offset and not settings.queue_prefix:
        # A second mesh on the same RabbitMQ vhost would otherwise take the first one's jobs.
        env["MESH_QUEUE_PREFIX"] = f"offset{port_offset}."
        say(f"RabbitMQ queues of this mesh: {env['MESH_QUEUE_PREFIX']}mesh.jobs.*")
    ports = port_env(port_offset)
    children: dict[str, asyncio.subprocess.Process] = {}
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too: a closed terminal or a dropped SSH session would otherwise kill only this supervisor and
    # leave every service running on in its own session, holding the ports.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stopping.set)
    for process in wanted:
        # Each child gets its own process group so a terminal's Ctrl-C reaches only the supervisor,
        # which then stops the children in STOP_ORDER with SIGTERM.
        children[process.name] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", process.module, env={**env, **ports[process.name]}, start_new_session=True
        )
        say(f"started {process.name} (pid {children[process.name].pid})")

    exit_code = 0
    # Watch the children from the start, so one that dies while the others start up ends the mesh at once.
    died = asyncio.Event()
    watchers = []
    for name, child in children.items():

        async def watch(name: str = name, child: asyncio.subprocess.Process = child) -> None:
            code = await child.wait()
            if not stopping.is_set():
                say(f"{name} exited with status {code}; stopping the mesh")
                died.set()

        watchers.append(asyncio.create_task(watch()))
    stop_wait = asyncio.create_task(stopping.wait())
    died_wait = asyncio.create_task(died.wait())

    async def start_up() -> None:
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + startup_timeout
            ready = await asyncio.gather(
                *(wait_healthy(client, p.health_url(port_offset), deadline) for p in wanted)
            )
        not_ready = [p.name for p, ok in zip(wanted, ready, strict=True) if not ok]
        if not_ready:
            say(f"not healthy after {startup_timeout:g}s: {', '.join(not_ready)} (see their logs above)")
        else:
            say("every process is healthy")
        base = f"http://localhost:{8080 + port_offset}"
        say(f"web page: {base}/   API docs: {base}/docs   Ctrl-C stops the mesh")

    starting = asyncio.create_task(start_up())
    await asyncio.wait([starting, stop_wait, died_wait], return_when=asyncio.FIRST_COMPLETED)
    starting.cancel()
    await asyncio.wait([stop_wait, died_wait], return_when=asyncio.FIRST_COMPLETED)
    if died.is_set():
        exit_code = 1
    stopping.set()
    say(f"stopping every process, one after the other: {', '.join(n for n in STOP_ORDER if n in children)}")
    await stop_all(children, grace)
    for task in [*watchers, stop_wait, died_wait]:
        task.cancel()
    say("stopped")
    return exit_code


def _python() -> str:
    """How to name this interpreter in a command to paste: ``.venv/bin/python`` from the checkout's root (a
    bare ``python`` is not the project's until its virtual environment is activated)."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make up", description=__doc__)
    parser.add_argument(
        "--startup-timeout",
        type=positive_float,
        default=90.0,
        help="seconds to wait for every process to be healthy (default: %(default)g)",
    )
    parser.add_argument(
        "--grace",
        type=positive_float,
        help="seconds the processes may take to stop, all of them one after the other (default: 3 x "
        "MESH_GRACE_SECONDS, for the image and inference drains in turn and a margin for the rest)",
    )
    parser.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="move every port by this much (run a second mesh beside one)",
    )
    args = parser.parse_args(argv)
    ports = [port for p in PROCESSES for port in (p.http_port, p.grpc_port) if port is not None]
    lowest, highest = 1 - min(ports), 65535 - max(ports)
    if not lowest <= args.port_offset <= highest:
        parser.error(
            f"--port-offset {args.port_offset} moves ports out of 1-65535; give {lowest} to {highest}"
        )
    # The launcher speaks in its own "[mesh] ..." lines; the kit's info lines (the database it creates) would
    # say the same again in another format, ahead of the processes' own log.
    configure_logging("up", level="warning", fmt="console")
    # The services' settings, for the drain grace they will use (and a bad value named before any starts).
    settings = load_settings(MeshSettings)
    grace = args.grace if args.grace is not None else 3 * settings.grace_seconds
    return asyncio.run(run(settings, args.startup_timeout, grace, args.port_offset))


if __name__ == "__main__":
    raise SystemExit(main())
