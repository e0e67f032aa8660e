"""Serving statistics per model version (GetModelStatistics) and the matching Prometheus metrics."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from mesh.inference.v1 import inference_service_pb2 as pb

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

BATCH_SIZE = Histogram(
    "mesh_inference_batch_size",
    "Items per executed batch.",
    ["model", "version"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUE_SECONDS = Histogram(
    "mesh_inference_queue_seconds",
    "Time a request waited in the batch queue: until its batch started computing, or until it got no output "
    "(expired, cancelled, failed).",
    ["model", "version"],
    buckets=_LATENCY_BUCKETS,
)
COMPUTE_SECONDS = Histogram(
    "mesh_inference_compute_seconds",
    "Wall time of one batch computation (one observation per batch, not per request).",
    ["model", "version"],
    buckets=_LATENCY_BUCKETS,
)
REQUEST_SECONDS = Histogram(
    "mesh_inference_request_seconds",
    "Time to answer one prediction (input fetch and decode, queue, compute).",
    ["model", "version", "operation"],
    buckets=_LATENCY_BUCKETS,
)
REQUESTS = Counter(
    "mesh_inference_requests_total", "Predictions answered, by status code.", ["model", "version", "code"]
)
MODEL_READY = Gauge("mesh_inference_model_ready", "1 when the model version is ready.", ["model", "version"])


@dataclass
class VersionStats:
    """Counters of one model version; also the batcher's observer. Queue time is summed per queued request
    (``queued_count`` of them), compute time per batch (``batch_count`` of them): a batch's time is counted once,
    however many requests shared it."""

    name: str
    version: str
    request_count: int = 0
    success_count: int = 0
    failures_by_reason: collections.Counter[str] = field(default_factory=collections.Counter)
    queue_seconds_total: float = 0.0
    queued_count: int = 0
    compute_seconds_total: float = 0.0
    batch_count: int = 0
    batch_size_counts: collections.Counter[int] = field(default_factory=collections.Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request_received(self) -> None:
        """A request for this version arrived."""
        with self._lock:
            self.request_count += 1

    def request_dequeued(self, queue_seconds: float) -> None:
        """A request left the batch queue after ``queue_seconds``: its batch started, or it left with no output
        (expired, cancelled, failed). Counted for every queued request, so that the requests a slow queue made
        give up are not missing from its total."""
        with self._lock:
            self.queued_count += 1
            self.queue_seconds_total += queue_seconds
        QUEUE_SECONDS.labels(self.name, self.version).observe(queue_seconds)

    def request_succeeded(self, operation: str, total_seconds: float) -> None:
        """A request was answered (its queue time is counted by :meth:`request_dequeued`)."""
        with self._lock:
            self.success_count += 1
        REQUEST_SECONDS.labels(self.name, self.version, operation).observe(total_seconds)
        REQUESTS.labels(self.name, self.version, "OK").inc()

    def request_failed(self, reason: str) -> None:
        """A request failed; ``reason`` is the gRPC status code name."""
        with self._lock:
            self.failures_by_reason[reason] += 1
        REQUESTS.labels(self.name, self.version, reason).inc()

    def batch_executed(self, size: int, compute_seconds: float) -> None:
        """A batch of ``size`` items took ``compute_seconds`` (BatchObserver)."""
        with self._lock:
            self.batch_count += 1
            self.batch_size_counts[size] += 1
            self.compute_seconds_total += compute_seconds
        BATCH_SIZE.labels(self.name, self.version).observe(size)
        COMPUTE_SECONDS.labels(self.name, self.version).observe(compute_seconds)

    def set_ready(self, ready: bool) -> None:
        """Export readiness."""
        MODEL_READY.labels(self.name, self.version).set(1 if ready else 0)

    def track_ready(self, ready: Callable[[], bool]) -> None:
        """Export readiness as ``ready()`` says at each scrape: a loaded model can lose it (its workers)."""
        MODEL_READY.labels(self.name, self.version).set_function(lambda: 1.0 if ready() else 0.0)

    def to_proto(self) -> pb.ModelStatistics:
        """A consistent snapshot as ``ModelStatistics``."""
        with self._lock:
            return pb.ModelStatistics(
                name=self.name,
                version=self.version,
                request_count=self.request_count,
                success_count=self.success_count,
                failures_by_reason=dict(self.failures_by_reason),
                queue_seconds_total=self.queue_seconds_total,
                queued_count=self.queued_count,
                compute_seconds_total=self.compute_seconds_total,
                batch_count=self.batch_count,
                batch_size_counts=dict(self.batch_size_counts),
            )
