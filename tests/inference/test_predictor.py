"""The predictor's own rules that need no server (``predictor``); its behaviour over gRPC is in test_servicer."""

from __future__ import annotations

from mesh.kit.interceptors import DEADLINE_SLACK_SECONDS
from mesh.services.inference.predictor import cancelled_reason


def test_a_cancellation_in_the_last_tenth_of_a_calls_time_counts_as_its_deadline() -> None:
    """A 10 s call cancelled with 0.5 s left counts as its deadline (its slack is a tenth of its time, 1 s), one
    cancelled with 1.5 s left as CANCELLED; a call without a deadline is always CANCELLED."""
    assert cancelled_reason(10.0, 0.0, 9.5) == "DEADLINE_EXCEEDED"
    assert cancelled_reason(10.0, 0.0, 8.5) == "CANCELLED"
    assert cancelled_reason(10.0, 0.0, 11.0) == "DEADLINE_EXCEEDED"
    assert cancelled_reason(None, 0.0, 100.0) == "CANCELLED"


def test_a_short_calls_slack_is_the_interceptors() -> None:
    """A 0.3 s call's slack is not 30 ms but the interceptor's DEADLINE_SLACK_SECONDS: statistics never say
    CANCELLED where the call's own status (grpc_server_handled_total) says DEADLINE_EXCEEDED."""
    assert cancelled_reason(0.3, 0.0, 0.3 - DEADLINE_SLACK_SECONDS * 0.9) == "DEADLINE_EXCEEDED"
    assert cancelled_reason(0.3, 0.0, 0.3 - DEADLINE_SLACK_SECONDS * 1.5) == "CANCELLED"
