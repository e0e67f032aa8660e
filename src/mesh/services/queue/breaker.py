"""A worker's circuit breaker for the services its jobs call.

When a job fails because a service it needs answered UNAVAILABLE (the file service restarting, inference
away), every job after it would fail the same way: a worker that kept claiming spent an attempt of each job in
its backlog per backoff round, and a 15 s restart turned accepted jobs FAILED. The breaker holds new attempts
back instead: after such a failure nothing new starts for a pause; then one attempt is let through as a trial;
its failure doubles the pause (up to a ceiling), and any attempt that gets past its dependencies closes the
breaker again. Jobs that wait meanwhile stay QUEUED and spend nothing; only the attempts running when the
outage began, and one trial per pause, are counted.

No I/O: the worker reports outcomes and asks whether it may start an attempt, with a clock it can inject.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class DependencyBreaker:
    """Closed (attempts start freely), open (none starts until the pause ends), or half-open (one trial)."""

    def __init__(
        self, *, first_pause: float, max_pause: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.first_pause = first_pause
        self.max_pause = max_pause
        self._clock = clock
        self._pause = 0.0
        """The current pause; 0 while closed."""
        self._until = 0.0
        self._trial = False
        self.reason = ""
        """What the failure that opened it said."""

    @property
    def closed(self) -> bool:
        """Whether attempts start freely."""
        return self._pause == 0.0

    def seconds_left(self) -> float:
        """How long until a trial may start (0 when closed, or once the pause is over)."""
        return 0.0 if self.closed else max(self._until - self._clock(), 0.0)

    @property
    def trial_running(self) -> bool:
        """Whether the one attempt let through after a pause is still running."""
        return self._trial

    def ready(self) -> bool:
        """Whether an attempt may start now: closed, or the pause is over and no trial is running."""
        return self.closed or (not self._trial and self.seconds_left() == 0.0)

    def started(self) -> bool:
        """An attempt started (call only when :meth:`ready`); True when it is the trial (the breaker is open)."""
        if self.closed:
            return False
        self._trial = True
        return True

    def failed(self, reason: str, *, trial: bool) -> None:
        """An attempt failed because a service it called was unavailable: open; or, for the trial, pause twice
        as long. An attempt that started before the breaker opened, failing while it is open, changes nothing:
        only the trial tells whether the service is back."""
        if self.closed:
            self._pause = self.first_pause
        elif trial and self._trial:
            self._pause = min(self._pause * 2, self.max_pause)
        else:
            return
        self._trial = False
        self._until = self._clock() + self._pause
        self.reason = reason

    def succeeded(self) -> None:
        """An attempt got past its dependencies (whatever its own outcome): close."""
        self._pause = 0.0
        self._trial = False
        self.reason = ""

    def trial_ended(self) -> None:
        """The trial ended without telling (its job was cancelled or not claimable, it crashed, it lost its
        lease): the next attempt may be the trial, at once, since the pause is over."""
        self._trial = False
