"""The job state machine, backoff and retry decision (domain core, no I/O)."""

from __future__ import annotations

import random

import pytest

from mesh.services.queue.states import (
    ALLOWED,
    TERMINAL_STATES,
    Attempts,
    Backoff,
    DeadLetterFacts,
    ErrorCategory,
    IllegalTransition,
    JobState,
    can_move,
    cancel_target,
    check_move,
    dead_letter_outcome,
    decide_failure,
    stalled_lease_outcome,
)


def test_contract_moves_are_allowed() -> None:
    """Every move CONTRACT.md names is allowed, including a user's retry of FAILED, DEAD and CANCELLED."""
    for current, target in [
        (JobState.QUEUED, JobState.RUNNING),
        (JobState.RUNNING, JobState.SUCCEEDED),
        (JobState.RUNNING, JobState.RETRY_WAIT),
        (JobState.RETRY_WAIT, JobState.QUEUED),
        (JobState.RUNNING, JobState.FAILED),
        (JobState.RUNNING, JobState.DEAD),
        (JobState.QUEUED, JobState.CANCELLED),
        (JobState.RUNNING, JobState.CANCELLED),
        (JobState.FAILED, JobState.QUEUED),
        (JobState.DEAD, JobState.QUEUED),
        (JobState.CANCELLED, JobState.QUEUED),
    ]:
        check_move(current, target)


def test_succeeded_is_final_and_skips_are_refused() -> None:
    """SUCCEEDED has no way out, and a queued job cannot jump to SUCCEEDED or RETRY_WAIT."""
    assert ALLOWED[JobState.SUCCEEDED] == frozenset()
    assert not can_move(JobState.QUEUED, JobState.SUCCEEDED)
    with pytest.raises(IllegalTransition):
        check_move(JobState.QUEUED, JobState.RETRY_WAIT)
    with pytest.raises(IllegalTransition):
        check_move(JobState.SUCCEEDED, JobState.QUEUED)


def test_terminal_states() -> None:
    """Exactly SUCCEEDED, FAILED, DEAD and CANCELLED are terminal."""
    assert {s for s in JobState if s.terminal} == set(TERMINAL_STATES)
    assert {JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED} == TERMINAL_STATES


def test_cancel_targets() -> None:
    """Queued and waiting jobs cancel at once, running ones cooperatively, finished ones not at all."""
    assert cancel_target(JobState.QUEUED) is JobState.CANCELLED
    assert cancel_target(JobState.RETRY_WAIT) is JobState.CANCELLED
    assert cancel_target(JobState.RUNNING) is None
    for state in TERMINAL_STATES:
        with pytest.raises(IllegalTransition):
            cancel_target(state)


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    """The ceiling is base * 2**(n-1), capped."""
    backoff = Backoff(base_seconds=0.5, cap_seconds=3.0)
    assert [backoff.ceiling(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert Backoff(1.0, 1e9).ceiling(10_000) == 1e9  # no overflow for absurd retry counts


def test_backoff_full_jitter_spreads_below_the_ceiling() -> None:
    """Delays are uniform in [0, ceiling]: all below it, and not bunched at one value."""
    backoff = Backoff(base_seconds=1.0, cap_seconds=60.0)
    rng = random.Random(7)
    delays = [backoff.delay(3, rng) for _ in range(2000)]
    assert all(0.0 <= d <= 4.0 for d in delays)
    assert min(delays) < 0.2
    assert max(delays) > 3.8
    assert 1.8 < sum(delays) / len(delays) < 2.2


@pytest.mark.parametrize("category", [ErrorCategory.TRANSIENT, ErrorCategory.SYSTEM])
def test_retryable_errors_wait_then_fail_at_the_limit(category: ErrorCategory) -> None:
    """TRANSIENT and SYSTEM errors go to RETRY_WAIT with a delay until attempts are spent, then FAILED."""
    backoff = Backoff(1.0, 10.0)
    first = decide_failure(category, "boom", Attempts(1, 1, 3), backoff, random.Random(1))
    assert first.state is JobState.RETRY_WAIT
    assert first.delay_seconds is not None
    assert 0 <= first.delay_seconds <= 1.0
    second = decide_failure(category, "boom", Attempts(2, 1, 3), backoff, random.Random(1))
    assert second.state is JobState.RETRY_WAIT
    assert second.delay_seconds is not None
    assert second.delay_seconds <= 2.0
    last = decide_failure(category, "boom", Attempts(3, 1, 3), backoff)
    assert last.state is JobState.FAILED
    assert last.delay_seconds is None
    assert "after 3 attempts" in last.reason


@pytest.mark.parametrize("category", [ErrorCategory.PERMANENT, ErrorCategory.DATA])
def test_permanent_and_data_errors_fail_at_once(category: ErrorCategory) -> None:
    """PERMANENT and DATA errors fail on the first attempt whatever the budget."""
    outcome = decide_failure(category, "bad", Attempts(1, 1, 10), Backoff())
    assert outcome.state is JobState.FAILED
    assert outcome.delay_seconds is None


def test_a_user_retry_starts_a_fresh_budget() -> None:
    """Attempts count from the run's first attempt, so a retried job gets its whole budget again."""
    assert Attempts(attempt=6, first=6, max_attempts=3).used == 1
    assert not Attempts(attempt=7, first=6, max_attempts=3).exhausted
    assert Attempts(attempt=8, first=6, max_attempts=3).exhausted


def test_stalled_lease_is_a_system_error_that_waits_for_a_retry() -> None:
    """A lost lease is a SYSTEM error of the attempt, decided as any other: RETRY_WAIT with the job's backoff
    (CONTRACT.md's RUNNING -> RETRY_WAIT -> QUEUED; it used to go straight to QUEUED, which this test pinned
    before), or FAILED when no attempt is left; the reason says the lease expired."""
    backoff = Backoff(base_seconds=0.5, cap_seconds=10.0)
    waiting = stalled_lease_outcome(Attempts(1, 1, 2), backoff, random.Random(7))
    assert waiting.state is JobState.RETRY_WAIT
    assert waiting.delay_seconds is not None
    assert 0.0 <= waiting.delay_seconds <= backoff.ceiling(1)
    assert waiting.reason.startswith("lease expired: SYSTEM error, retry 1 in ")
    failed = stalled_lease_outcome(Attempts(2, 1, 2), backoff)
    assert failed.state is JobState.FAILED
    assert failed.delay_seconds is None
    assert failed.reason.startswith("lease expired: SYSTEM error after 2 attempts")
    assert "the worker stopped renewing its lease" in failed.reason


def test_dead_letter_outcome_tells_the_crasher_from_its_collateral() -> None:
    """A job claimed on every delivery is DEAD; one that sat queued or was claimed less is dispatched again,
    up to the dead-letter cap; a job that moved on is left alone."""
    crasher = DeadLetterFacts(JobState.RUNNING, attempt_claims=3, dead_letters=0)
    assert dead_letter_outcome(crasher, delivery_limit=3) is JobState.DEAD
    bystander = DeadLetterFacts(JobState.QUEUED, attempt_claims=0, dead_letters=0)
    assert dead_letter_outcome(bystander, delivery_limit=3) is JobState.QUEUED
    unlucky = DeadLetterFacts(JobState.RUNNING, attempt_claims=1, dead_letters=1)
    assert dead_letter_outcome(unlucky, delivery_limit=3) is JobState.QUEUED
    cursed = DeadLetterFacts(JobState.QUEUED, attempt_claims=0, dead_letters=2)
    assert dead_letter_outcome(cursed, delivery_limit=3) is JobState.DEAD


def test_a_dead_letter_of_a_job_asked_to_cancel_cancels_it() -> None:
    """A running job whose user asked to cancel it, and whose dispatch was dead-lettered, is CANCELLED: never
    dispatched again (it was QUEUED, claimable again) and not DEAD either (the user's ask wins, as for an
    expired lease); a job that moved on is still left alone."""
    for claims, dead_letters in [(1, 0), (3, 0), (0, 2)]:
        asked = DeadLetterFacts(JobState.RUNNING, claims, dead_letters, cancel_requested=True)
        assert dead_letter_outcome(asked, delivery_limit=3) is JobState.CANCELLED
    moved_on = DeadLetterFacts(JobState.RETRY_WAIT, 1, 0, cancel_requested=True)
    assert dead_letter_outcome(moved_on, delivery_limit=3) is None
    finished = DeadLetterFacts(JobState.SUCCEEDED, attempt_claims=1, dead_letters=0)
    assert dead_letter_outcome(finished, delivery_limit=3) is None
