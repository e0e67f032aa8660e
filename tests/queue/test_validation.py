"""Checks of QueueService requests (``validation``), without the service."""

from __future__ import annotations

import uuid

import pytest

from mesh.kit import errors
from mesh.queue.v1 import queue_service_pb2
from mesh.services.inference.repository import MAX_VERSION_LENGTH
from mesh.services.queue.repository import NewJob
from mesh.services.queue.validation import (
    MAX_MODEL_VERSION,
    canonical_uuid,
    check_same_job,
    check_submit,
)

IMAGE_ID = "5f0c7d52-8b0e-4a3e-9d51-6c1f2b7a9e10"


def _submit(model: str, image_id: str = IMAGE_ID) -> queue_service_pb2.SubmitJobRequest:
    return queue_service_pb2.SubmitJobRequest(image_id=image_id, model=model)


def test_the_queue_refuses_a_model_version_the_inference_service_would() -> None:
    """A version over the inference service's 64 characters is INVALID_ARGUMENT on ``model`` at submit, before
    any lookup (it went to the inference service, whose refusal was taken for no answer and let the job through);
    64 pass. The queue's limit is the inference repository's."""
    assert MAX_MODEL_VERSION == MAX_VERSION_LENGTH
    check_submit(_submit(model="strip-reader/" + "1" * MAX_MODEL_VERSION))
    with pytest.raises(errors.InvalidArgument) as refused:
        check_submit(_submit(model="strip-reader/" + "1" * (MAX_MODEL_VERSION + 1)))
    assert [(v.field, v.description) for v in refused.value.field_violations] == [
        ("model", "a version has at most 64 characters")
    ]


@pytest.mark.parametrize(
    "spelling",
    [IMAGE_ID.upper(), "{" + IMAGE_ID + "}", "urn:uuid:" + IMAGE_ID, IMAGE_ID.replace("-", ""), IMAGE_ID],
)
def test_an_image_id_has_one_spelling(spelling: str) -> None:
    """Every spelling ``uuid.UUID`` reads is the file service's: lower case with dashes."""
    check_submit(_submit(image_id=spelling, model="m"))
    assert canonical_uuid(spelling) == IMAGE_ID


def test_a_keyed_retry_of_a_row_stored_in_another_spelling_is_the_same_job() -> None:
    """A row stored before image ids were canonical (upper case here) is the same job as a retry naming that
    image in the canonical spelling; another image still differs (ALREADY_EXISTS naming image_id)."""
    row = {"id": uuid.uuid4(), "image_id": IMAGE_ID.upper(), "model": "m", "priority": 0, "pipeline": b""}
    new = NewJob(
        queue="q",
        image_id=IMAGE_ID,
        pipeline=b"",
        model="m",
        priority=0,
        idempotency_key="k",
        max_attempts=5,
        backoff_base_seconds=1.0,
        backoff_cap_seconds=300.0,
        traceparent="",
        tracestate="",
    )
    check_same_job(row, new)
    with pytest.raises(errors.AlreadyExists) as other:
        check_same_job({**row, "image_id": str(uuid.uuid4())}, new)
    assert [v.field for v in other.value.field_violations] == ["idempotency_key", "image_id"]
