"""How a cancelled call ended (``interceptors.cancelled_code``, ``CallClock``): the one rule that the call's status,
its span and the inference statistics share."""

from __future__ import annotations

import time

import grpc

from mesh.kit.interceptors import DEADLINE_SLACK_SECONDS, CallClock, cancelled_code

DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
CANCELLED = grpc.StatusCode.CANCELLED


def test_a_cancellation_in_the_last_tenth_of_a_calls_time_counts_as_its_deadline() -> None:
    """A 10 s call cancelled with 0.5 s left counts as its deadline (its slack is a tenth of its time, 1 s), one
    cancelled with 1.5 s left as CANCELLED; a call without a deadline is always CANCELLED."""
    assert cancelled_code(10.0, 0.0, 9.5) is DEADLINE
    assert cancelled_code(10.0, 0.0, 8.5) is CANCELLED
    assert cancelled_code(10.0, 0.0, 11.0) is DEADLINE
    assert cancelled_code(None, 0.0, 100.0) is CANCELLED


def test_a_short_calls_slack_is_at_least_the_fixed_floor() -> None:
    """A 0.3 s call's slack is not 30 ms but DEADLINE_SLACK_SECONDS (a loaded server starts it late)."""
    assert cancelled_code(0.3, 0.0, 0.3 - DEADLINE_SLACK_SECONDS * 0.9) is DEADLINE
    assert cancelled_code(0.3, 0.0, 0.3 - DEADLINE_SLACK_SECONDS * 1.5) is CANCELLED


class _Context:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def test_the_call_clock_applies_the_fraction_to_the_calls_own_time() -> None:
    """A 3 s call cancelled 0.25 s before its deadline ended DEADLINE_EXCEEDED (the interceptor's fixed 0.1 s
    called it CANCELLED while the inference statistics said DEADLINE_EXCEEDED); one with 2 s left CANCELLED,
    and one without a deadline CANCELLED."""
    now = time.monotonic()
    assert CallClock(now - 2.75, now + 0.25).ended_code() is DEADLINE
    assert CallClock(now - 1.0, now + 2.0).ended_code() is CANCELLED
    assert CallClock(now - 1.0, None).ended_code() is CANCELLED
    started = CallClock.start(_Context(3.0))  # type: ignore[arg-type]
    assert started.deadline is not None
    assert abs(started.deadline - started.arrived - 3.0) < 0.01
    assert CallClock.start(_Context(None)).deadline is None  # type: ignore[arg-type]
