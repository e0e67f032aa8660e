"""``make k8s-check`` names a ``MESH_*`` variable set on a workload whose process does not read it, now that each
service's settings class holds only the settings its process reads (``mesh.kit.settings``' mixins): before,
every class inherited the broker, blob store, device and address settings, so setting them anywhere passed."""

from __future__ import annotations

from typing import Any

from mesh.tools.k8s_check.checks import check_overlay
from mesh.tools.k8s_check.policy import Overlay
from mesh.tools.k8s_check.render import Manifest


def _messages(objects: list[Manifest]) -> list[str]:
    return [str(v) for v in check_overlay(Overlay("test", objects, gpu=False))]


def _container(objects: list[Manifest], name: str) -> Any:
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _set_env(container: Any, name: str, value: str) -> None:
    env = container.setdefault("env", [])
    env[:] = [e for e in env if e["name"] != name]
    env.append({"name": name, "value": value})


def test_the_committed_overlay_sets_no_variable_its_process_does_not_read(dev: list[Manifest]) -> None:
    """The baseline of the tests below: the dev overlay as committed passes."""
    assert _messages(dev) == []


def test_a_device_on_the_file_service_is_reported(dev: list[Manifest]) -> None:
    """The file service computes nothing on a device: ``MESH_DEVICE=gpu`` on its container does nothing."""
    _set_env(_container(dev, "file"), "MESH_DEVICE", "gpu")
    assert _messages(dev) == [
        "Deployment/file container file: env MESH_DEVICE is not read by FileSettings "
        "(MESH_DEVICE is a setting of ImageSettings, InferenceSettings only)"
    ]


def test_broker_blob_and_address_settings_on_a_process_that_does_not_use_them_are_reported(
    dev: list[Manifest],
) -> None:
    """The gateway uses no RabbitMQ queue, the queue service no blob store, and inference calls neither the
    image processing service nor the queue service."""
    _set_env(_container(dev, "gateway"), "MESH_QUEUE_PREFIX", "staging.")
    _set_env(_container(dev, "queue"), "MESH_BLOB_DIR", "/var/lib/mesh/blobs")
    _set_env(_container(dev, "inference"), "MESH_IMAGE_SERVICE_ADDRESS", "image-processing:50052")
    assert set(_messages(dev)) == {
        "Deployment/gateway container gateway: env MESH_QUEUE_PREFIX is not read by GatewaySettings "
        "(MESH_QUEUE_PREFIX is a setting of ImageSettings, InferenceSettings, QueueSettings only)",
        "Deployment/inference container inference: env MESH_IMAGE_SERVICE_ADDRESS is not read by "
        "InferenceSettings (MESH_IMAGE_SERVICE_ADDRESS is a setting of GatewaySettings only)",
        "Deployment/queue container queue: env MESH_BLOB_DIR is not read by QueueSettings "
        "(MESH_BLOB_DIR is a setting of FileSettings only)",
    }
