"""A caller's deadline, passed on to the calls made for it.

gRPC in Python does not carry a server call's deadline into the client calls its handler makes: a streaming
method (no default deadline on the channel) would wait for ever, and any call may outlive the caller who
wanted its answer. Each outgoing call takes the settings' ``rpc_timeout_seconds``, or less when the caller's
own deadline comes sooner.
"""

from __future__ import annotations

import time


def deadline_in(seconds: float | None) -> float | None:
    """The ``time.monotonic()`` instant ``seconds`` from now (a server call's ``context.time_remaining()``);
    None, no deadline, stays None."""
    return None if seconds is None else time.monotonic() + seconds


def call_timeout(limit: float, deadline: float | None) -> float:
    """The timeout of a call made for a caller whose deadline is ``deadline`` (a ``time.monotonic()``
    instant, or None): ``limit``, or the time the caller has left where that is less (0 once it has passed,
    which gRPC answers with DEADLINE_EXCEEDED at once)."""
    if deadline is None:
        return limit
    return max(0.0, min(limit, deadline - time.monotonic()))
