"""Rows of the ``jobs`` and ``job_history`` tables to ``mesh.queue.v1`` messages and back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2

from mesh.common.v1 import errors_pb2
from mesh.kit import errors
from mesh.queue.v1 import job_pb2
from mesh.services.queue.states import ErrorCategory, JobState

Row = Mapping[str, Any]


def state_to_proto(state: str) -> job_pb2.JobState.ValueType:
    """``'QUEUED'`` -> ``JOB_STATE_QUEUED``."""
    return job_pb2.JobState.Value(f"JOB_STATE_{state}")


def state_from_proto(state: job_pb2.JobState.ValueType) -> JobState | None:
    """``JOB_STATE_QUEUED`` -> ``JobState.QUEUED``; None for UNSPECIFIED; InvalidArgument for a number that is
    no state (proto3 keeps unknown enum values as they came)."""
    if state == job_pb2.JOB_STATE_UNSPECIFIED:
        return None
    if state not in job_pb2.JobState.values():
        known = ", ".join(v.name for v in job_pb2.JobState.DESCRIPTOR.values if v.number)
        raise errors.InvalidArgument(
            f"state {state} is not a job state; send one of {known}, or none for every state",
            field_violations=[errors.FieldViolation("state", "not a job state")],
        )
    return JobState(job_pb2.JobState.Name(state).removeprefix("JOB_STATE_"))


def category_to_proto(category: str | None) -> errors_pb2.ErrorCategory.ValueType:
    """``'TRANSIENT'`` -> ``ERROR_CATEGORY_TRANSIENT``."""
    if not category:
        return errors_pb2.ERROR_CATEGORY_UNSPECIFIED
    return errors_pb2.ErrorCategory.Value(f"ERROR_CATEGORY_{category}")


def category_from_proto(category: errors_pb2.ErrorCategory.ValueType) -> ErrorCategory:
    """A MeshError's category as the domain's; UNSPECIFIED counts as SYSTEM (retry, with a limit)."""
    if category == errors_pb2.ERROR_CATEGORY_UNSPECIFIED:
        return ErrorCategory.SYSTEM
    return ErrorCategory(errors_pb2.ErrorCategory.Name(category).removeprefix("ERROR_CATEGORY_"))


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp, or None."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def encode_pipeline(steps: Iterable[Any]) -> bytes:
    """The pipeline column: a ``Job`` carrying only its steps (protobuf, so any parameter survives)."""
    return job_pb2.Job(pipeline=list(steps)).SerializeToString()


def row_to_job(row: Row, *, position: int = 0, history: Iterable[Row] = ()) -> job_pb2.Job:
    """A ``jobs`` row (plus its queue position and history rows) as a ``Job`` message."""
    job = job_pb2.Job(
        id=str(row["id"]),
        state=state_to_proto(row["state"]),
        image_id=row["image_id"],
        model=row["model"],
        priority=row["priority"],
        idempotency_key=row["idempotency_key"] or "",
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        run_attempt=row["attempt"] - row["run_first_attempt"] + 1,
        progress=row["progress"],
        stage=row["stage"],
        queue_position=position if row["state"] == JobState.QUEUED else 0,
        cancel_requested=row["cancel_requested"],
    )
    if row["pipeline"]:
        job.pipeline.extend(job_pb2.Job.FromString(bytes(row["pipeline"])).pipeline)
    if row["error_category"] or row["error_message"]:
        job.error.CopyFrom(
            job_pb2.JobError(
                category=category_to_proto(row["error_category"]),
                message=row["error_message"] or "",
                code=row["error_code"] or "",
            )
        )
    if row["result"] is not None:
        job.result.CopyFrom(job_pb2.JobResult.FromString(bytes(row["result"])))
    for field, column in (
        ("create_time", "created_at"),
        ("update_time", "updated_at"),
        ("start_time", "started_at"),
        ("finish_time", "finished_at"),
        ("next_run_time", "next_run_at"),
    ):
        stamp = timestamp(row[column])
        if stamp is not None:
            getattr(job, field).CopyFrom(stamp)
    for item in history:
        job.history.append(history_to_proto(item))
    return job


def history_to_proto(row: Row) -> job_pb2.JobTransition:
    """A ``job_history`` row as a ``JobTransition``."""
    transition = job_pb2.JobTransition(
        from_state=state_to_proto(row["from_state"]) if row["from_state"] else job_pb2.JOB_STATE_UNSPECIFIED,
        to_state=state_to_proto(row["to_state"]),
        attempt=row["attempt"],
        reason=row["reason"],
    )
    at = timestamp(row["at"])
    if at is not None:
        transition.time.CopyFrom(at)
    next_run = timestamp(row["next_run_at"])
    if next_run is not None:
        transition.next_run_time.CopyFrom(next_run)
    return transition


def passed_states(row: Row, history: Sequence[Row], shown: int) -> tuple[list[job_pb2.Job], int]:
    """The job as it was at each state change in ``history`` after the first ``shown`` and before the state
    ``row`` holds, and how many of ``history`` the row accounts for. A watch that polls sees a job's row now
    and then: a job that went QUEUED -> RUNNING -> SUCCEEDED between two polls would be seen skipping RUNNING.

    Such a state is sent as the job at that transition: its state, attempt, time and history up to it; the
    progress, stage, result and error it had then are not kept anywhere, so they are left empty. ``history``
    must be read in the same snapshot as ``row`` (``JobRepository.with_history``): read after it, it could end
    in changes newer than the row, the last of which may come back to the row's state, and be matched to it.
    """
    current = next(
        (i for i in range(len(history) - 1, -1, -1) if history[i]["to_state"] == row["state"]),
        len(history) - 1,
    )
    passed: list[job_pb2.Job] = []
    for index in range(shown, current):
        transition = history[index]
        job = row_to_job(row, history=history[: index + 1])
        job.state = state_to_proto(transition["to_state"])
        job.attempt = transition["attempt"]
        job.run_attempt = max(transition["attempt"] - row["run_first_attempt"] + 1, 1)
        job.progress, job.stage, job.queue_position = 0.0, "", 0
        for field in ("result", "error", "finish_time", "next_run_time"):
            job.ClearField(field)
        for field, column in (("update_time", "at"), ("next_run_time", "next_run_at")):
            stamp = timestamp(transition[column])
            if stamp is not None:
                getattr(job, field).CopyFrom(stamp)
        passed.append(job)
    return passed, current + 1
