"""Each gRPC service started as ``python -m mesh.services.<name>`` (through ``run_service``) serves, and on
SIGTERM drains, closes what its wiring opened and exits 0. The file service and the gateway have theirs in
``tests/file/test_main.py`` and ``tests/gateway/test_main.py``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.kit.jobs import IMAGE_JOBS_QUEUE, INFERENCE_JOBS_QUEUE
from mesh.kit.runtime import LIVENESS_SERVICE
from tests.processes import read_started
from tests.queue.harness import delete_queues

pytestmark = pytest.mark.integration

SERVICES = {
    "mesh.services.queue": {"MESH_REFERENCE_CHECK_SECONDS": "0"},
    "mesh.services.image_processing": {"MESH_DEVICE": "cpu"},
    "mesh.services.inference": {"MESH_DEVICE": "cpu"},  # the checkout's models/
}


@pytest.mark.parametrize("module", list(SERVICES))
async def test_a_service_process_serves_and_exits_0_on_sigterm(
    module: str, database_url: str, amqp_url: str, unique_name: str
) -> None:
    """Started from its MESH_* variables, the process answers liveness SERVING on its gRPC port, and on
    SIGTERM it logs its drain and its stop and exits 0."""
    env = {
        **os.environ,
        "MESH_DATABASE_URL": database_url,
        "MESH_AMQP_URL": amqp_url,
        "MESH_QUEUE_PREFIX": f"{unique_name}.",
        "MESH_GRPC_HOST": "127.0.0.1",
        "MESH_GRPC_PORT": "0",
        "MESH_HTTP_HOST": "127.0.0.1",
        "MESH_HTTP_PORT": "0",
        "MESH_GRACE_SECONDS": "2",
        "MESH_LOG_FORMAT": "json",
        **SERVICES[module],
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        started = await asyncio.wait_for(read_started(process), 60)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{started['grpc_port']}") as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE)
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, rest.decode()
        events = [json.loads(line)["event"] for line in rest.decode().splitlines() if line.startswith("{")]
        assert events.index("draining") < events.index("stopped")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await delete_queues(
            amqp_url, [f"{unique_name}.{IMAGE_JOBS_QUEUE}", f"{unique_name}.{INFERENCE_JOBS_QUEUE}"]
        )
