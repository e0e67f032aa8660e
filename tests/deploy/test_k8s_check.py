"""``make k8s-check``: the committed overlays pass, and broken manifests are caught."""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.tools.k8s_check import check_directory, main
from mesh.tools.k8s_check.checks import check_overlay
from mesh.tools.k8s_check.policy import Overlay
from mesh.tools.k8s_check.render import Manifest, render
from mesh.tools.k8s_check.schema import validate_all

from .conftest import K8S

VERSION = "1.31.0"


def _messages(objects: list[Manifest], *, gpu: bool = False) -> list[str]:
    return [str(v) for v in check_overlay(Overlay("test", objects, gpu=gpu))]


def _deployment(objects: list[Manifest], name: str) -> Manifest:
    return next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)


def _container(objects: list[Manifest], name: str) -> Any:
    return _deployment(objects, name)["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("overlay", ["dev", "prod-gpu"])
def test_committed_overlays_pass(overlay: str) -> None:
    """Every committed overlay renders, validates against Kubernetes 1.31 and meets every policy."""
    assert check_directory(K8S / "overlays" / overlay, kubernetes_version=VERSION) == []


def test_missing_probe_is_caught(dev: list[Manifest]) -> None:
    """A service without a readiness probe is reported by name."""
    del _container(dev, "queue")["readinessProbe"]
    assert "Deployment/queue container queue: no readinessProbe" in _messages(dev)


def test_probe_on_wrong_health_name_is_caught(dev: list[Manifest]) -> None:
    """A gRPC probe must ask for the service's own health name, not the server-wide one."""
    _container(dev, "file")["livenessProbe"]["grpc"]["service"] = ""
    assert any("livenessProbe asks for health name ''" in m for m in _messages(dev))


def test_latest_and_untagged_images_are_caught(dev: list[Manifest]) -> None:
    """:latest and tagless images are rejected; a digest pin is accepted."""
    _container(dev, "gateway")["image"] = "ghcr.io/mesh-project/mesh-gateway:latest"
    _container(dev, "queue")["image"] = "ghcr.io/mesh-project/mesh-queue"
    _container(dev, "file")["image"] = "ghcr.io/mesh-project/mesh-file@sha256:" + "a" * 64
    messages = _messages(dev)
    assert any("Deployment/gateway: image" in m and ":latest" in m for m in messages)
    assert any("Deployment/queue: image" in m and "not pinned" in m for m in messages)
    assert not any("Deployment/file: image" in m for m in messages)


def test_insecure_container_is_caught(dev: list[Manifest]) -> None:
    """Root, a writable root filesystem, escalation and kept capabilities are each reported."""
    deployment = _deployment(dev, "inference")
    deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = False
    container = _container(dev, "inference")
    del container["securityContext"]["runAsNonRoot"]
    container["securityContext"].update(
        readOnlyRootFilesystem=False, allowPrivilegeEscalation=True, capabilities={"add": ["NET_ADMIN"]}
    )
    messages = [m for m in _messages(dev) if m.startswith("Deployment/inference")]
    for expected in (
        "runAsNonRoot must be true",
        "readOnlyRootFilesystem must be true",
        "allowPrivilegeEscalation must be false",
        "capabilities must drop ALL",
        "capabilities added",
    ):
        assert any(expected in m for m in messages), expected


def test_missing_limits_and_short_grace_are_caught(dev: list[Manifest]) -> None:
    """Containers need CPU and memory limits; termination grace must outlast MESH_GRACE_SECONDS."""
    del _container(dev, "file")["resources"]["limits"]["memory"]
    _deployment(dev, "file")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 10
    messages = _messages(dev)
    assert "Deployment/file container file: no memory in resources.limits" in messages
    assert any("Deployment/file: terminationGracePeriodSeconds 10 is not longer" in m for m in messages)


def test_gpu_overlay_without_gpu_is_caught(prod_gpu: list[Manifest]) -> None:
    """In the GPU overlay the GPU services need a GPU limit, GPU nodes, MESH_DEVICE=gpu and a CUDA image."""
    deployment = _deployment(prod_gpu, "image-processing")
    spec = deployment["spec"]["template"]["spec"]
    del spec["nodeSelector"], spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    spec["containers"][0]["image"] = "ghcr.io/mesh-project/mesh-image-processing:0.1.0"
    messages = _messages(prod_gpu, gpu=True)
    assert any("needs a nvidia.com/gpu limit" in m for m in messages)
    assert any("no nodeSelector" in m for m in messages)
    assert any("not a CUDA variant" in m for m in messages)
    assert _messages(copy.deepcopy(prod_gpu), gpu=False), "GPU limits outside a GPU overlay are reported"


def test_second_exposed_service_is_caught(dev: list[Manifest]) -> None:
    """Routing the Ingress or an outside NetworkPolicy rule to anything but the gateway is reported."""
    ingress = next(o for o in dev if o["kind"] == "Ingress")
    ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] = "queue"
    policy = next(
        o for o in dev if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "allow-queue-grpc"
    )
    policy["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
    messages = _messages(dev)
    assert any("routes to Service/queue" in m for m in messages)
    assert any("NetworkPolicy/allow-queue-grpc: lets traffic from outside" in m for m in messages)


def test_missing_default_deny_and_plain_secret_are_caught(dev: list[Manifest]) -> None:
    """Without a default-deny policy, or with a database URL as a literal, the check fails."""
    objects = [o for o in dev if o["metadata"]["name"] != "default-deny-all"]
    env = _container(objects, "queue")["env"]
    url = next(e for e in env if e["name"] == "MESH_DATABASE_URL")
    url.pop("valueFrom")
    url["value"] = "postgresql://mesh:hunter2@db/mesh"
    messages = _messages(objects)
    assert any("no default-deny policy" in m for m in messages)
    assert "Deployment/queue: MESH_DATABASE_URL must come from a secretKeyRef" in messages


def test_budget_that_blocks_node_drains_is_caught(dev: list[Manifest]) -> None:
    """A PodDisruptionBudget that allows no eviction (minAvailable >= replicas) is reported."""
    budget = next(o for o in dev if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == "file")
    budget["spec"] = {"minAvailable": 1, "selector": budget["spec"]["selector"]}
    assert any("PodDisruptionBudget/file: blocks every voluntary eviction" in m for m in _messages(dev))


def test_shared_blob_volume_needs_rwx_for_replicas(dev: list[Manifest]) -> None:
    """The file service on a ReadWriteOnce claim must run one replica with the Recreate strategy."""
    _deployment(dev, "file")["spec"]["replicas"] = 2
    assert "Deployment/file: mesh-blobs is not ReadWriteMany: run one replica" in _messages(dev)


def test_schema_errors_are_reported_offline(dev: list[Manifest], monkeypatch: pytest.MonkeyPatch) -> None:
    """Strict schema validation runs from the bundled schemas with the network cut, and names the bad field."""

    def no_network(*_: object, **__: object) -> None:
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    _container(dev, "gateway")["readinessProbe"]["grpcc"] = {}
    _deployment(dev, "file")["spec"]["replicas"] = "two"
    messages = [str(v) for v in validate_all(dev, VERSION)]
    assert len(messages) == 2
    assert any("Deployment/gateway" in m and "'grpcc' was unexpected" in m for m in messages)
    assert any("Deployment/file" in m and "spec.replicas" in m for m in messages)


def test_cli_exits_non_zero_and_lists_violations(k8s_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A committed manifest edited to use :latest makes the command exit 1 and name the object."""
    overlay = k8s_copy / "overlays" / "dev" / "kustomization.yaml"
    kustomization = yaml.safe_load(overlay.read_text())
    kustomization["images"] = [{"name": "ghcr.io/mesh-project/mesh-gateway", "newTag": "latest"}]
    overlay.write_text(yaml.safe_dump(kustomization))
    dockerfile = str(K8S.parent / "docker" / "Dockerfile")
    assert main(["--root", str(k8s_copy), "--renderer", "builtin", "--dockerfile", dockerfile]) == 1
    err = capsys.readouterr().err
    assert "overlay dev: 1 violation(s)" in err
    assert "Deployment/gateway: image ghcr.io/mesh-project/mesh-gateway:latest uses :latest" in err
    assert "prod-gpu" not in err


def test_cli_names_an_unknown_overlay_and_a_missing_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt --overlay is a usage error listing the overlays (it was reported as an overlay without a
    kustomization.yaml), and a --root without overlays says so (it was a FileNotFoundError traceback)."""
    with pytest.raises(SystemExit) as caught:
        main(["--root", str(K8S), "--overlay", "dve"])
    assert caught.value.code == 2
    assert "no overlay dve under" in capsys.readouterr().err
    assert main(["--root", str(tmp_path)]) == 1
    assert f"no overlays under {tmp_path / 'overlays'}" in capsys.readouterr().err


def _policy(objects: list[Manifest], name: str) -> Manifest:
    return next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == name)


def test_gateway_readiness_must_not_follow_the_backends(dev: list[Manifest]) -> None:
    """The gateway's readiness probe is /healthz: /readyz fails while any backend does, which took every
    gateway replica out of the Service at once (the whole API answered 503 for one service down)."""
    assert _container(dev, "gateway")["readinessProbe"]["httpGet"]["path"] == "/healthz"
    _container(dev, "gateway")["readinessProbe"]["httpGet"]["path"] = "/readyz"
    assert "Deployment/gateway container gateway: readinessProbe must be an HTTP GET of /healthz" in (
        _messages(dev)
    )


def test_missing_or_short_prestop_delay_is_caught(dev: list[Manifest]) -> None:
    """Every workload sleeps in preStop before its drain (endpoints are removed while SIGTERM is sent, and
    connections routed meanwhile were refused), and termination grace outlasts the delay plus the drain."""
    assert _container(dev, "gateway")["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    del _container(dev, "queue")["lifecycle"]
    _container(dev, "file")["lifecycle"]["preStop"]["exec"]["command"] = ["sleep", "1"]
    _container(dev, "inference")["lifecycle"]["preStop"] = {"sleep": {"seconds": 5}}
    _deployment(dev, "gateway")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 15
    messages = _messages(dev)
    assert any(m.startswith("Deployment/queue container queue: needs a preStop sleep") for m in messages)
    assert any(m.startswith("Deployment/file container file: needs a preStop sleep") for m in messages)
    assert not any("Deployment/inference" in m for m in messages), "the sleep action counts too"
    assert (
        "Deployment/gateway: terminationGracePeriodSeconds 15 is not longer than the preStop delay (5s) "
        "plus the drain (10s and 1s to close the HTTP port)"
    ) in messages


def test_rabbitmq_only_reaches_the_workloads_that_use_it(dev: list[Manifest]) -> None:
    """Only the queue service and the job workers get MESH_AMQP_URL and egress to RabbitMQ: the internet-facing
    gateway and the file service carried the broker's credentials and a route to it that they never use."""
    for name in ("gateway", "file"):
        assert "MESH_AMQP_URL" not in {e["name"] for e in _container(dev, name)["env"]}
    _container(dev, "gateway")["env"].append(
        {"name": "MESH_AMQP_URL", "valueFrom": {"secretKeyRef": {"name": "mesh-secrets", "key": "amqp-url"}}}
    )
    selector = _policy(dev, "allow-rabbitmq-egress")["spec"]["podSelector"]["matchExpressions"][0]
    selector["values"] = ["file", "image-processing", "inference"]
    messages = _messages(dev)
    assert (
        "Deployment/gateway: gets MESH_AMQP_URL, which it never reads (it does not use RabbitMQ)" in messages
    )
    assert "Deployment/file: may reach RabbitMQ (5672), which it never uses" in messages
    assert "Deployment/queue: no NetworkPolicy allows egress to RabbitMQ (5672)" in messages
    assert not any(m.startswith(("Deployment/image-processing", "Deployment/inference")) for m in messages)


def _docs_queue_prefix_patch() -> str:
    """The kustomize patch docs/deploy.md gives for a MESH_QUEUE_PREFIX (its yaml block naming the prefix)."""
    text = (K8S.parents[1] / "docs" / "deploy.md").read_text()
    blocks = [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("yaml")]
    (patch,) = [b for b in blocks if "MESH_QUEUE_PREFIX" in b and "HorizontalPodAutoscaler" in b]
    return patch


def test_queue_prefix_needs_matching_autoscaler_selectors(k8s_copy: Path) -> None:
    """The queue metric's `queue` label carries MESH_QUEUE_PREFIX: an overlay that sets the prefix but keeps
    the base's selectors gets autoscalers that never scale, and is reported; the patch docs/deploy.md gives
    passes; a prefix on the workers that the queue service lacks is reported."""
    overlay = k8s_copy / "overlays" / "staging"
    overlay.mkdir()
    (overlay / "config.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: mesh-config\ndata:\n"
        "  MESH_QUEUE_PREFIX: staging.\n"
    )
    kustomization = {
        "namespace": "mesh-staging",
        "resources": ["../../base"],
        "patches": [{"path": "config.yaml"}],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    messages = [str(v) for v in check_directory(overlay, kubernetes_version=VERSION)]
    assert messages == [
        "HorizontalPodAutoscaler/image-processing: selects queue 'mesh.jobs.image', but "
        "Deployment/image-processing consumes 'staging.mesh.jobs.image' (MESH_QUEUE_PREFIX 'staging.'): "
        "no such series, so it never scales",
        "HorizontalPodAutoscaler/inference: selects queue 'mesh.jobs.inference', but "
        "Deployment/inference consumes 'staging.mesh.jobs.inference' (MESH_QUEUE_PREFIX 'staging.'): "
        "no such series, so it never scales",
    ]

    (overlay / "queue-prefix.yaml").write_text(_docs_queue_prefix_patch())
    kustomization["patches"] = [{"path": "queue-prefix.yaml"}]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    assert check_directory(overlay, kubernetes_version=VERSION) == []

    objects = render(overlay)
    _container(objects, "queue")["env"].append({"name": "MESH_QUEUE_PREFIX", "value": "other."})
    assert any(
        "MESH_QUEUE_PREFIX differs between the queue service and its workers" in m for m in _messages(objects)
    )
