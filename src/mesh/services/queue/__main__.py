"""``python -m mesh.services.queue``: the queue service (API, outbox relay, reconciler, dead letters)."""

from __future__ import annotations

from mesh.kit.runtime import run_service
from mesh.services.queue.server import queue_service
from mesh.services.queue.settings import QueueSettings


def run() -> None:
    """Serve until SIGTERM or Ctrl-C; a start-up error exits 2 with one line."""
    run_service("queue", QueueSettings, queue_service)


if __name__ == "__main__":
    run()
