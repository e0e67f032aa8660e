"""``make k8s-check``: every call one workload makes to another, and Prometheus's scrape, get through the
NetworkPolicies as Kubernetes applies them. Each test breaks a committed manifest the way an operator could, and
expects the check to name the caller, the callee, the port and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh.tools.k8s_check import check_directory
from mesh.tools.k8s_check.checks import check_overlay
from mesh.tools.k8s_check.network import check_network_calls, policy_types
from mesh.tools.k8s_check.policy import Overlay
from mesh.tools.k8s_check.render import Manifest, render

from .conftest import K8S

VERSION = "1.31.0"
GATEWAY_TO_FILE = (
    "Deployment/gateway container gateway: calls Deployment/file (MESH_FILE_SERVICE_ADDRESS file:50051), but "
    "the ingress NetworkPolicies of Deployment/file (default-deny-all, allow-health-from-gateway, "
    "allow-metrics-scrape, allow-file-grpc) let no connection in from Deployment/gateway on 50051 (grpc): add an "
    "ingress rule from podSelector app.kubernetes.io/name=gateway on port grpc"
)


def _calls(objects: list[Manifest]) -> list[str]:
    return [str(v) for v in check_network_calls(Overlay("test", objects, gpu=False))]


def _find(objects: list[Manifest], kind: str, name: str) -> Any:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def _edited(k8s_copy: Path, file: str, old: str, new: str) -> list[str]:
    """The dev overlay's violations after replacing ``old`` by ``new`` in one base file."""
    path = k8s_copy / "base" / file
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return [str(v) for v in check_directory(k8s_copy / "overlays" / "dev", kubernetes_version=VERSION)]


def _file_grpc_from(objects: list[Manifest]) -> list[Manifest]:
    peers: list[Manifest] = _find(objects, "NetworkPolicy", "allow-file-grpc")["spec"]["ingress"][0]["from"]
    return peers


@pytest.mark.parametrize("overlay", ["dev", "prod-gpu"])
def test_committed_policies_let_every_call_through(overlay: str) -> None:
    """The committed NetworkPolicies let through each call of the call table (gateway to every backend's gRPC
    and HTTP port; image-processing, inference and queue to file; image-processing and queue to inference) and
    Prometheus's scrape of every workload."""
    assert _calls(render(K8S / "overlays" / overlay)) == []


def test_ingress_policy_without_the_caller_is_caught(k8s_copy: Path) -> None:
    """allow-file-grpc no longer names the gateway (a relabelled gateway, say): every upload and download
    through the REST API would time out while every pod is healthy. The gateway, the file service, the port
    and the peer to add are named; nothing else is reported."""
    head = "  name: allow-file-grpc\nspec:\n  podSelector:\n    matchLabels:\n      app.kubernetes.io/name: file\n"
    rule = "  ingress:\n    - from:\n        - podSelector:\n            matchLabels:\n              app.kubernetes.io/name"
    messages = _edited(
        k8s_copy,
        "network-policies.yaml",
        f"{head}  policyTypes: [Ingress]\n{rule}: gateway\n",
        f"{head}  policyTypes: [Ingress]\n{rule}: gateway-v2\n",
    )
    assert messages == [GATEWAY_TO_FILE]


def test_egress_port_range_that_stops_short_is_caught(k8s_copy: Path) -> None:
    """allow-mesh-grpc-egress ending at 50053 drops the gateway's calls to the queue service (50054), the only
    caller of that port: reported on the caller's egress, with the rule to add."""
    messages = _edited(k8s_copy, "network-policies.yaml", "endPort: 50054", "endPort: 50053")
    assert messages == [
        "Deployment/gateway container gateway: calls Deployment/queue (MESH_QUEUE_SERVICE_ADDRESS queue:50054), "
        "but its egress NetworkPolicies (default-deny-all, allow-dns-egress, allow-postgresql-egress, "
        "allow-mesh-grpc-egress, allow-gateway-health-egress) let no connection out to Deployment/queue on 50054 "
        "(grpc): add an egress rule to podSelector app.kubernetes.io/name=queue on port grpc"
    ]


def test_policies_follow_kubernetes_semantics(dev: list[Manifest]) -> None:
    """Policies add up (another policy may let the gateway in), a named port matches the container port of
    that name, and pods no ingress policy selects are open; a UDP port, or a peer that selects the gateway's
    labels in another namespace, lets nothing in."""
    gateway = _file_grpc_from(dev).pop(0)
    assert _calls(dev) == [GATEWAY_TO_FILE]

    extra: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "gateway-to-file", "namespace": "mesh-dev"},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "file"}},
            "ingress": [{"from": [gateway], "ports": [{"port": "grpc"}]}],
        },
    }
    dev.append(extra)
    assert _calls(dev) == [], "a second policy with a named port lets the gateway in"

    extra["spec"]["ingress"][0]["ports"] = [{"port": "grpc", "protocol": "UDP"}]
    assert len(_calls(dev)) == 1, "a UDP port lets no gRPC call in"

    extra["spec"]["ingress"][0]["ports"] = [{"port": 50051}]
    extra["spec"]["ingress"][0]["from"] = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mesh"}}, **gateway}
    ]
    assert len(_calls(dev)) == 1, "the gateway's labels in another namespace are not the gateway"

    dev[:] = [
        o
        for o in dev
        if o["kind"] != "NetworkPolicy"
        or (
            o["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") != "file"
            and o["metadata"]["name"]
            not in {"default-deny-all", "allow-health-from-gateway", "allow-metrics-scrape"}
        )
    ]
    to_file = [m for m in _calls(dev) if "Deployment/file" in m]
    assert to_file == [], "no ingress policy selects the file service's pods any more: they are open"


def test_unset_address_of_a_called_service_is_caught(k8s_copy: Path) -> None:
    """Without MESH_FILE_SERVICE_ADDRESS in the shared ConfigMap, each workload that calls the file service
    dials its default, localhost:50051 in its own pod; the file service itself calls nobody."""
    messages = _edited(k8s_copy, "config.yaml", "  MESH_FILE_SERVICE_ADDRESS: file:50051\n", "")
    assert messages == [
        f"Deployment/{name} container {name}: MESH_FILE_SERVICE_ADDRESS is not set, so it calls localhost:50051, "
        "inside its own pod: set it to the address of the Service it is for"
        for name in ("image-processing", "inference", "queue", "gateway")
    ]


def test_scrape_without_an_ingress_rule_for_prometheus_is_caught(dev: list[Manifest]) -> None:
    """allow-metrics-scrape is what lets Prometheus (namespace monitoring) in; a peer that also needs
    Prometheus's own pod labels cannot be shown to match (they are not in the manifests), and a
    prometheus.io/port other than the metrics port scrapes nothing."""
    scrape = _find(dev, "NetworkPolicy", "allow-metrics-scrape")
    scrape["spec"]["ingress"][0]["from"][0]["podSelector"] = {"matchLabels": {"app": "prometheus"}}
    template = _find(dev, "Deployment", "queue")["spec"]["template"]
    template["metadata"]["annotations"]["prometheus.io/port"] = "9105"
    messages = _calls(dev)
    assert (
        "Deployment/queue: prometheus.io/port 9105, but its metrics are served on HTTP on 9104 (MESH_HTTP_PORT "
        "from env): Prometheus scrapes nothing there; set it to 9104"
    ) in messages
    assert (
        "Deployment/file: is scraped on its metrics port (prometheus.io/scrape), but the ingress "
        "NetworkPolicies of Deployment/file (default-deny-all, allow-health-from-gateway, allow-metrics-scrape, "
        "allow-file-grpc) let no connection in from Prometheus (namespace monitoring) on 9101 (http): add an "
        "ingress rule from namespaceSelector kubernetes.io/metadata.name=monitoring on port http"
    ) in messages
    scraped = [m for m in messages if "is scraped" in m]
    assert [m.split(":")[0] for m in scraped] == [
        "Deployment/file",
        "Deployment/image-processing",
        "Deployment/inference",
        "Deployment/queue",
        "Deployment/gateway",
    ]
    del template["metadata"]["annotations"]["prometheus.io/scrape"]
    assert "Deployment/queue: is scraped" not in " ".join(_calls(dev)), "a pod that asks for no scrape"


def test_new_checks_run_with_the_others(dev: list[Manifest]) -> None:
    """check_overlay, which make k8s-check runs, includes the call table."""
    _file_grpc_from(dev).pop(0)
    assert GATEWAY_TO_FILE in [str(v) for v in check_overlay(Overlay("dev", dev, gpu=False))]


@pytest.mark.parametrize("egress", [[], None])
def test_a_policy_without_policy_types_and_with_no_egress_rules_governs_ingress_only(egress: object) -> None:
    """Kubernetes adds Egress to a policy without ``policyTypes`` only when it has egress rules: ``egress: []``
    or ``egress: null`` leaves its pods' egress open (it read as deny-all egress)."""
    policy = {"spec": {"podSelector": {}, "egress": egress}}
    assert policy_types(policy) == {"Ingress"}
    assert policy_types({"spec": {"podSelector": {}, "egress": [{"to": []}]}}) == {"Ingress", "Egress"}
    assert policy_types({"spec": {"podSelector": {}, "policyTypes": ["Egress"]}}) == {"Egress"}
