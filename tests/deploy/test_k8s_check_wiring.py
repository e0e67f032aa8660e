"""``make k8s-check``: the manifests wire the processes as they run, not only as Kubernetes accepts them.

Settings reach a process that reads them, ports agree from the setting to the Service, service addresses name
a Service port, the blob store is on its volume, and the job workers scale on CPU too. Each test breaks a
committed manifest the way an operator could, and expects the check to name the mistake.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh.tools.k8s_check import check_directory
from mesh.tools.k8s_check.checks import check_overlay
from mesh.tools.k8s_check.policy import Overlay
from mesh.tools.k8s_check.render import Manifest

VERSION = "1.31.0"


def _messages(objects: list[Manifest]) -> list[str]:
    return [str(v) for v in check_overlay(Overlay("test", objects, gpu=False))]


def _find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def _container(objects: list[Manifest], name: str) -> Any:
    return _find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def _config(objects: list[Manifest]) -> Any:
    return _find(objects, "ConfigMap", "mesh-config")["data"]


def _set_env(container: Any, name: str, value: str) -> None:
    env = container.setdefault("env", [])
    env[:] = [e for e in env if e["name"] != name]
    env.append({"name": name, "value": value})


def _edited(k8s_copy: Path, file: str, old: str, new: str) -> list[str]:
    """The dev overlay's violations after replacing ``old`` by ``new`` in one base file (as the reviewer's
    mutation script does)."""
    path = k8s_copy / "base" / file
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return [str(v) for v in check_directory(k8s_copy / "overlays" / "dev", kubernetes_version=VERSION)]


def test_misspelt_configmap_variable_is_caught(k8s_copy: Path) -> None:
    """MESH_GRACE_SECOND (for MESH_GRACE_SECONDS) in the shared ConfigMap is read by no process, so every pod
    drained on the default grace while the manifest looked right: it is reported with the closest setting."""
    messages = _edited(k8s_copy, "config.yaml", 'MESH_GRACE_SECONDS: "10"', 'MESH_GRACE_SECOND: "10"')
    assert messages == [
        "ConfigMap/mesh-config: MESH_GRACE_SECOND is read by none of the workloads that take it (file, gateway, "
        "image-processing, inference, queue; MESH_GRACE_SECOND is not a setting of the mesh and is ignored; "
        "did you mean MESH_GRACE_SECONDS?)"
    ]


def test_deployment_env_of_another_service_is_caught(dev: list[Manifest]) -> None:
    """A Deployment's own env must be read by the service it runs: the gateway's MESH_FORWARDED_ALLOW_IPS on
    the file service does nothing, and a typo in it is named too."""
    _set_env(_container(dev, "file"), "MESH_FORWARDED_ALLOW_IPS", "*")
    _set_env(_container(dev, "queue"), "MESH_RELAY_BATCH_SIZ", "100")
    messages = _messages(dev)
    assert (
        "Deployment/file container file: env MESH_FORWARDED_ALLOW_IPS is not read by FileSettings "
        "(MESH_FORWARDED_ALLOW_IPS is a setting of GatewaySettings only)"
    ) in messages
    assert any(
        m.startswith(
            "Deployment/queue container queue: env MESH_RELAY_BATCH_SIZ is not read by QueueSettings"
        )
        and "did you mean MESH_RELAY_BATCH_SIZE?" in m
        for m in messages
    )
    assert len(messages) == 2


def test_shared_configmap_variable_needs_one_reader_among_its_takers(dev: list[Manifest]) -> None:
    """A ConfigMap variable is fine when some workload taking it reads it (the gateway's MESH_*_SERVICE_HTTP
    in the shared one, a queue-only setting there too), and reported when none does (a ConfigMap that only the
    file service takes, holding inference's MESH_MODEL_DIR)."""
    _config(dev)["MESH_RELAY_BATCH_SIZE"] = "100"
    assert _messages(dev) == []
    dev.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "file-extra", "namespace": "mesh-dev"},
            "data": {"MESH_MODEL_DIR": "/models"},
        }
    )
    _container(dev, "file")["envFrom"].append({"configMapRef": {"name": "file-extra"}})
    assert _messages(dev) == [
        "ConfigMap/file-extra: MESH_MODEL_DIR is read by none of the workloads that take it (file; "
        "MESH_MODEL_DIR is a setting of InferenceSettings only)"
    ]


def test_port_setting_that_disagrees_with_container_probes_and_service_is_caught(k8s_copy: Path) -> None:
    """MESH_GRPC_PORT 50061 on the file service, with its container port, probes and Service still on 50051:
    the probes fail and restart a serving pod, and the Service reaches nothing. Each is named."""
    messages = _edited(k8s_copy, "file.yaml", '              value: "50051"', '              value: "50061"')
    listening = "gRPC on 50061 (MESH_GRPC_PORT from env)"
    assert messages == [
        f"Deployment/file container file: containerPort grpc is 50051, but the service listens for {listening}",
        "Deployment/file container file: startupProbe, readinessProbe, livenessProbe probe port 50051, but the "
        f"service listens for {listening}",
        f"Service/file: port grpc sends to 50051, where Deployment/file does not listen ({listening}, "
        "HTTP on 9101 (MESH_HTTP_PORT from env))",
    ]


def test_unset_port_setting_is_checked_at_its_default(dev: list[Manifest]) -> None:
    """Without MESH_HTTP_PORT the queue service listens on its default 9104 (CONTRACT.md): a container port
    moved to 9200 is reported against that default, and so is the Service that follows the port's name."""
    container = _container(dev, "queue")
    container["env"] = [e for e in container["env"] if e["name"] != "MESH_HTTP_PORT"]
    next(p for p in container["ports"] if p["name"] == "http")["containerPort"] = 9200
    assert _messages(dev) == [
        "Deployment/queue container queue: containerPort http is 9200, but the service listens for HTTP on "
        "9104 (the default of MESH_HTTP_PORT)",
        "Service/queue: port http sends to 9200, where Deployment/queue does not listen (gRPC on 50054 "
        "(MESH_GRPC_PORT from env), HTTP on 9104 (the default of MESH_HTTP_PORT))",
    ]


def test_gateway_probe_on_a_port_it_does_not_serve_is_caught(dev: list[Manifest]) -> None:
    """The gateway serves HTTP only: an HTTP probe on another port, and a gRPC container port, are reported."""
    container = _container(dev, "gateway")
    container["livenessProbe"]["httpGet"]["port"] = 9000
    container["ports"].append({"name": "grpc", "containerPort": 50050})
    messages = _messages(dev)
    assert (
        "Deployment/gateway container gateway: livenessProbe probe port 9000, but the service listens for HTTP "
        "on 8080 (MESH_HTTP_PORT from env)"
    ) in messages
    assert "Deployment/gateway container gateway: containerPort grpc (50050): the service serves no gRPC" in (
        messages
    )


def test_service_address_to_a_missing_port_is_caught(k8s_copy: Path) -> None:
    """MESH_FILE_SERVICE_ADDRESS file:50052 names no port of Service/file: every call to the file service
    failed while every pod was healthy."""
    messages = _edited(
        k8s_copy,
        "config.yaml",
        "MESH_FILE_SERVICE_ADDRESS: file:50051",
        "MESH_FILE_SERVICE_ADDRESS: file:50052",
    )
    assert messages == [
        "ConfigMap/mesh-config: MESH_FILE_SERVICE_ADDRESS file:50052: Service/file has no port 50052 "
        "(its ports: 50051, 9101)"
    ]


def test_service_address_to_a_missing_service_or_the_wrong_port_is_caught(dev: list[Manifest]) -> None:
    """An address names an existing Service (a namespace-qualified name in this namespace counts), the workload
    it is for, and that workload's gRPC port (its HTTP port for the gateway's MESH_*_SERVICE_HTTP); a host in
    another namespace is left alone."""
    config = _config(dev)
    config["MESH_QUEUE_SERVICE_ADDRESS"] = "queues:50054"
    config["MESH_INFERENCE_SERVICE_ADDRESS"] = "image-processing.mesh-dev.svc.cluster.local:50052"
    config["MESH_FILE_SERVICE_HTTP"] = "file:50051"
    config["MESH_IMAGE_SERVICE_ADDRESS"] = "image-processing.elsewhere:1"
    _set_env(_container(dev, "gateway"), "MESH_QUEUE_SERVICE_HTTP", "queue")
    assert _messages(dev) == [
        "ConfigMap/mesh-config: MESH_INFERENCE_SERVICE_ADDRESS image-processing.mesh-dev.svc.cluster.local:50052: "
        "Service/image-processing does not select the pods of Deployment/inference",
        "ConfigMap/mesh-config: MESH_QUEUE_SERVICE_ADDRESS queues:50054: there is no Service queues",
        "ConfigMap/mesh-config: MESH_FILE_SERVICE_HTTP file:50051: Service/file sends it to Deployment/file's "
        "gRPC on 50051 (MESH_GRPC_PORT from env), not to its HTTP port",
        "Deployment/gateway: MESH_QUEUE_SERVICE_HTTP 'queue' is not host:port",
    ]


def test_blob_dir_off_the_volume_is_caught(k8s_copy: Path) -> None:
    """MESH_BLOB_DIR /data/blobs is on the file service's read-only root filesystem, not on its blob volume:
    the service cannot create its store and never starts."""
    messages = _edited(
        k8s_copy, "config.yaml", "MESH_BLOB_DIR: /var/lib/mesh/blobs", "MESH_BLOB_DIR: /data/blobs"
    )
    assert messages == [
        "Deployment/file container file: MESH_BLOB_DIR /data/blobs is on no mounted volume (mounts: /tmp, "
        "/var/lib/mesh/blobs), so on the read-only root filesystem"
    ]


@pytest.mark.parametrize(
    ("blob_dir", "change", "expected"),
    [
        (
            "/var/lib/mesh/blobs/store",
            "read-only",
            "MESH_BLOB_DIR /var/lib/mesh/blobs/store is on volume blobs, mounted read-only",
        ),
        ("/tmp/blobs", None, "MESH_BLOB_DIR /tmp/blobs is on the emptyDir tmp: every blob goes with the pod"),
        ("var/blobs", None, "MESH_BLOB_DIR var/blobs is relative to the image's working directory"),
        (None, None, "MESH_BLOB_DIR is not set"),
        ("/var/lib/mesh/blobs-old", None, "MESH_BLOB_DIR /var/lib/mesh/blobs-old is on no mounted volume"),
    ],
)
def test_blob_dir_must_be_on_a_writable_persistent_mount(
    dev: list[Manifest], blob_dir: str | None, change: str | None, expected: str
) -> None:
    """The blob directory is on the file service's writable, persistent volume: not a read-only mount, not
    the /tmp emptyDir, not a relative path (the image's working directory), not unset (the image's default
    is not in the manifests), and a sibling of the mount path is not under it; a directory below the mount
    path, or the path with a trailing slash, is on the volume."""
    for on_volume in ("/var/lib/mesh/blobs/store", "/var/lib/mesh/blobs/"):
        _config(dev)["MESH_BLOB_DIR"] = on_volume
        assert _messages(dev) == [], on_volume
    if blob_dir is None:
        del _config(dev)["MESH_BLOB_DIR"]
    else:
        _config(dev)["MESH_BLOB_DIR"] = blob_dir
    if change == "read-only":
        mount = next(m for m in _container(dev, "file")["volumeMounts"] if m["name"] == "blobs")
        mount["readOnly"] = True
    messages = _messages(dev)
    assert len(messages) == 1
    assert messages[0].startswith(f"Deployment/file container file: {expected}")


def test_job_workers_scale_on_cpu_with_two_replicas(prod_gpu: list[Manifest], dev: list[Manifest]) -> None:
    """image-processing and inference also serve synchronous ProcessImage/Predict calls, which queue no job:
    their autoscalers keep at least two replicas in production (a drain with the PodDisruptionBudget never
    leaves none) and scale on CPU besides queue depth; one without the CPU metric is reported."""
    for name in ("image-processing", "inference"):
        spec = _find(prod_gpu, "HorizontalPodAutoscaler", name)["spec"]
        assert spec["minReplicas"] >= 2
        assert {m["type"] for m in spec["metrics"]} == {"External", "Resource"}
        assert _find(dev, "HorizontalPodAutoscaler", name)["spec"]["minReplicas"] == 1, "dev: one of each"
    hpa = _find(dev, "HorizontalPodAutoscaler", "inference")
    hpa["spec"]["metrics"] = [m for m in hpa["spec"]["metrics"] if m["type"] == "External"]
    assert _messages(dev) == [
        "HorizontalPodAutoscaler/inference: must scale on CPU (it serves synchronous calls too)"
    ]
