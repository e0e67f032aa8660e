"""mesh.services.queue.breaker: new attempts held back while a service the jobs call is unavailable."""

from __future__ import annotations

from mesh.services.queue.breaker import DependencyBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_dependency_failure_holds_attempts_back_then_lets_one_trial_through() -> None:
    """Closed, attempts start freely; after an UNAVAILABLE none starts for the pause, then exactly one (the
    trial) until it reports; a trial that fails doubles the pause up to the ceiling; a success closes."""
    clock = Clock()
    breaker = DependencyBreaker(first_pause=1.0, max_pause=3.0, clock=clock)
    assert (breaker.ready(), breaker.closed) == (True, True)
    assert breaker.started() is False  # closed: no trial
    breaker.failed("file service unavailable", trial=False)
    assert (breaker.ready(), breaker.seconds_left(), breaker.reason) == (
        False,
        1.0,
        "file service unavailable",
    )
    clock.now += 1.0
    assert breaker.ready()
    assert breaker.started() is True
    assert (breaker.ready(), breaker.trial_running) == (False, True)  # the trial runs alone
    breaker.failed("still down", trial=True)
    assert breaker.seconds_left() == 2.0
    clock.now += 2.0
    breaker.started()
    breaker.failed("still down", trial=True)
    assert breaker.seconds_left() == 3.0  # the ceiling
    clock.now += 3.0
    breaker.started()
    breaker.succeeded()
    assert (breaker.closed, breaker.ready(), breaker.reason) == (True, True, "")


def test_failures_of_attempts_started_before_it_opened_do_not_lengthen_the_pause() -> None:
    """Four jobs running when the outage began all fail: the first opens the breaker, the others change
    nothing (no trial was let through yet)."""
    clock = Clock()
    breaker = DependencyBreaker(first_pause=1.0, max_pause=30.0, clock=clock)
    for _ in range(4):
        breaker.failed("down", trial=False)
    assert breaker.seconds_left() == 1.0


def test_only_the_trials_failure_lengthens_the_pause_and_lets_another_through() -> None:
    """While the trial runs, an attempt that started before the breaker opened fails too: that neither doubles
    the pause nor ends the trial, so no second trial starts beside the first."""
    clock = Clock()
    breaker = DependencyBreaker(first_pause=1.0, max_pause=30.0, clock=clock)
    breaker.failed("down", trial=False)
    clock.now += 1.0
    assert breaker.started() is True
    breaker.failed("down", trial=False)  # an older attempt
    assert (breaker.trial_running, breaker.ready(), breaker.seconds_left()) == (True, False, 0.0)


def test_a_trial_that_ends_without_an_answer_lets_the_next_attempt_be_the_trial() -> None:
    """A trial whose job was cancelled, not claimable, crashed or lost its lease never reports: once it ends,
    the next attempt may start at once (the pause is over), and the pause keeps its length."""
    clock = Clock()
    breaker = DependencyBreaker(first_pause=1.0, max_pause=30.0, clock=clock)
    breaker.failed("down", trial=False)
    clock.now += 1.0
    breaker.started()
    breaker.trial_ended()
    assert (breaker.ready(), breaker.closed) == (True, False)
    assert breaker.started() is True
    breaker.failed("down", trial=True)
    assert breaker.seconds_left() == 2.0
