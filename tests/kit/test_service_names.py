"""Each service's gRPC name is one constant read from its .proto descriptor: what its server registers, what
its health service answers for (``__main__`` passes the same constant), and what every caller, the gateway's
health board, the load tool and the manifest checks ask for."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from unittest.mock import Mock

import grpc
import pytest

from mesh.file.v1 import file_service_pb2, file_service_pb2_grpc
from mesh.image.v1 import image_processing_service_pb2
from mesh.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from mesh.queue.v1 import queue_service_pb2, queue_service_pb2_grpc
from mesh.services.file import settings as file_settings
from mesh.services.gateway import backends
from mesh.services.image_processing import servicer as image_servicer
from mesh.services.image_processing import settings as image_settings
from mesh.services.inference import settings as inference_settings
from mesh.services.queue import settings as queue_settings
from mesh.tools.k8s_check.policy import WORKLOADS
from mesh.tools.load.mesh import SERVICES

SRC = Path(__file__).resolve().parents[2] / "src" / "mesh"
GENERATED = ("common", "file", "image", "inference", "queue")
# A quoted "mesh.<package>.v1.<Service>" in hand-written code.
TYPED_NAME = re.compile(r"""["']mesh\.\w+\.v1\.\w+Service["']""")


class _RecordingServer:
    """Notes the service names a registration function registers its handlers under."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def add_generic_rpc_handlers(self, handlers: tuple[Any, ...]) -> None:
        self.names.update(handler.service_name() for handler in handlers)

    def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
        self.names.add(name)


Register = Callable[[Any, grpc.aio.Server], None]
# key: (the service's constant, the descriptor's full name, the function that registers its methods)
SERVICES_BY_KEY: dict[str, tuple[str, str, Register]] = {
    "file": (
        file_settings.SERVICE_NAME,
        file_service_pb2.DESCRIPTOR.services_by_name["FileService"].full_name,
        file_service_pb2_grpc.add_FileServiceServicer_to_server,
    ),
    "image": (
        image_settings.SERVICE_NAME,
        image_processing_service_pb2.DESCRIPTOR.services_by_name["ImageProcessingService"].full_name,
        # Registered by hand (with its own reply serialiser), not through the generated code.
        image_servicer.add_to_server,
    ),
    "inference": (
        inference_settings.SERVICE_NAME,
        inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server,
    ),
    "queue": (
        queue_settings.SERVICE_NAME,
        queue_service_pb2.DESCRIPTOR.services_by_name["QueueService"].full_name,
        queue_service_pb2_grpc.add_QueueServiceServicer_to_server,
    ),
}


@pytest.mark.parametrize("key", sorted(SERVICES_BY_KEY))
def test_a_service_s_name_is_its_descriptor_s_and_what_its_server_registers(key: str) -> None:
    """The constant is the .proto's full name, and the server's methods are registered under it."""
    constant, full_name, register = SERVICES_BY_KEY[key]
    server = _RecordingServer()
    register(Mock(), cast(grpc.aio.Server, server))
    assert constant == full_name
    assert server.names == {constant}


def test_every_caller_asks_for_the_services_by_their_constants() -> None:
    """The gateway's channels and health board, the load tool's health checks and the manifests' gRPC probes
    name each service as the service itself does."""
    constants = {key: constant for key, (constant, _, _) in SERVICES_BY_KEY.items()}
    gateway = {
        "file": backends.FILE_SERVICE,
        "image": backends.IMAGE_SERVICE,
        "inference": backends.INFERENCE_SERVICE,
        "queue": backends.QUEUE_SERVICE,
    }
    probed = {
        "file": WORKLOADS["file"].health_name,
        "image": WORKLOADS["image-processing"].health_name,
        "inference": WORKLOADS["inference"].health_name,
        "queue": WORKLOADS["queue"].health_name,
    }
    assert gateway == constants
    assert constants == SERVICES
    assert probed == constants


def test_no_hand_written_module_types_a_service_name_out() -> None:
    """A service name written as a string literal can drift from the .proto: outside the generated code,
    every name comes from a constant read from the descriptor."""
    typed = [
        f"{path.relative_to(SRC)}:{number}: {line.strip()}"
        for path in sorted(SRC.rglob("*.py"))
        if path.relative_to(SRC).parts[0] not in GENERATED
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if TYPED_NAME.search(line)
    ]
    assert typed == []
