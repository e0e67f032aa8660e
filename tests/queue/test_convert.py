"""mesh.services.queue.convert.passed_states: the states a watch polled past, from the job's history."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from mesh.queue.v1 import job_pb2
from mesh.services.queue.convert import passed_states

START = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)


def _transition(to_state: str, attempt: int, seconds: float) -> dict[str, Any]:
    return {
        "from_state": None,
        "to_state": to_state,
        "attempt": attempt,
        "reason": "",
        "next_run_at": None,
        "at": START + timedelta(seconds=seconds),
    }


def _row(state: str, attempt: int) -> dict[str, Any]:
    stamps = dict.fromkeys(("created_at", "updated_at", "started_at", "finished_at", "next_run_at"), START)
    return {
        "id": uuid.uuid4(),
        "state": state,
        "image_id": "",
        "model": "m",
        "priority": 0,
        "idempotency_key": None,
        "attempt": attempt,
        "max_attempts": 5,
        "run_first_attempt": 1,
        "progress": 0.7,
        "stage": "model",
        "cancel_requested": False,
        "pipeline": None,
        "error_category": None,
        "error_message": None,
        "error_code": None,
        "result": None,
        **stamps,
    }


HISTORY = [_transition("QUEUED", 1, 0), _transition("RUNNING", 1, 1), _transition("SUCCEEDED", 1, 2)]


def test_the_states_between_the_last_one_sent_and_the_rows_are_passed_states() -> None:
    """A watch that last sent QUEUED and now reads SUCCEEDED is given RUNNING, as the job was then: its state,
    attempt, time and history up to it, with no progress or stage of the row's."""
    passed, accounted = passed_states(_row("SUCCEEDED", 1), HISTORY, shown=1)
    assert accounted == 3
    assert [job_pb2.JobState.Name(j.state) for j in passed] == ["JOB_STATE_RUNNING"]
    (running,) = passed
    assert running.update_time.ToDatetime(tzinfo=UTC) == START + timedelta(seconds=1)
    assert len(running.history) == 2
    assert (running.progress, running.stage, running.HasField("finish_time")) == (0.0, "", False)


def test_history_newer_than_the_row_is_left_for_the_next_poll() -> None:
    """History read after the row may end in a change the row does not show yet: it is neither passed nor
    accounted for, so the next poll sends it."""
    passed, accounted = passed_states(_row("RUNNING", 1), HISTORY, shown=1)
    assert (passed, accounted) == ([], 2)
