"""The queue service's settings (``MESH_*`` environment variables)."""

from __future__ import annotations

from pydantic import Field

from mesh.kit.settings import BrokerSettings, FileServiceAddress, InferenceServiceAddress, ServerSettings
from mesh.queue.v1 import queue_service_pb2

SERVICE_NAME = queue_service_pb2.DESCRIPTOR.services_by_name["QueueService"].full_name
"""The queue service's gRPC (and health) name, from the .proto so that it cannot drift."""


class QueueSettings(BrokerSettings, FileServiceAddress, InferenceServiceAddress, ServerSettings):
    """Settings of the queue service process (API, outbox relay, reconciler, dead-letter consumer); a submit
    asks the file and inference services whether its image and model exist."""

    grpc_port: int = Field(default=50054, ge=0, le=65535)
    """gRPC port of the queue service."""

    http_port: int = Field(default=9104, ge=0, le=65535)
    """HTTP port for /metrics and /healthz."""

    default_max_attempts: int = Field(default=5, ge=1, le=100)
    """Attempts a job gets when its submit names none."""

    backoff_base_seconds: float = Field(default=1.0, gt=0)
    """Backoff ceiling before the first retry; it doubles per retry (full jitter below it)."""

    backoff_cap_seconds: float = Field(default=300.0, gt=0)
    """Largest backoff ceiling."""

    reference_check_seconds: float = Field(default=1.0, ge=0)
    """How long a submit waits for the file and inference services to say whether its image and model exist
    (NOT_FOUND at once when not); a service that does not answer in time lets the job through and its worker
    checks. 0 turns the lookups off."""

    relay_batch_size: int = Field(default=256, ge=1, le=10_000)
    """Outbox rows the relay publishes per round."""

    relay_process: bool = True
    """Run the outbox relay in a child process (``mesh.services.queue.relay_process``), beside the API, rather
    than on the API's event loop."""

    relay_poll_seconds: float = Field(default=0.5, gt=0)
    """How often the relay looks at the outbox when nothing woke it."""

    relay_lock_seconds: float = Field(default=30.0, gt=0)
    """How long a relay holds outbox rows it is publishing; unconfirmed rows are published again after."""

    publish_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long one publish waits for the broker's confirm."""

    relay_stall_seconds: float = Field(default=10.0, ge=1.0)
    """How long the relay's child process (``relay_process``) may go without reporting to the service (it
    reports four times a second while its event loop turns) before it is killed and started again: a child
    that hangs, or is stopped, publishes nothing and does not exit."""

    outbox_stale_seconds: float = Field(default=30.0, gt=0)
    """The ``outbox`` health check says degraded while the oldest dispatch waiting in the outbox is older than
    this: jobs are accepted but not dispatched (the relay hangs, RabbitMQ refuses or is away, or the relay
    falls this far behind). A dispatch whose relay died waits ``relay_lock_seconds`` before another publishes
    it."""

    reconcile_interval_seconds: float = Field(default=1.0, gt=0)
    """How often the reconciler re-queues due retries and stalled leases."""

    stale_queued_seconds: float = Field(default=300.0, gt=0)
    """A queued job no worker has claimed for this long is dispatched again (a lost message)."""

    job_retention_days: float = Field(default=30.0, ge=0)
    """Finished jobs (SUCCEEDED, FAILED, DEAD, CANCELLED) are deleted, with their history, this long after they
    finished, so that the jobs table and its counts stay bounded; 0 keeps them for ever. The images a job
    wrote stay in the file service; ``GET /v1/jobs/{id}`` of a deleted job is 404, and a submit with its
    idempotency key makes a new job."""

    prune_interval_seconds: float = Field(default=60.0, gt=0)
    """How often finished jobs past their retention are looked for."""

    watch_poll_seconds: float = Field(default=0.2, gt=0)
    """How often WatchJob reads the watched job's row."""

    stats_interval_seconds: float = Field(default=5.0, gt=0)
    """How often the queue gauges (depth, oldest age) are refreshed."""

    amqp_reconnect_seconds: float = Field(default=1.0, gt=0)
    """Pause between reconnection attempts to RabbitMQ."""

    db_pool_max_size: int = Field(default=10, ge=2)
    """Most PostgreSQL connections the service holds."""
