"""Per-version statistics (``stats.VersionStats``): what each total sums, and over what."""

from __future__ import annotations

import pytest

from mesh.services.inference.stats import VersionStats


def test_queue_time_is_summed_per_queued_request_and_compute_time_per_batch() -> None:
    """Every request that left the queue adds its wait (answered or not) and counts in queued_count; a batch adds
    its compute time once however many requests shared it, and counts in batch_count."""
    stats = VersionStats("stats-test", "1")
    stats.request_dequeued(0.25)  # its batch started after 0.25 s
    stats.request_dequeued(0.5)  # expired in the queue after 0.5 s
    stats.batch_executed(3, 0.125)
    stats.batch_executed(1, 0.0625)
    message = stats.to_proto()
    assert message.queued_count == 2
    assert message.queue_seconds_total == pytest.approx(0.75)
    assert message.batch_count == 2
    assert message.compute_seconds_total == pytest.approx(0.1875)
    assert dict(message.batch_size_counts) == {3: 1, 1: 1}
