"""The mesh's deployment policies, checked on rendered manifests.

Each check takes every object of one rendered overlay and returns :class:`Violation` s; nothing here
reads files or talks to a cluster, so tests feed it hand-made objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from mesh.kit.jobs import IMAGE_JOBS_QUEUE, INFERENCE_JOBS_QUEUE
from mesh.kit.runtime import HTTP_STOP_SECONDS, LIVENESS_SERVICE
from mesh.tools.k8s_check.render import CLUSTER_SCOPED_KINDS, Manifest, containers_of, split_image


@dataclass(frozen=True)
class Workload:
    """What the manifests must say about one Deployment."""

    grpc_port: int | None
    """gRPC port probed by the kubelet, or None for the HTTP-only gateway."""

    http_port: int
    """HTTP port (/metrics; for the gateway the whole REST API)."""

    health_name: str | None
    """grpc.health.v1 service name the probes ask for."""

    gpu_capable: bool
    """Whether the GPU overlays must give it a GPU."""

    rabbitmq: bool
    """Whether it talks to RabbitMQ: only these get ``MESH_AMQP_URL`` and egress to the broker."""

    job_queue: str | None = None
    """The job queue its worker consumes (before ``MESH_QUEUE_PREFIX``), whose depth its autoscaler follows."""


WORKLOADS = {
    "file": Workload(50051, 9101, "mesh.file.v1.FileService", gpu_capable=False, rabbitmq=False),
    "image-processing": Workload(
        50052,
        9102,
        "mesh.image.v1.ImageProcessingService",
        gpu_capable=True,
        rabbitmq=True,
        job_queue=IMAGE_JOBS_QUEUE,
    ),
    "inference": Workload(
        50053,
        9103,
        "mesh.inference.v1.InferenceService",
        gpu_capable=True,
        rabbitmq=True,
        job_queue=INFERENCE_JOBS_QUEUE,
    ),
    "queue": Workload(50054, 9104, "mesh.queue.v1.QueueService", gpu_capable=False, rabbitmq=True),
    "gateway": Workload(None, 8080, None, gpu_capable=False, rabbitmq=False),
}
EDGE_WORKLOAD = "gateway"
QUEUE_SCALED_WORKLOADS = tuple(name for name, workload in WORKLOADS.items() if workload.job_queue)
# The gateway's readiness follows the process alone: /readyz fails while any backend does, and since every
# replica sees the same backends, they would all leave the Service at once and take the whole API with them.
GATEWAY_PROBE_PATHS = {"readinessProbe": "/healthz", "livenessProbe": "/healthz"}
SECRET_ENV = ("MESH_DATABASE_URL", "MESH_AMQP_URL")
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "CREDENTIAL")
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GRACE_SECONDS = 10.0
MIN_PRESTOP_SECONDS = 5.0
"""Kubernetes removes a terminating pod from its Service's endpoints while it sends SIGTERM, and kube-proxy and
the ingress controller route to it for a few seconds more: a container waits this long before it drains, so
those requests are still served instead of refused."""
POSTGRESQL_PORT = 5432
RABBITMQ_PORTS = (5672, 5671)


@dataclass(frozen=True)
class Violation:
    """One broken policy on one object."""

    obj: str
    message: str

    def __str__(self) -> str:
        return f"{self.obj}: {self.message}"


@dataclass(frozen=True)
class Overlay:
    """A rendered overlay and what it promises."""

    name: str
    objects: list[Manifest]
    gpu: bool
    """Whether GPU-capable workloads must run on GPUs here."""

    def of_kind(self, kind: str) -> list[Manifest]:
        return [o for o in self.objects if o["kind"] == kind]

    def find(self, kind: str, name: str) -> Manifest | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)


def ref(obj: Manifest) -> str:
    """``Kind/name`` for messages."""
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_spec(deployment: Manifest) -> Manifest:
    spec: Manifest = deployment.get("spec", {}).get("template", {}).get("spec", {})
    return spec


def pod_labels(deployment: Manifest) -> dict[str, str]:
    labels: dict[str, str] = (
        deployment.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
    )
    return labels


def selects(selector: Manifest | None, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions with In/NotIn/Exists) selects ``labels``."""
    if selector is None:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(operator, False)
        if not ok:
            return False
    return True


def grace_seconds(overlay: Overlay, container: Manifest) -> float:
    """MESH_GRACE_SECONDS as the container sees it: its env, else its ConfigMaps, else the default."""
    for env in container.get("env", []):
        if env.get("name") == "MESH_GRACE_SECONDS" and "value" in env:
            return float(env["value"])
    for source in container.get("envFrom", []):
        name = source.get("configMapRef", {}).get("name")
        config = overlay.find("ConfigMap", name) if name else None
        if config and "MESH_GRACE_SECONDS" in config.get("data", {}):
            return float(config["data"]["MESH_GRACE_SECONDS"])
    return DEFAULT_GRACE_SECONDS


def prestop_seconds(container: Manifest) -> float | None:
    """How long the container's preStop hook waits: a ``sleep`` action or an ``exec`` of ``sleep N``."""
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"].get("seconds", 0))
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and str(command[0]).rsplit("/", 1)[-1] == "sleep":
        try:
            return float(command[1])
        except ValueError:
            return None
    return None


def env_value(overlay: Overlay, container: Manifest, name: str) -> str | None:
    """A literal env value as the container sees it (env beats envFrom ConfigMaps)."""
    for env in container.get("env", []):
        if env.get("name") == name:
            value = env.get("value")
            return str(value) if value is not None else None
    for source in container.get("envFrom", []):
        config_name = source.get("configMapRef", {}).get("name")
        config = overlay.find("ConfigMap", config_name) if config_name else None
        if config and name in config.get("data", {}):
            return str(config["data"][name])
    return None


def check_inventory(overlay: Overlay) -> Iterator[Violation]:
    """Every workload is deployed, with a Service, a ServiceAccount and a PodDisruptionBudget."""
    deployments = {d["metadata"]["name"]: d for d in overlay.of_kind("Deployment")}
    for name in WORKLOADS:
        if name not in deployments:
            yield Violation(f"Deployment/{name}", "missing")
    for deployment in deployments.values():
        labels = pod_labels(deployment)
        if not any(
            s["spec"].get("selector") and selects({"matchLabels": s["spec"]["selector"]}, labels)
            for s in overlay.of_kind("Service")
        ):
            yield Violation(ref(deployment), "no Service selects its pods")
        budgets = [
            p for p in overlay.of_kind("PodDisruptionBudget") if selects(p["spec"].get("selector"), labels)
        ]
        if not budgets:
            yield Violation(ref(deployment), "no PodDisruptionBudget selects its pods")
        replicas = deployment["spec"].get("replicas", 1)
        for budget in budgets:
            min_available = budget["spec"].get("minAvailable")
            if budget["spec"].get("maxUnavailable") == 0 or (
                isinstance(min_available, int) and min_available >= replicas
            ):
                yield Violation(
                    ref(budget), f"blocks every voluntary eviction of {ref(deployment)} (node drains hang)"
                )
    for obj in overlay.objects:
        if obj["kind"] == "Secret":
            yield Violation(
                ref(obj), "Secrets are created by the operator, never committed (use secretKeyRef)"
            )
        if obj["kind"] not in CLUSTER_SCOPED_KINDS and not obj["metadata"].get("namespace"):
            yield Violation(ref(obj), "no namespace (the overlay must set one)")


def check_probes(overlay: Overlay) -> Iterator[Violation]:
    """gRPC services: native gRPC probes, readiness on the service's health name and liveness on the kit's
    dependency-blind ``liveness`` name (a database outage must not restart pods); the gateway: HTTP GETs of
    ``/healthz`` (see ``GATEWAY_PROBE_PATHS``)."""
    for deployment in overlay.of_kind("Deployment"):
        expected = WORKLOADS.get(deployment["metadata"]["name"])
        for container in pod_spec(deployment).get("containers", []):
            where = f"{ref(deployment)} container {container.get('name')}"
            for probe_name, http_path in GATEWAY_PROBE_PATHS.items():
                probe = container.get(probe_name)
                if not probe:
                    yield Violation(where, f"no {probe_name}")
                    continue
                if expected is None:
                    continue
                if expected.grpc_port is not None:
                    grpc_probe = probe.get("grpc")
                    if not grpc_probe:
                        yield Violation(where, f"{probe_name} must be a native gRPC probe")
                    elif grpc_probe.get("port") != expected.grpc_port:
                        yield Violation(
                            where,
                            f"{probe_name} probes port {grpc_probe.get('port')}, not {expected.grpc_port}",
                        )
                    elif grpc_probe.get("service") != (
                        wanted := LIVENESS_SERVICE if probe_name == "livenessProbe" else expected.health_name
                    ):
                        yield Violation(
                            where,
                            f"{probe_name} asks for health name {grpc_probe.get('service')!r}, not {wanted!r}",
                        )
                elif probe.get("httpGet", {}).get("path") != http_path:
                    yield Violation(where, f"{probe_name} must be an HTTP GET of {http_path}")


def check_resources(overlay: Overlay) -> Iterator[Violation]:
    """CPU and memory requests and limits on every container; GPUs exactly where the overlay promises them."""
    for deployment in overlay.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        expected = WORKLOADS.get(name)
        for container in containers_of(deployment):
            where = f"{ref(deployment)} container {container.get('name')}"
            resources = container.get("resources", {})
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(section, {}):
                        yield Violation(where, f"no {resource} in resources.{section}")
            gpus = int(resources.get("limits", {}).get(GPU_RESOURCE, 0))
            wants_gpu = overlay.gpu and expected is not None and expected.gpu_capable
            if wants_gpu and gpus < 1:
                yield Violation(where, f"GPU overlay: needs a {GPU_RESOURCE} limit")
            if not wants_gpu and gpus:
                yield Violation(where, f"{GPU_RESOURCE} limit where no GPU is intended")
        if overlay.gpu and expected is not None and expected.gpu_capable:
            yield from _check_gpu_placement(overlay, deployment)


def _check_gpu_placement(overlay: Overlay, deployment: Manifest) -> Iterator[Violation]:
    spec = pod_spec(deployment)
    if not spec.get("nodeSelector"):
        yield Violation(ref(deployment), "GPU overlay: no nodeSelector for GPU nodes")
    if not any(t.get("key") == GPU_RESOURCE for t in spec.get("tolerations", [])):
        yield Violation(ref(deployment), f"GPU overlay: no toleration for the {GPU_RESOURCE} taint")
    for container in spec.get("containers", []):
        if env_value(overlay, container, "MESH_DEVICE") != "gpu":
            yield Violation(ref(deployment), "GPU overlay: MESH_DEVICE must be gpu")
        _, tag, _ = split_image(container.get("image", ""))
        if not tag or "cuda" not in tag:
            yield Violation(
                ref(deployment), f"GPU overlay: image {container.get('image')} is not a CUDA variant"
            )


def check_security(overlay: Overlay) -> Iterator[Violation]:
    """Non-root, read-only root filesystem with an emptyDir /tmp, no capabilities, RuntimeDefault seccomp."""
    for deployment in overlay.of_kind("Deployment"):
        spec = pod_spec(deployment)
        pod_security = spec.get("securityContext", {})
        volumes = {v.get("name"): v for v in spec.get("volumes", [])}
        for container in containers_of(deployment):
            where = f"{ref(deployment)} container {container.get('name')}"
            security = container.get("securityContext", {})

            def effective(field: str, security: Manifest = security, pod: Manifest = pod_security) -> Any:
                return security.get(field, pod.get(field))

            if effective("runAsNonRoot") is not True:
                yield Violation(where, "runAsNonRoot must be true")
            run_as_user = effective("runAsUser")
            if not isinstance(run_as_user, int) or run_as_user <= 0:
                yield Violation(where, "runAsUser must be a non-zero UID")
            if security.get("readOnlyRootFilesystem") is not True:
                yield Violation(where, "readOnlyRootFilesystem must be true")
            if security.get("allowPrivilegeEscalation") is not False:
                yield Violation(where, "allowPrivilegeEscalation must be false")
            if security.get("privileged"):
                yield Violation(where, "privileged containers are not allowed")
            capabilities = security.get("capabilities", {})
            if "ALL" not in capabilities.get("drop", []):
                yield Violation(where, "capabilities must drop ALL")
            if capabilities.get("add"):
                yield Violation(where, f"capabilities added: {capabilities['add']}")
            if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
                yield Violation(where, "seccompProfile must be RuntimeDefault")
            tmp = next((m for m in container.get("volumeMounts", []) if m.get("mountPath") == "/tmp"), None)
            if tmp is None or "emptyDir" not in volumes.get(tmp.get("name"), {}):
                yield Violation(where, "/tmp must be an emptyDir (the root filesystem is read-only)")


def check_images(overlay: Overlay) -> Iterator[Violation]:
    """Every image pinned by a version tag or a digest; never :latest."""
    for deployment in overlay.of_kind("Deployment"):
        for container in containers_of(deployment):
            image = container.get("image", "")
            _, tag, digest = split_image(image)
            if tag == "latest":
                yield Violation(ref(deployment), f"image {image} uses :latest")
            elif not tag and not digest:
                yield Violation(ref(deployment), f"image {image} is not pinned by tag or digest")
            if container.get("imagePullPolicy") == "Always" and not digest:
                yield Violation(ref(deployment), f"image {image}: pullPolicy Always on a mutable tag")


def check_identity(overlay: Overlay) -> Iterator[Violation]:
    """Own ServiceAccount per workload, no API token mounted, secrets only by reference and only to the
    workloads that use them."""
    accounts = {a["metadata"]["name"]: a for a in overlay.of_kind("ServiceAccount")}
    used: dict[str, str] = {}
    for deployment in overlay.of_kind("Deployment"):
        spec = pod_spec(deployment)
        account = spec.get("serviceAccountName")
        if not account or account == "default":
            yield Violation(ref(deployment), "needs its own serviceAccountName")
        elif account not in accounts:
            yield Violation(ref(deployment), f"ServiceAccount {account} is not in the manifests")
        elif account in used:
            yield Violation(
                ref(deployment), f"shares ServiceAccount {account} with Deployment/{used[account]}"
            )
        else:
            used[account] = deployment["metadata"]["name"]
            if accounts[account].get("automountServiceAccountToken") is not False:
                yield Violation(f"ServiceAccount/{account}", "automountServiceAccountToken must be false")
        if spec.get("automountServiceAccountToken") is not False:
            yield Violation(ref(deployment), "automountServiceAccountToken must be false")
        workload = WORKLOADS.get(deployment["metadata"]["name"])
        for container in containers_of(deployment):
            for env in container.get("env", []):
                name = env.get("name", "")
                secret_like = name in SECRET_ENV or any(word in name for word in SECRET_WORDS)
                if secret_like and "secretKeyRef" not in env.get("valueFrom", {}):
                    yield Violation(ref(deployment), f"{name} must come from a secretKeyRef")
                if name == "MESH_AMQP_URL" and workload is not None and not workload.rabbitmq:
                    yield Violation(
                        ref(deployment), "gets MESH_AMQP_URL, which it never reads (it does not use RabbitMQ)"
                    )
    for config in overlay.of_kind("ConfigMap"):
        for key in config.get("data", {}):
            if key in SECRET_ENV or any(word in key for word in SECRET_WORDS):
                yield Violation(ref(config), f"{key} belongs in a Secret, not a ConfigMap")


def check_lifecycle(overlay: Overlay) -> Iterator[Violation]:
    """A preStop delay before the drain, and termination grace longer than both; the blob volume's access
    mode fits the file service's replicas."""
    for deployment in overlay.of_kind("Deployment"):
        spec = pod_spec(deployment)
        period = spec.get("terminationGracePeriodSeconds", 30)
        for container in spec.get("containers", []):
            drain = grace_seconds(overlay, container)
            delay = prestop_seconds(container)
            if delay is None or delay < MIN_PRESTOP_SECONDS:
                yield Violation(
                    f"{ref(deployment)} container {container.get('name')}",
                    f"needs a preStop sleep of at least {MIN_PRESTOP_SECONDS:g}s (exec [sleep, N] or sleep): "
                    "without it, connections still routed to the terminating pod are refused",
                )
            delay = delay or 0.0
            # The drain is the grace, then at most HTTP_STOP_SECONDS more to close the metrics port.
            if period <= delay + drain + HTTP_STOP_SECONDS:
                yield Violation(
                    ref(deployment),
                    f"terminationGracePeriodSeconds {period} is not longer than the preStop delay "
                    f"({delay:g}s) plus the drain ({drain:g}s and {HTTP_STOP_SECONDS:g}s to close the HTTP port)",
                )
        for volume in spec.get("volumes", []):
            claim_name = volume.get("persistentVolumeClaim", {}).get("claimName")
            if not claim_name:
                continue
            claim = overlay.find("PersistentVolumeClaim", claim_name)
            if claim is None:
                yield Violation(
                    ref(deployment), f"PersistentVolumeClaim {claim_name} is not in the manifests"
                )
                continue
            if "ReadWriteMany" in claim["spec"].get("accessModes", []):
                continue
            if deployment["spec"].get("replicas", 1) != 1:
                yield Violation(ref(deployment), f"{claim_name} is not ReadWriteMany: run one replica")
            if deployment["spec"].get("strategy", {}).get("type") != "Recreate":
                yield Violation(
                    ref(deployment), f"{claim_name} is not ReadWriteMany: use the Recreate strategy"
                )
            if any(
                h["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
                for h in overlay.of_kind("HorizontalPodAutoscaler")
            ):
                yield Violation(ref(deployment), f"{claim_name} is not ReadWriteMany: must not autoscale")


def check_autoscaling(overlay: Overlay) -> Iterator[Violation]:
    """The gateway scales on CPU; the queue workers on queue depth (an External metric)."""
    by_target = {h["spec"]["scaleTargetRef"]["name"]: h for h in overlay.of_kind("HorizontalPodAutoscaler")}
    for target in by_target:
        if overlay.find("Deployment", target) is None:
            yield Violation(
                ref(by_target[target]), f"scales Deployment/{target}, which is not in the manifests"
            )
    wanted: list[tuple[str, Callable[[Manifest], bool], str]] = [
        (EDGE_WORKLOAD, lambda m: m.get("type") == "Resource" and m["resource"]["name"] == "cpu", "CPU"),
        *[
            (name, lambda m: m.get("type") == "External", "queue depth (External)")
            for name in QUEUE_SCALED_WORKLOADS
        ],
    ]
    for name, is_wanted, what in wanted:
        hpa = by_target.get(name)
        if hpa is None:
            yield Violation(f"Deployment/{name}", "no HorizontalPodAutoscaler")
        elif not any(is_wanted(metric) for metric in hpa["spec"].get("metrics", [])):
            yield Violation(ref(hpa), f"must scale on {what}")


def check_job_queues(overlay: Overlay) -> Iterator[Violation]:
    """The queue service and its workers share one ``MESH_QUEUE_PREFIX``, and each worker's autoscaler selects
    its queue with that prefix: the metric's ``queue`` label is the whole queue name, so an autoscaler that
    selects the bare name finds no series and never scales."""
    prefixes: dict[str, str] = {}
    for name, workload in WORKLOADS.items():
        deployment = overlay.find("Deployment", name)
        if not workload.rabbitmq or deployment is None:
            continue
        for container in pod_spec(deployment).get("containers", []):
            prefixes[name] = env_value(overlay, container, "MESH_QUEUE_PREFIX") or ""
    if len(set(prefixes.values())) > 1:
        found = ", ".join(f"{name} {prefix!r}" for name, prefix in prefixes.items())
        yield Violation(
            "Deployment/*", f"MESH_QUEUE_PREFIX differs between the queue service and its workers: {found}"
        )
    for hpa in overlay.of_kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        scaled = WORKLOADS.get(target)
        if scaled is None or scaled.job_queue is None:
            continue
        prefix = prefixes.get(target, "")
        wanted = prefix + scaled.job_queue
        for metric in hpa["spec"].get("metrics", []):
            if metric.get("type") != "External":
                continue
            selected = metric["external"]["metric"].get("selector", {}).get("matchLabels", {}).get("queue")
            if selected != wanted:
                yield Violation(
                    ref(hpa),
                    f"selects queue {selected!r}, but Deployment/{target} consumes {wanted!r} "
                    f"(MESH_QUEUE_PREFIX {prefix!r}): no such series, so it never scales",
                )


def _ingress_peers_external(rule: Manifest) -> bool:
    peers = rule.get("from")
    if not peers:
        return True
    return any("namespaceSelector" in peer or "ipBlock" in peer for peer in peers)


def check_exposure(overlay: Overlay) -> Iterator[Violation]:
    """Only the gateway is reachable from outside: Ingress, Service types and NetworkPolicies agree; egress to
    DNS and PostgreSQL for all, to RabbitMQ for the workloads that use it and no other."""
    for ingress in overlay.of_kind("Ingress"):
        for backend in _ingress_backends(ingress):
            if backend != EDGE_WORKLOAD:
                yield Violation(ref(ingress), f"routes to Service/{backend}; only the gateway may be exposed")
    for service in overlay.of_kind("Service"):
        if service["spec"].get("type", "ClusterIP") != "ClusterIP":
            yield Violation(ref(service), "must be ClusterIP (the Ingress is the way in)")
    policies = overlay.of_kind("NetworkPolicy")
    if not any(
        p["spec"].get("podSelector") == {}
        and set(p["spec"].get("policyTypes", [])) >= {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    ):
        yield Violation(
            "NetworkPolicy/*", "no default-deny policy (podSelector {}, Ingress and Egress, no rules)"
        )
    for deployment in overlay.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        labels = pod_labels(deployment)
        expected = WORKLOADS.get(name)
        metrics_ports: set[int | str] = {"http", expected.http_port} if expected else {"http"}
        selecting = [p for p in policies if selects(p["spec"].get("podSelector"), labels)]
        for policy in selecting:
            for rule in policy["spec"].get("ingress", []):
                if name == EDGE_WORKLOAD or not _ingress_peers_external(rule):
                    continue
                ports = [p.get("port") for p in rule.get("ports", [])]
                if not ports or any(port not in metrics_ports for port in ports):
                    yield Violation(
                        ref(policy),
                        f"lets traffic from outside the namespace reach {name} beyond its metrics port",
                    )
        egress_ports = {
            port.get("port")
            for policy in selecting
            if "Egress" in policy["spec"].get("policyTypes", [])
            for rule in policy["spec"].get("egress", [])
            for port in rule.get("ports", [])
        }
        if 53 not in egress_ports:
            yield Violation(ref(deployment), "no NetworkPolicy allows DNS egress")
        if POSTGRESQL_PORT not in egress_ports:
            yield Violation(
                ref(deployment), f"no NetworkPolicy allows egress to PostgreSQL ({POSTGRESQL_PORT})"
            )
        uses_rabbitmq = expected is None or expected.rabbitmq
        if uses_rabbitmq and RABBITMQ_PORTS[0] not in egress_ports:
            yield Violation(
                ref(deployment), f"no NetworkPolicy allows egress to RabbitMQ ({RABBITMQ_PORTS[0]})"
            )
        for port in RABBITMQ_PORTS:
            if not uses_rabbitmq and port in egress_ports:
                yield Violation(ref(deployment), f"may reach RabbitMQ ({port}), which it never uses")


def _ingress_backends(ingress: Manifest) -> Iterable[str]:
    default = ingress["spec"].get("defaultBackend", {}).get("service", {}).get("name")
    if default:
        yield default
    for rule in ingress["spec"].get("rules", []):
        for path in rule.get("http", {}).get("paths", []):
            yield path["backend"]["service"]["name"]


CHECKS: tuple[Callable[[Overlay], Iterator[Violation]], ...] = (
    check_inventory,
    check_probes,
    check_resources,
    check_security,
    check_images,
    check_identity,
    check_lifecycle,
    check_autoscaling,
    check_job_queues,
    check_exposure,
)


def check_overlay(overlay: Overlay) -> list[Violation]:
    """Every policy violation in one rendered overlay."""
    return [violation for check in CHECKS for violation in check(overlay)]
