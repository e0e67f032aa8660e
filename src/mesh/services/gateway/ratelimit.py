"""Rate limits per caller and route with the ``limits`` library (moving window, in process memory).

Every limited response carries ``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset`` (seconds
until the window frees a request); a refused one is 429 with ``Retry-After``.
"""

from __future__ import annotations

import math
import time

from limits import parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from mesh.kit import errors


class RateLimiter:
    """One limit (``600/minute``) applied to each (caller, route) pair."""

    def __init__(self, limit: str) -> None:
        self.item = parse(limit)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    async def check(self, caller: str, route: str) -> tuple[dict[str, str], errors.MeshError | None]:
        """Count one request; returns the headers to send and, when refused, the 429 error."""
        allowed = await self._limiter.hit(self.item, caller, route)
        stats = await self._limiter.get_window_stats(self.item, caller, route)
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        headers = {
            "RateLimit-Limit": str(self.item.amount),
            "RateLimit-Remaining": str(max(0, stats.remaining)),
            "RateLimit-Reset": str(reset),
        }
        if allowed:
            return headers, None
        return headers, errors.ResourceExhausted(
            f"rate limit of {self.item} exceeded for this route; retry in {max(1, reset)} s",
            reason="RATE_LIMITED",
            retry_after_seconds=max(1, reset),
            metadata={"limit": str(self.item)},
        )
