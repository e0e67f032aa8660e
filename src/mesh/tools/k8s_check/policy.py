"""The mesh's deployment policies, checked on rendered manifests.

Each check takes every object of one rendered overlay and returns :class:`Violation` s; nothing here
reads files or talks to a cluster, so tests feed it hand-made objects.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from mesh.kit.jobs import IMAGE_JOBS_QUEUE, INFERENCE_JOBS_QUEUE
from mesh.kit.runtime import HTTP_STOP_SECONDS, LIVENESS_SERVICE
from mesh.kit.settings import ENV_PREFIX, BlobSettings, BrokerSettings, CommonSettings, DeviceSettings
from mesh.services.file import settings as file_settings
from mesh.services.gateway.settings import GatewaySettings
from mesh.services.image_processing import settings as image_settings
from mesh.services.inference import settings as inference_settings
from mesh.services.queue import settings as queue_settings
from mesh.tools.k8s_check.render import CLUSTER_SCOPED_KINDS, Manifest, containers_of, split_image
from mesh.tools.k8s_check.settings_env import (
    default_int,
    is_setting_name,
    read_variables,
    service_module,
    setting_variable,
    settings_of,
    why_unread,
)


@dataclass(frozen=True)
class Workload:
    """What the manifests must say about one Deployment."""

    grpc_port: int | None
    """gRPC port probed by the kubelet, or None for the HTTP-only gateway."""

    http_port: int
    """HTTP port (/metrics; for the gateway the whole REST API)."""

    health_name: str | None
    """grpc.health.v1 service name the probes ask for."""

    settings: type[CommonSettings]
    """Its process's settings class, which says what it uses (see the properties below)."""

    job_queue: str | None = None
    """The job queue its worker consumes (before ``MESH_QUEUE_PREFIX``), whose depth its autoscaler follows."""

    @property
    def gpu_capable(self) -> bool:
        """Whether it computes on a device (``MESH_DEVICE``), so that the GPU overlays must give it a GPU."""
        return issubclass(self.settings, DeviceSettings)

    @property
    def rabbitmq(self) -> bool:
        """Whether it talks to RabbitMQ: only these get ``MESH_AMQP_URL`` and egress to the broker."""
        return issubclass(self.settings, BrokerSettings)

    @property
    def blob_store(self) -> bool:
        """Whether it keeps the blob store under ``MESH_BLOB_DIR`` (which must then be on a volume)."""
        return issubclass(self.settings, BlobSettings)


# The workload behind each MESH_<NAME>_SERVICE_ADDRESS (its gRPC port) and MESH_<NAME>_SERVICE_HTTP (its HTTP
# port, which the gateway's health dashboard reads).
ADDRESSED_WORKLOADS = {
    "FILE": "file",
    "IMAGE": "image-processing",
    "INFERENCE": "inference",
    "QUEUE": "queue",
}
ADDRESS_SUFFIXES = {"_SERVICE_ADDRESS": "gRPC", "_SERVICE_HTTP": "HTTP"}
WORKLOADS = {
    "file": Workload(50051, 9101, file_settings.SERVICE_NAME, file_settings.FileSettings),
    "image-processing": Workload(
        50052, 9102, image_settings.SERVICE_NAME, image_settings.ImageSettings, job_queue=IMAGE_JOBS_QUEUE
    ),
    "inference": Workload(
        50053,
        9103,
        inference_settings.SERVICE_NAME,
        inference_settings.InferenceSettings,
        job_queue=INFERENCE_JOBS_QUEUE,
    ),
    "queue": Workload(50054, 9104, queue_settings.SERVICE_NAME, queue_settings.QueueSettings),
    "gateway": Workload(None, 8080, None, GatewaySettings),
}
EDGE_WORKLOAD = "gateway"
QUEUE_SCALED_WORKLOADS = tuple(name for name, workload in WORKLOADS.items() if workload.job_queue)
# The ports a process listens on: (kind, settings field, the name its container port goes by).
PORT_SETTINGS = (("gRPC", "grpc_port", "grpc"), ("HTTP", "http_port", "http"))
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
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


@dataclass(frozen=True)
class EnvVar:
    """One variable of a container's environment."""

    value: str | None
    """Its literal value, or None when it comes from a Secret or another reference."""

    source: str
    """Where it is set: ``env`` or the ``ConfigMap/name`` of an envFrom."""


def effective_env(overlay: Overlay, container: Manifest) -> dict[str, EnvVar]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps in order (a later one wins,
    with its ``prefix``), then ``env`` over them. Variables of an envFrom Secret are not known here."""
    found: dict[str, EnvVar] = {}
    for source in container.get("envFrom", []):
        name = source.get("configMapRef", {}).get("name")
        config = overlay.find("ConfigMap", name) if name else None
        for key, value in (config or {}).get("data", {}).items():
            found[source.get("prefix", "") + key] = EnvVar(str(value), f"ConfigMap/{name}")
    for env in container.get("env", []):
        value = env.get("value")
        found[env.get("name", "")] = EnvVar(str(value) if value is not None else None, "env")
    return found


def grace_seconds(overlay: Overlay, container: Manifest) -> float:
    """MESH_GRACE_SECONDS as the container sees it: its env, else its ConfigMaps, else the default."""
    value = env_value(overlay, container, "MESH_GRACE_SECONDS")
    return float(value) if value is not None else DEFAULT_GRACE_SECONDS


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
    variable = effective_env(overlay, container).get(name)
    return variable.value if variable else None


def settings_class(deployment: Manifest) -> type[CommonSettings] | None:
    """The settings class of the service a Deployment runs (by its command's module, else its name), or None
    for a workload that is no mesh service."""
    return settings_of(
        service_module(deployment["metadata"]["name"], pod_spec(deployment).get("containers", []))
    )


def selecting_services(overlay: Overlay, deployment: Manifest) -> list[Manifest]:
    """The Services whose selector selects the Deployment's pods (a Service without one has manual endpoints)."""
    labels = pod_labels(deployment)
    return [
        s
        for s in overlay.of_kind("Service")
        if s["spec"].get("selector") and selects({"matchLabels": s["spec"]["selector"]}, labels)
    ]


def container_port(containers: Iterable[Manifest], port: int | str | None) -> int | None:
    """A port number, or the containerPort that ``port`` names among ``containers``; None when none does."""
    if isinstance(port, int):
        return port
    return next(
        (p.get("containerPort") for c in containers for p in c.get("ports", []) if p.get("name") == port),
        None,
    )


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


def _scales_on_cpu(metric: Manifest) -> bool:
    return metric.get("type") == "Resource" and metric.get("resource", {}).get("name") == "cpu"


def check_autoscaling(overlay: Overlay) -> Iterator[Violation]:
    """The gateway scales on CPU; the queue workers on queue depth (an External metric) and on CPU too: they
    also serve the synchronous ProcessImage and Predict calls, which queue no job (the autoscaler follows
    whichever metric asks for more replicas)."""
    by_target = {h["spec"]["scaleTargetRef"]["name"]: h for h in overlay.of_kind("HorizontalPodAutoscaler")}
    for target in by_target:
        if overlay.find("Deployment", target) is None:
            yield Violation(
                ref(by_target[target]), f"scales Deployment/{target}, which is not in the manifests"
            )
    wanted: list[tuple[str, Callable[[Manifest], bool], str]] = [
        (EDGE_WORKLOAD, _scales_on_cpu, "CPU"),
        *[
            (name, lambda m: m.get("type") == "External", "queue depth (External)")
            for name in QUEUE_SCALED_WORKLOADS
        ],
        *[(name, _scales_on_cpu, "CPU (it serves synchronous calls too)") for name in QUEUE_SCALED_WORKLOADS],
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


def check_settings_variables(overlay: Overlay) -> Iterator[Violation]:
    """Every ``MESH_*`` variable reaches a process that reads it: a Deployment's own ``env`` is a setting of the
    service it runs, and a ConfigMap's is a setting of at least one workload that takes the ConfigMap (the
    shared one holds the gateway's ``MESH_*_SERVICE_HTTP``). A misspelt or misplaced variable is ignored
    without a word, and the default it was meant to replace runs while the manifest looks right."""
    readers: dict[str, dict[str, frozenset[str]]] = {}  # ConfigMap -> {workload: the variables it reads}
    for deployment in overlay.of_kind("Deployment"):
        cls = settings_class(deployment)
        if cls is None:
            continue
        variables = read_variables(cls)
        for container in pod_spec(deployment).get("containers", []):
            for source in container.get("envFrom", []):
                name = source.get("configMapRef", {}).get("name")
                if name:
                    readers.setdefault(name, {})[deployment["metadata"]["name"]] = variables
            for env in container.get("env", []):
                variable = env.get("name", "")
                if is_setting_name(variable) and variable.upper() not in variables:
                    yield Violation(
                        f"{ref(deployment)} container {container.get('name')}",
                        f"env {variable} is not read by {cls.__name__} ({why_unread(variable)})",
                    )
    for config in overlay.of_kind("ConfigMap"):
        workloads = readers.get(config["metadata"]["name"])
        if not workloads:
            continue
        for variable in config.get("data", {}):
            if is_setting_name(variable) and not any(variable.upper() in v for v in workloads.values()):
                yield Violation(
                    ref(config),
                    f"{variable} is read by none of the workloads that take it ({', '.join(sorted(workloads))}; "
                    f"{why_unread(variable)})",
                )


@dataclass(frozen=True)
class Listener:
    """A port a process listens on, and the setting it comes from."""

    kind: str
    """``gRPC`` or ``HTTP``."""

    port: int | None
    """None when the setting comes from a Secret or another reference (not known here)."""

    origin: str

    def __str__(self) -> str:
        return f"{self.kind} on {self.port} ({self.origin})"


def listeners(overlay: Overlay, cls: type[CommonSettings], container: Manifest) -> dict[str, Listener]:
    """The ports the service with settings ``cls`` listens on in ``container``, by kind: its ``MESH_GRPC_PORT``
    and ``MESH_HTTP_PORT`` as the container sees them, else the service's defaults (CONTRACT.md). A kind the
    service does not serve (the gateway's gRPC) is absent."""
    env = effective_env(overlay, container)
    found: dict[str, Listener] = {}
    for kind, field, _ in PORT_SETTINGS:
        variable = setting_variable(cls, field)
        if variable is None:
            continue
        setting = env.get(variable)
        if setting is None:
            found[kind] = Listener(kind, default_int(cls, field), f"the default of {variable}")
        elif setting.value is None or not setting.value.strip().isdigit():
            # A value from a Secret is unknown here; one that is no number fails the service's start anyway.
            found[kind] = Listener(kind, None, f"{variable} from {setting.source}")
        else:
            found[kind] = Listener(kind, int(setting.value), f"{variable} from {setting.source}")
    return found


def _check_container_ports(
    where: str, container: Manifest, found: dict[str, Listener]
) -> Iterator[Violation]:
    known = {listener.port for listener in found.values()}
    complete = None not in known
    for port in container.get("ports", []):
        name, number = port.get("name"), port.get("containerPort")
        kind = next((kind for kind, _, port_name in PORT_SETTINGS if port_name == name), None)
        listener = found.get(kind) if kind else None
        if kind and listener is None:
            yield Violation(where, f"containerPort {name} ({number}): the service serves no {kind}")
        elif listener is not None and listener.port is not None and number != listener.port:
            yield Violation(
                where, f"containerPort {name} is {number}, but the service listens for {listener}"
            )
        elif listener is None and complete and number not in known:
            yield Violation(where, f"containerPort {name} ({number}): nothing listens there")


def _check_probe_ports(where: str, container: Manifest, found: dict[str, Listener]) -> Iterator[Violation]:
    """gRPC probes knock on the gRPC port, HTTP GETs on the HTTP port, TCP probes on either; one line for the
    probes that knock on one wrong port (startup, readiness and liveness usually share it)."""
    wrong: dict[tuple[int | None, str], list[str]] = {}
    for probe_name in PROBES:
        probe = container.get(probe_name) or {}
        for handler, kind in (("grpc", "gRPC"), ("httpGet", "HTTP"), ("tcpSocket", None)):
            if handler not in probe:
                continue
            port = container_port([container], probe[handler].get("port"))
            wanted = list(found.values()) if kind is None else [found[kind]] if kind in found else []
            if not wanted:
                yield Violation(where, f"{probe_name} probes {kind}, which the service does not serve")
            elif all(w.port is not None and w.port != port for w in wanted):
                wrong.setdefault((port, " or ".join(str(w) for w in wanted)), []).append(probe_name)
    for (port, listening), probes in wrong.items():
        yield Violation(
            where, f"{', '.join(probes)} probe port {port}, but the service listens for {listening}"
        )


def check_ports(overlay: Overlay) -> Iterator[Violation]:
    """The ports each service listens on (``MESH_GRPC_PORT``, ``MESH_HTTP_PORT``, else its defaults as in
    CONTRACT.md) are the ones its container declares, its probes knock on and its Services send to: a port
    changed in one place only restarts pods that serve (probes fail) or leaves a Service that reaches
    nothing."""
    for deployment in overlay.of_kind("Deployment"):
        cls = settings_class(deployment)
        if cls is None:
            continue
        containers = pod_spec(deployment).get("containers", [])
        listening: set[int | None] = set()
        described: list[str] = []
        for container in containers:
            where = f"{ref(deployment)} container {container.get('name')}"
            found = listeners(overlay, cls, container)
            listening |= {listener.port for listener in found.values()}
            described += [str(listener) for listener in found.values()]
            yield from _check_container_ports(where, container, found)
            yield from _check_probe_ports(where, container, found)
        if None in listening:
            continue
        for service in selecting_services(overlay, deployment):
            for port in service["spec"].get("ports", []):
                target = port.get("targetPort", port.get("port"))
                number = container_port(containers, target)
                label = f"port {port.get('name') or port.get('port')}"
                if number is None:
                    yield Violation(
                        ref(service),
                        f"{label}: targetPort {target} names no container port of {ref(deployment)}",
                    )
                elif number not in listening:
                    yield Violation(
                        ref(service),
                        f"{label} sends to {number}, where {ref(deployment)} does not listen "
                        f"({', '.join(described)})",
                    )


def addressed_service(host: str, namespace: str | None) -> str | None:
    """The Service a host names in the overlay's namespace (``file``, ``file.mesh``, ``file.mesh.svc``,
    ``file.mesh.svc.cluster.local``), or None for a host elsewhere (another namespace, an IP, a DNS name)."""
    name, _, domain = host.partition(".")
    if not domain:
        return name
    if namespace and domain in (namespace, f"{namespace}.svc", f"{namespace}.svc.cluster.local"):
        return name
    return None


def _check_address(overlay: Overlay, where: str, variable: str, value: str) -> Iterator[Violation]:
    suffix = next((s for s in ADDRESS_SUFFIXES if variable.endswith(s)), None)
    if suffix is None or not variable.startswith(ENV_PREFIX):
        return
    host, _, port_text = value.rpartition(":")
    if not host or not port_text.isdigit():
        yield Violation(where, f"{variable} {value!r} is not host:port")
        return
    namespace = next((s["metadata"].get("namespace") for s in overlay.of_kind("Service")), None)
    service_name = addressed_service(host, namespace)
    if service_name is None:
        return
    service = overlay.find("Service", service_name)
    if service is None:
        yield Violation(where, f"{variable} {value}: there is no Service {service_name}")
        return
    ports = service["spec"].get("ports", [])
    port = next((p for p in ports if p.get("port") == int(port_text)), None)
    if port is None:
        numbers = ", ".join(str(p.get("port")) for p in ports)
        yield Violation(
            where, f"{variable} {value}: {ref(service)} has no port {port_text} (its ports: {numbers})"
        )
        return
    workload = ADDRESSED_WORKLOADS.get(variable.removeprefix(ENV_PREFIX).removesuffix(suffix))
    deployment = overlay.find("Deployment", workload) if workload else None
    cls = settings_class(deployment) if deployment else None
    if deployment is None or cls is None:
        return
    if service not in selecting_services(overlay, deployment):
        yield Violation(
            where, f"{variable} {value}: {ref(service)} does not select the pods of {ref(deployment)}"
        )
        return
    # A port that reaches nothing is reported on the Service (check_ports); here, one that reaches the other
    # kind of port (a gRPC address on the HTTP port).
    kind = ADDRESS_SUFFIXES[suffix]
    for container in pod_spec(deployment).get("containers", []):
        found = listeners(overlay, cls, container)
        number = container_port([container], port.get("targetPort", port.get("port")))
        other = next((w for w in found.values() if w.kind != kind and w.port == number), None)
        if other is not None:
            yield Violation(
                where,
                f"{variable} {value}: {ref(service)} sends it to {ref(deployment)}'s {other}, not to its {kind} "
                "port",
            )


def check_service_addresses(overlay: Overlay) -> Iterator[Violation]:
    """Every ``MESH_<NAME>_SERVICE_ADDRESS`` (and the gateway's ``MESH_<NAME>_SERVICE_HTTP``) that names a host
    in the overlay's namespace names a Service, one of its ports, and behind it the named workload's gRPC
    (HTTP) port: a wrong one fails every call to that service while every pod is healthy."""
    for config in overlay.of_kind("ConfigMap"):
        for variable, value in config.get("data", {}).items():
            yield from _check_address(overlay, ref(config), variable, str(value))
    for deployment in overlay.of_kind("Deployment"):
        for container in pod_spec(deployment).get("containers", []):
            for env in container.get("env", []):
                if env.get("value") is not None:
                    yield from _check_address(
                        overlay, ref(deployment), env.get("name", ""), str(env["value"])
                    )


def check_blob_store(overlay: Overlay) -> Iterator[Violation]:
    """The file service's ``MESH_BLOB_DIR`` is on a writable, persistent volume that its pod mounts: the root
    filesystem is read-only, so elsewhere it cannot start, and on an emptyDir every blob goes with the pod."""
    for name, workload in WORKLOADS.items():
        deployment = overlay.find("Deployment", name)
        if not workload.blob_store or deployment is None:
            continue
        volumes = {v.get("name"): v for v in pod_spec(deployment).get("volumes", [])}
        for container in pod_spec(deployment).get("containers", []):
            where = f"{ref(deployment)} container {container.get('name')}"
            setting = effective_env(overlay, container).get("MESH_BLOB_DIR")
            if setting is None:
                yield Violation(
                    where,
                    "MESH_BLOB_DIR is not set: set it to the blob volume's mount path (the image's default "
                    "cannot be checked here)",
                )
                continue
            if setting.value is None:
                continue
            yield from _check_blob_dir(where, setting.value, container, volumes)


def _mount_holding(path: str, mounts: list[Manifest]) -> Manifest | None:
    """The mount that ``path`` (absolute, normalized) lies on: the deepest mount path at or above it."""
    holding = [
        m
        for m in mounts
        if posixpath.commonpath([path, posixpath.normpath(m.get("mountPath", "/"))])
        == posixpath.normpath(m.get("mountPath", "/"))
    ]
    return max(holding, key=lambda m: len(posixpath.normpath(m.get("mountPath", "/"))), default=None)


def _check_blob_dir(
    where: str, value: str, container: Manifest, volumes: dict[str, Manifest]
) -> Iterator[Violation]:
    path = posixpath.join(container.get("workingDir", ""), value)
    if not posixpath.isabs(path):
        yield Violation(
            where,
            f"MESH_BLOB_DIR {value} is relative to the image's working directory, on the root filesystem",
        )
        return
    mount = _mount_holding(posixpath.normpath(path), container.get("volumeMounts", []))
    if mount is None:
        paths = ", ".join(m.get("mountPath", "") for m in container.get("volumeMounts", []))
        yield Violation(
            where,
            f"MESH_BLOB_DIR {value} is on no mounted volume (mounts: {paths}), so on the read-only root "
            "filesystem",
        )
        return
    volume = volumes.get(str(mount.get("name")), {})
    if mount.get("readOnly"):
        yield Violation(where, f"MESH_BLOB_DIR {value} is on volume {mount.get('name')}, mounted read-only")
    if "emptyDir" in volume:
        yield Violation(
            where,
            f"MESH_BLOB_DIR {value} is on the emptyDir {mount.get('name')}: every blob goes with the pod",
        )
