"""The job state machine, backoff and the retry decision: the queue's domain core (no I/O imports).

States and the moves between them follow CONTRACT.md::

    QUEUED -> RUNNING -> SUCCEEDED
    RUNNING -> RETRY_WAIT -> QUEUED        (transient or system error, with backoff)
    QUEUED | RUNNING | RETRY_WAIT -> FAILED | DEAD | CANCELLED
    FAILED | DEAD | CANCELLED -> QUEUED    (a user's retry: a new attempt)

A RUNNING job whose lease expired lost its worker (it died, hung or lost PostgreSQL): a SYSTEM error of that
attempt, so it goes ``RUNNING -> RETRY_WAIT -> QUEUED`` with backoff like any other, or ``-> FAILED`` once
its attempts are spent (:func:`stalled_lease_outcome`). ``RUNNING -> QUEUED`` at the same attempt exists
for two cases: a collateral dead letter (a dispatch of a running job that died with a worker another job
killed is dispatched again: :func:`dead_letter_outcome`), and a stopping worker handing back a job it will
not finish (``ClaimStore.release``), so that a stop spends none of its attempts. A job whose user asked to
cancel it is never dispatched again by either: with nothing running it any more, it ends CANCELLED.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass


class JobState(enum.StrEnum):
    """A job's state, spelled as stored in PostgreSQL."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    RETRY_WAIT = "RETRY_WAIT"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    DEAD = "DEAD"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True for the states a job only leaves by a user's retry (or never, for SUCCEEDED)."""
        return self in TERMINAL_STATES


class ErrorCategory(enum.StrEnum):
    """Why an attempt failed; decides retry (names as in ``mesh.common.v1.ErrorCategory``)."""

    TRANSIENT = "TRANSIENT"
    SYSTEM = "SYSTEM"
    PERMANENT = "PERMANENT"
    DATA = "DATA"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED})
RETRYABLE_BY_USER = frozenset({JobState.FAILED, JobState.DEAD, JobState.CANCELLED})
RETRYABLE_CATEGORIES = frozenset({ErrorCategory.TRANSIENT, ErrorCategory.SYSTEM})

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.DEAD, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {
            JobState.SUCCEEDED,
            JobState.RETRY_WAIT,
            JobState.QUEUED,
            JobState.FAILED,
            JobState.DEAD,
            JobState.CANCELLED,
        }
    ),
    JobState.RETRY_WAIT: frozenset({JobState.QUEUED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.DEAD: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}


class IllegalTransition(ValueError):
    """A move the state machine does not allow."""


def can_move(current: JobState, target: JobState) -> bool:
    """Whether ``current -> target`` is a move of the state machine."""
    return target in ALLOWED[current]


def check_move(current: JobState, target: JobState) -> None:
    """Raise :class:`IllegalTransition` unless ``current -> target`` is allowed."""
    if not can_move(current, target):
        raise IllegalTransition(f"a {current} job cannot become {target}")


def cancel_target(current: JobState) -> JobState | None:
    """What cancel does at once: QUEUED/RETRY_WAIT -> CANCELLED; RUNNING -> None (the worker decides
    at its next beat); terminal states raise :class:`IllegalTransition`."""
    if current.terminal:
        raise IllegalTransition(f"a {current} job cannot be cancelled")
    if current is JobState.RUNNING:
        return None
    return JobState.CANCELLED


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: the n-th retry waits uniform(0, min(cap, base * 2**(n-1)))."""

    base_seconds: float = 1.0
    cap_seconds: float = 300.0

    def ceiling(self, retry: int) -> float:
        """The largest wait before the ``retry``-th retry (1-based)."""
        exponent = min(max(retry - 1, 0), 62)
        return float(min(self.cap_seconds, self.base_seconds * (2.0**exponent)))

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """A full-jitter wait before the ``retry``-th retry."""
        return (rng or random).uniform(0.0, self.ceiling(retry))


@dataclass(frozen=True)
class Attempts:
    """Where a job stands in its attempt budget (``first`` is the first attempt of the current run:
    a user's retry starts a new run with a fresh budget)."""

    attempt: int
    first: int
    max_attempts: int

    @property
    def used(self) -> int:
        """Attempts used in the current run, counting the current one."""
        return self.attempt - self.first + 1

    @property
    def exhausted(self) -> bool:
        """True when no further attempt is allowed in this run."""
        return self.used >= self.max_attempts


@dataclass(frozen=True)
class FailureOutcome:
    """What a failed attempt leads to."""

    state: JobState
    delay_seconds: float | None
    reason: str


def decide_failure(
    category: ErrorCategory,
    message: str,
    attempts: Attempts,
    backoff: Backoff,
    rng: random.Random | None = None,
) -> FailureOutcome:
    """TRANSIENT/SYSTEM errors retry with backoff until the budget is spent; PERMANENT/DATA fail at once."""
    if category not in RETRYABLE_CATEGORIES:
        return FailureOutcome(JobState.FAILED, None, f"{category} error: {message}")
    if attempts.exhausted:
        return FailureOutcome(
            JobState.FAILED, None, f"{category} error after {attempts.used} attempts: {message}"
        )
    delay = backoff.delay(attempts.used, rng)
    ceiling = backoff.ceiling(attempts.used)
    return FailureOutcome(
        JobState.RETRY_WAIT,
        delay,
        f"{category} error, retry {attempts.used} in {delay:.3f}s (ceiling {ceiling:g}s): {message}",
    )


LEASE_EXPIRED_MESSAGE = (
    "the worker stopped renewing its lease before the attempt ended (it died, hung or lost PostgreSQL)"
)
"""The error a stalled lease records for its attempt (category SYSTEM)."""


def stalled_lease_outcome(
    attempts: Attempts, backoff: Backoff, rng: random.Random | None = None
) -> FailureOutcome:
    """A RUNNING job whose lease expired: a SYSTEM error of the attempt, decided as any other
    (:func:`decide_failure`): RETRY_WAIT with backoff, or FAILED when the attempts are spent. The reason
    starts with "lease expired" so that the history says what happened."""
    decision = decide_failure(ErrorCategory.SYSTEM, LEASE_EXPIRED_MESSAGE, attempts, backoff, rng)
    return FailureOutcome(decision.state, decision.delay_seconds, f"lease expired: {decision.reason}")


@dataclass(frozen=True)
class DeadLetterFacts:
    """What is known about a job when one of its dispatches reaches the dead-letter queue."""

    state: JobState
    attempt_claims: int
    dead_letters: int
    cancel_requested: bool = False


def dead_letter_outcome(
    facts: DeadLetterFacts, *, delivery_limit: int, max_dead_letters: int = 3
) -> JobState | None:
    """DEAD for a job that was claimed on (nearly) every delivery of its attempt: it crashes its workers.

    A job dead-lettered while QUEUED, or claimed on fewer deliveries, was collateral of workers killed by
    other jobs (the dispatches a worker holds unacked all count a delivery when it dies): it is dispatched
    again (QUEUED), up to ``max_dead_letters`` times, after which it is DEAD too. A job whose user asked to
    cancel it is CANCELLED instead of either: the user asked for it, and no worker runs it any more (as
    for an expired lease). A job that moved on (finished, waiting for a retry) is left alone (None).
    """
    if facts.state not in (JobState.QUEUED, JobState.RUNNING):
        return None
    if facts.cancel_requested:
        return JobState.CANCELLED
    if facts.dead_letters + 1 >= max_dead_letters:
        return JobState.DEAD
    if facts.state is JobState.RUNNING and facts.attempt_claims >= delivery_limit:
        return JobState.DEAD
    return JobState.QUEUED
