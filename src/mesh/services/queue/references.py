"""What a submit names, looked up before the job is accepted: its image in the file service, its model in the
inference service.

A job naming an image or a model that does not exist was accepted and failed at its first attempt, which only
a client that polls would see. Both lookups run at once under a short deadline. A service that does not answer
in time (down, restarting) lets the job through as before, and its worker finds out: the queue keeps taking
work while the services behind it come and go. It is then not asked again for a few seconds, so that an
outage does not slow every submit by the deadline. Any answer is not that: a name the service refuses
(INVALID_ARGUMENT) is the client's error, as one it does not know (NOT_FOUND) is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from prometheus_client import Counter

from mesh.kit import errors
from mesh.kit.jobs import ModelReference
from mesh.kit.logging import get_logger
from mesh.services.file.client import FileClient
from mesh.services.inference.client import InferenceClient
from mesh.services.queue.settings import QueueSettings

log = get_logger(__name__)

LOOKUPS = Counter(
    "mesh_queue_reference_lookups_total",
    "Lookups at submit of a job's image and model; outcome found, missing, refused (the service refused the "
    "name), or unknown (no answer in time, or the service failed).",
    ["kind", "outcome"],
)

SKIP_AFTER_UNKNOWN_SECONDS = 5.0
NO_ANSWER: tuple[type[Exception], ...] = (errors.Unavailable, errors.DeadlineExceeded, TimeoutError)
"""A service that says nothing about the name: down, restarting or slow. The job goes through, and the service
is left alone for ``SKIP_AFTER_UNKNOWN_SECONDS``. Only these: an INVALID_ARGUMENT taken for one let through a
job that could never run, and left every other job's model unchecked for 5 s."""
MAX_REMEMBERED = 10_000

Lookup = Callable[[str], Awaitable[object]]


class References(Protocol):
    """Checks that a submit's image and model exist."""

    async def check(self, image_id: str, model: str, *, fresh: bool = False) -> None:
        """Raise InvalidArgument naming each that its service refuses, else NotFound naming each that does not
        exist. ``fresh``: ask again what was found a moment ago (a retry of a job whose image may have gone)."""
        ...

    async def close(self) -> None:
        """Release the channels."""
        ...


class NoReferences:
    """No lookups (``MESH_REFERENCE_CHECK_SECONDS=0``): every job is accepted and its worker checks."""

    async def check(self, image_id: str, model: str, *, fresh: bool = False) -> None:
        return None

    async def close(self) -> None:
        return None


class ServiceReferences:
    """Lookups in the file and inference services, with found answers remembered for ``remember_seconds``
    (a load test submits one image many times; an image deleted within that time fails at its worker, and a
    ``fresh`` check, a retry's, asks again)."""

    def __init__(
        self,
        find_image: Lookup,
        find_model: Lookup,
        *,
        timeout_seconds: float,
        remember_seconds: float = 30.0,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._lookups = {"image_id": find_image, "model": find_model}
        self.timeout_seconds = timeout_seconds
        self.remember_seconds = remember_seconds
        self._found: dict[tuple[str, str], float] = {}
        self._skip_until = {"image_id": 0.0, "model": 0.0}
        self._on_close = on_close

    @classmethod
    def connect(cls, settings: QueueSettings, timeout_seconds: float) -> ServiceReferences:
        """Lookups over new channels to the file and inference services."""
        files = FileClient.connect(settings)
        inference = InferenceClient.connect(settings)

        async def close() -> None:
            await asyncio.gather(files.close(), inference.close())

        return cls(
            lambda image_id: files.get(image_id, timeout=timeout_seconds),
            lambda model: inference.metadata(*ModelReference.parse(model), timeout=timeout_seconds),
            timeout_seconds=timeout_seconds,
            on_close=close,
        )

    async def check(self, image_id: str, model: str, *, fresh: bool = False) -> None:
        now = time.monotonic()
        named = [
            (field, value)
            for field, value in (("image_id", image_id), ("model", model))
            if value
            and (fresh or self._found.get((field, value), 0.0) <= now)
            and self._skip_until[field] <= now
        ]
        if not named:  # the usual case under load: one image and one model, many jobs
            return
        answers = await asyncio.gather(*(self._problem(field, value) for field, value in named))
        problems = [(field, problem) for (field, _), problem in zip(named, answers, strict=True) if problem]
        refused = [
            (field, problem) for field, problem in problems if isinstance(problem, errors.InvalidArgument)
        ]
        if refused:
            raise errors.InvalidArgument(
                "; ".join(problem.message for _, problem in refused),
                field_violations=[
                    errors.FieldViolation(field, problem.message) for field, problem in refused
                ],
            )
        if problems:
            raise errors.NotFound(
                "; ".join(problem.message for _, problem in problems),
                field_violations=[errors.FieldViolation(field, "does not exist") for field, _ in problems],
            )

    async def _problem(self, field: str, value: str) -> errors.NotFound | errors.InvalidArgument | None:
        """The service's NotFound or InvalidArgument; None when the value exists or nobody could say."""
        now = time.monotonic()
        kind = field.removesuffix("_id")
        try:
            await asyncio.wait_for(self._lookups[field](value), self.timeout_seconds)
        except errors.NotFound as error:
            LOOKUPS.labels(kind, "missing").inc()
            self._found.pop((field, value), None)
            return error
        except errors.InvalidArgument as error:
            LOOKUPS.labels(kind, "refused").inc()
            return error
        except NO_ANSWER as error:
            LOOKUPS.labels(kind, "unknown").inc()
            self._skip_until[field] = now + SKIP_AFTER_UNKNOWN_SECONDS
            log.warning(
                "submit lookup got no answer; the job's worker will check", kind=kind, error=repr(error)
            )
            return None
        except errors.MeshError as error:
            # The service answered, with a failure of its own (INTERNAL, RESOURCE_EXHAUSTED...): not the client's
            # error, so this job goes through, but the service is asked again about the next one.
            LOOKUPS.labels(kind, "unknown").inc()
            log.warning("submit lookup failed; the job's worker will check", kind=kind, error=repr(error))
            return None
        LOOKUPS.labels(kind, "found").inc()
        if len(self._found) >= MAX_REMEMBERED:
            self._found.clear()
        self._found[(field, value)] = now + self.remember_seconds
        return None

    async def close(self) -> None:
        if self._on_close is not None:
            await self._on_close()
