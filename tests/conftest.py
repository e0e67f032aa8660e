"""Fixtures shared by every test: the real PostgreSQL and RabbitMQ on localhost.

Locally a missing dependency skips the tests that need it; under ``CI=true`` it is a failure.
Each test module that asks for ``database_url`` gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlparse

import psycopg
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from psycopg import sql
from psycopg.conninfo import make_conninfo

from mesh.kit import tracing
from mesh.kit.logging import configure_logging

ADMIN_URL = os.environ.get("MESH_TEST_ADMIN_DATABASE_URL", "postgresql://localhost/postgres")
AMQP_URL = os.environ.get("MESH_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

configure_logging("tests", level="warning", fmt="console")


def require(available: bool, what: str) -> None:
    """Skip when a dependency is missing locally; fail under CI."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is not reachable, and CI=true requires it")
    pytest.skip(f"{what} is not reachable")


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """URL of the server's maintenance database (for creating test databases)."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        ok = True
    except psycopg.OperationalError:
        ok = False
    require(ok, f"PostgreSQL at {ADMIN_URL}")
    return ADMIN_URL


def _create_database(admin_url: str) -> str:
    name = f"mesh_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(admin_url, dbname=name)


def _drop_database(admin_url: str, url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(str(name))))


@pytest.fixture(scope="module")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty database for this test module, dropped afterwards."""
    url = _create_database(postgres_admin_url)
    yield url
    _drop_database(postgres_admin_url, url)


@pytest.fixture
def empty_database_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty database for this one test (nothing migrated yet), dropped afterwards."""
    url = _create_database(postgres_admin_url)
    yield url
    _drop_database(postgres_admin_url, url)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """URL of the real RabbitMQ."""
    parsed = urlparse(AMQP_URL)
    require(_tcp_open(parsed.hostname or "localhost", parsed.port or 5672), f"RabbitMQ at {parsed.hostname}")
    return AMQP_URL


SESSION_PREFIX = uuid.uuid4().hex[:4]
"""The first hex digits of this test process's unique names: the parallel run's workers each clean up their
own queues (``tests/queue/conftest.py``), never another's still in use."""


@pytest.fixture
def unique_name() -> str:
    """A short unique name for queues, exchanges and files of one test: ``t``, this process's prefix and six
    random hex digits."""
    return f"t{SESSION_PREFIX}{uuid.uuid4().hex[:6]}"


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fails a test that leaves asyncio tasks running behind it."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert not leaked, f"leaked tasks: {leaked}"


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """Every span this process finishes from the module's first use on, kept in memory."""
    exporter = InMemorySpanExporter()
    tracing.configure_tracing("mesh-tests").add_span_processor(SimpleSpanProcessor(exporter))
    return exporter
