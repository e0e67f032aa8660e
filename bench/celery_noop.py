"""The Celery peer of the queue benchmark: a no-op task on RabbitMQ with ``acks_late`` (see bench_queue)."""

from __future__ import annotations

import os

from celery import Celery

AMQP_URL = os.environ.get("MESH_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")

app = Celery("mesh_bench", broker=AMQP_URL, backend="rpc://")
app.conf.update(
    task_acks_late=True,
    task_default_queue=os.environ.get("MESH_BENCH_CELERY_QUEUE", "mesh-bench-celery"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="mesh_bench.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """Does nothing."""
