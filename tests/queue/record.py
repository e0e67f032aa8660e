"""Helpers of the tests that work on the job record directly (the repository, without the service)."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from mesh.services.queue.repository import JobRepository, NewJob
from tests.postgres import sql

__all__ = ["JOB", "sql", "submit"]

JOB = NewJob(
    queue="q.record",
    image_id="image",
    pipeline=b"",
    model="script:noop",
    priority=0,
    idempotency_key=None,
    max_attempts=3,
    backoff_base_seconds=0.1,
    backoff_cap_seconds=0.8,
)
"""A job for tests that submit through the repository; ``dataclasses.replace`` or ``submit(repository, ...)`` change
what a test needs."""


async def submit(repository: JobRepository, **changes: Any) -> uuid.UUID:
    """Submits :data:`JOB` with ``changes`` (a fresh id each time); returns the job's id."""
    job_id: uuid.UUID = (await repository.submit(dataclasses.replace(JOB, id=uuid.uuid4(), **changes))).row[
        "id"
    ]
    return job_id
