"""Fixtures of the queue tests: a running queue service per test, on a database per module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.queue.harness import Harness, fast_settings, running_queue


@pytest.fixture
async def queue(database_url: str, amqp_url: str, unique_name: str) -> AsyncIterator[Harness]:
    """A queue service with its own RabbitMQ queues (``<unique>.mesh.jobs.*``) and short timings."""
    async with running_queue(fast_settings(database_url, amqp_url, unique_name)) as harness:
        yield harness
