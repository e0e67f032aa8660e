"""The contract between the queue's worker runtime and the services that execute jobs.

The queue service's worker runtime (``mesh.services.queue.worker``) consumes dispatch messages, claims the
job with fencing, and calls a :class:`JobHandler` with a :class:`JobContext`. A handler runs the job's
stages and returns a ``JobResult``; it raises a :class:`~mesh.kit.errors.MeshError` whose category decides
retry (TRANSIENT, SYSTEM) or failure (PERMANENT, DATA). ``JobContext.progress`` records progress and raises
:class:`JobCancelled` when a user asked to cancel, so cancel is seen at the handler's next beat (and
:class:`LeaseLost` when the attempt no longer holds the job; both are :class:`JobInterrupted`).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from mesh.kit import errors
from mesh.queue.v1 import job_pb2

# Queue names: jobs with a pipeline go to the image queue (its worker then runs the model, if any);
# model-only jobs go to the inference queue.
IMAGE_JOBS_QUEUE = "mesh.jobs.image"
INFERENCE_JOBS_QUEUE = "mesh.jobs.inference"


class ModelReference(NamedTuple):
    """The model a job names: ``name``, or ``name/version`` to pin a version (the default version otherwise)."""

    name: str
    version: str

    @classmethod
    def parse(cls, reference: str) -> ModelReference:
        """``name`` or ``name/version``; InvalidArgument on the field ``model`` for anything else."""
        name, slash, version = reference.partition("/")
        if not name or (slash and not version) or "/" in version:
            raise errors.InvalidArgument(
                f"model {reference!r} is not a model reference; send a model's name, or name/version",
                field_violations=[errors.FieldViolation("model", "a name, or name/version")],
            )
        return cls(name, version)


class JobInterrupted(Exception):
    """Raised by ``JobContext.progress`` when the attempt must stop; handlers let it propagate."""


class JobCancelled(JobInterrupted):
    """A user asked to cancel the job."""


class LeaseLost(JobInterrupted):
    """The worker no longer holds the job: another worker took it over, or the reconciler moved it on after its
    lease ran out. Nothing this attempt does counts any more."""


class JobContext(Protocol):
    """What a handler sees of the job it runs."""

    @property
    def job(self) -> job_pb2.Job:
        """The job as claimed (id, attempt, image_id, pipeline, model, ...)."""
        ...

    @property
    def result_key(self) -> str:
        """A key unique to this job and attempt, for idempotent result writes (e.g. upload labels)."""
        ...

    async def progress(self, fraction: float, stage: str) -> None:
        """Record progress 0..1 of the current attempt in ``stage``; raises JobInterrupted if cancelled or superseded."""
        ...


class JobHandler(Protocol):
    """Runs one job attempt."""

    async def __call__(self, context: JobContext) -> job_pb2.JobResult:
        """Run the job's stages and return its result."""
        ...
