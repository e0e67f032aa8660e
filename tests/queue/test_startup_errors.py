"""``python -m mesh.services.queue`` as a real process: a start-up error is one line and exit 2, as in every
other service (it was a traceback and exit 1). Its start and SIGTERM: ``tests/kit/test_service_processes.py``."""

from __future__ import annotations

import os
import sys

from tests.processes import reason, refused_start

# The process as ``python -m mesh.services.queue`` runs it, its start refused as a StartupError would refuse it,
# and its app's close() announced on stdout.
REFUSED_START = """
import runpy
from mesh.kit.errors import StartupError
from mesh.services.queue.app import QueueApp

close = QueueApp.close

async def refuse(self, **kwargs):
    raise StartupError("the queue's volume is read-only; give uid 10001 write access")

async def announced_close(self):
    print("queue app closed", flush=True)
    await close(self)

QueueApp.start = refuse
QueueApp.close = announced_close
runpy.run_module("mesh.services.queue", run_name="__main__", alter_sys=True)
"""


def test_a_startup_error_while_the_queue_service_is_wired_exits_2_with_one_line() -> None:
    """A StartupError raised as the service starts ends the process with status 2 and one line naming the
    service and the fix, like the file, image-processing and inference services; what the app opened is
    closed. It was a traceback and status 1 (the queue's ``__main__`` had no ``exit_on_startup_error``)."""
    env = {
        **os.environ,
        # Nothing listens there: the start must fail on the StartupError, not wait for a database.
        "MESH_DATABASE_URL": "postgresql://mesh@127.0.0.1:1/mesh",
        "MESH_GRPC_PORT": "0",
        "MESH_HTTP_PORT": "0",
    }
    done = refused_start([sys.executable, "-c", REFUSED_START], env)
    assert reason(done) == (
        "queue: cannot start: the queue's volume is read-only; give uid 10001 write access"
    )
    assert done.stdout.splitlines() == ["queue app closed"]
