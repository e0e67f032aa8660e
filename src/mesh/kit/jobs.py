"""The contract between the queue's worker runtime and the services that execute jobs.

The queue service's worker runtime (``mesh.services.queue.worker``) consumes dispatch messages, claims the
job with fencing, and calls a :class:`JobHandler` with a :class:`JobContext`. A handler runs the job's
stages and returns a ``JobResult``; it raises a :class:`~mesh.kit.errors.MeshError` whose category decides
retry (TRANSIENT, SYSTEM) or failure (PERMANENT, DATA). ``JobContext.progress`` records progress and raises
:class:`JobCancelled` when a user asked to cancel, so cancel is seen at the handler's next beat.
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


class JobCancelled(Exception):
    """Raised by ``JobContext.progress`` when the job was cancelled; handlers let it propagate."""


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
        """Record progress 0..1 of the current attempt in ``stage``; raises JobCancelled if cancelled."""
        ...


class JobHandler(Protocol):
    """Runs one job attempt."""

    async def __call__(self, context: JobContext) -> job_pb2.JobResult:
        """Run the job's stages and return its result."""
        ...
