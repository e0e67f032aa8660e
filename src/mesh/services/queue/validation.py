"""Checks of QueueService requests, reported as InvalidArgument with one violation per bad field."""

from __future__ import annotations

import uuid

from mesh.kit import errors
from mesh.kit.jobs import ModelReference
from mesh.kit.text_fields import MAX_IDEMPOTENCY_KEY_CHARS, text_problem
from mesh.queue.v1 import job_pb2, queue_service_pb2
from mesh.services.image_processing.registry import steps_from_proto
from mesh.services.queue.repository import NewJob, Row

MAX_PRIORITY = 9
MAX_ATTEMPTS = 100
MAX_MODEL_NAME = 200
MAX_MODEL_VERSION = 64
"""The inference service's limit on a version (``inference.repository.MAX_VERSION_LENGTH``; that module is not
imported here, it brings NumPy and OpenCV): a longer one is refused at submit, not sent to the lookup."""


def parse_uuid(value: str, field: str) -> uuid.UUID:
    """A UUID field, or InvalidArgument naming it."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise errors.InvalidArgument(
            f"{field} must be a UUID", field_violations=[errors.FieldViolation(field, "must be a UUID")]
        ) from None


def canonical_uuid(value: str) -> str:
    """A UUID in its one spelling, lower case with dashes (the file service's ids), from any that ``uuid.UUID``
    reads (upper case, braces, ``urn:uuid:``, no dashes); other text as it is (``check_submit`` refuses it)."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value


def check_submit(request: queue_service_pb2.SubmitJobRequest) -> None:
    """Every problem of a submit at once."""
    bad: list[errors.FieldViolation] = []
    if not request.image_id:
        bad.append(errors.FieldViolation("image_id", "is required"))
    else:
        try:
            uuid.UUID(request.image_id)
        except ValueError:
            bad.append(errors.FieldViolation("image_id", "must be a UUID (an image id of the file service)"))
    if not request.pipeline and not request.model:
        bad.append(errors.FieldViolation("pipeline", "give a pipeline, a model, or both"))
    if request.pipeline:
        # The image service's own catalogue, read in process: a typo in a filter or a parameter is refused
        # now, not found by a worker after the job was accepted.
        try:
            steps_from_proto(request.pipeline)
        except errors.InvalidArgument as error:
            bad.extend(error.field_violations)
    if request.priority > MAX_PRIORITY:
        bad.append(errors.FieldViolation("priority", f"must be between 0 and {MAX_PRIORITY}"))
    if request.max_attempts > MAX_ATTEMPTS:
        bad.append(
            errors.FieldViolation("max_attempts", f"must be between 1 and {MAX_ATTEMPTS} (0: default)")
        )
    if request.model and not text_problem(request.model, MAX_MODEL_NAME):
        try:
            reference = ModelReference.parse(request.model)
        except errors.InvalidArgument as error:
            bad.extend(error.field_violations)
        else:
            if len(reference.version) > MAX_MODEL_VERSION:
                bad.append(
                    errors.FieldViolation("model", f"a version has at most {MAX_MODEL_VERSION} characters")
                )
    for name, value, most in (
        ("model", request.model, MAX_MODEL_NAME),
        ("idempotency_key", request.idempotency_key, MAX_IDEMPOTENCY_KEY_CHARS),
    ):
        problem = text_problem(value, most)
        if problem:
            bad.append(errors.FieldViolation(name, problem))
    if bad:
        raise errors.InvalidArgument(
            f"the job request is invalid: {errors.listing(bad)}", field_violations=bad
        )


def check_same_job(row: Row, new: NewJob, *, asked_max_attempts: int = 0) -> None:
    """A resubmit with an idempotency key must ask for the job that the key already names: a retry after a
    lost answer does. Other fields mean another job under a reused key, which would otherwise never run while
    its client holds the first job's id as its own: ALREADY_EXISTS, naming the fields that differ. Image ids
    compare in one spelling: a row from before they were stored so may hold another. ``max_attempts`` counts
    only where the request set it (``asked_max_attempts``): left 0, it asks for the default, which the service's
    settings may have changed since the first submit."""
    kept = {"image_id": canonical_uuid(row["image_id"]), "model": row["model"], "priority": row["priority"]}
    if asked_max_attempts:
        kept["max_attempts"] = row["max_attempts"]
    differ = [
        errors.FieldViolation(name, f"the key's job has {value!r}")
        for name, value in kept.items()
        if value != getattr(new, name)
    ]
    if job_pb2.Job.FromString(row["pipeline"] or b"") != job_pb2.Job.FromString(new.pipeline):
        differ.append(errors.FieldViolation("pipeline", "the key's job has another pipeline"))
    if differ:
        raise errors.AlreadyExists(
            f"idempotency_key {new.idempotency_key!r} already names job {row['id']}, which differs in "
            f"{', '.join(v.field for v in differ)}; submit another job with a new key",
            field_violations=[errors.FieldViolation("idempotency_key", "names another job"), *differ],
            metadata={"job_id": str(row["id"])},
        )
