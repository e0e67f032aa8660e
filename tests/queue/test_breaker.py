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
    breaker.failed("file service unavailable")
    assert (breaker.ready(), breaker.seconds_left(), breaker.reason) == (
        False,
        1.0,
        "file service unavailable",
    )
    clock.now += 1.0
    assert breaker.ready()
    breaker.started()
    assert not breaker.ready()  # the trial runs alone
    breaker.failed("still down")
    assert breaker.seconds_left() == 2.0
    clock.now += 2.0
    breaker.started()
    breaker.failed("still down")
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
        breaker.failed("down")
    assert breaker.seconds_left() == 1.0
