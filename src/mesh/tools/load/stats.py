"""Latency and status bookkeeping, reported in ghz's JSON shape (durations in nanoseconds)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
NS_PER_MS = 1_000_000


def percentile(sorted_values: list[int], pct: float) -> int:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Recorder:
    """Every call's latency and final status, for one scenario."""

    name: str
    call: str
    latencies_ns: list[int] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, latency_ns: int, status: str = "OK", detail: str = "") -> None:
        """Record one finished call; ``detail`` (the error message) is grouped like ghz's errorDistribution."""
        self.latencies_ns.append(latency_ns)
        self.statuses[status] += 1
        if status != "OK":
            self.errors[f"rpc error: code = {status} desc = {detail}"[:300]] += 1

    @property
    def count(self) -> int:
        return len(self.latencies_ns)

    @property
    def error_count(self) -> int:
        return self.count - self.statuses["OK"]

    def report(self, total_ns: int, options: dict[str, Any]) -> dict[str, Any]:
        """A ghz-style summary: count, total, average, fastest, slowest, rps, latencyDistribution,
        statusCodeDistribution and errorDistribution, plus ``latency_ms`` for people."""
        ordered = sorted(self.latencies_ns)
        average = sum(ordered) // len(ordered) if ordered else 0
        distribution = [{"percentage": p, "latency": percentile(ordered, p)} for p in PERCENTILES]
        return {
            "name": self.name,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "options": {"call": self.call, **options},
            "count": self.count,
            "total": total_ns,
            "average": average,
            "fastest": ordered[0] if ordered else 0,
            "slowest": ordered[-1] if ordered else 0,
            "rps": round(self.count / (total_ns / 1e9), 2) if total_ns else 0.0,
            "errors": self.error_count,
            "latencyDistribution": distribution,
            "statusCodeDistribution": dict(sorted(self.statuses.items())),
            "errorDistribution": dict(self.errors.most_common(10)),
            "latency_ms": {
                "average": round(average / NS_PER_MS, 3),
                **{f"p{p}": round(percentile(ordered, p) / NS_PER_MS, 3) for p in (50, 90, 99)},
            },
        }
