"""Fixtures of the queue tests: a running queue service per test, on a database per module."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest

from mesh.kit.db import migrate
from mesh.services.queue.repository import MIGRATIONS
from mesh.services.queue.topology import HIGH_LANE_SUFFIX
from tests.conftest import AMQP_URL, SESSION_PREFIX
from tests.queue.harness import Harness, delete_queues, fast_settings, running_queue

TEST_QUEUE = re.compile(rf"t{SESSION_PREFIX}[0-9a-f]{{6}}\..+")


@pytest.fixture
async def queue(database_url: str, amqp_url: str, unique_name: str) -> AsyncIterator[Harness]:
    """A queue service with its own RabbitMQ queues (``<unique>.mesh.jobs.*``) and short timings."""
    async with running_queue(fast_settings(database_url, amqp_url, unique_name)) as harness:
        yield harness


@pytest.fixture(scope="module")
async def migrated(database_url: str) -> str:
    """The module's database with the queue's tables, for tests of the record without the service."""
    await migrate(database_url, "queue", MIGRATIONS)
    return database_url


@pytest.fixture(scope="session", autouse=True)
def remove_leftover_test_queues() -> Iterator[None]:
    """After the queue tests, delete every queue a test of this process left on the shared broker (names start
    with ``t``, this process's ``SESSION_PREFIX`` and six hex digits), so repeated runs do not pile quorum queues
    up; another process's (a parallel worker's) may still be in use."""
    yield
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True, timeout=60, check=False
    )
    # By job queue: deleting one deletes its two lanes and its dead-letter queue.
    names = sorted(
        {
            n.removesuffix(HIGH_LANE_SUFFIX)
            for n in listed.stdout.split()
            if TEST_QUEUE.fullmatch(n) and not n.endswith(".dead")
        }
    )
    if names:
        asyncio.run(delete_queues(AMQP_URL, names))
