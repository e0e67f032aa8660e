"""NetworkPolicy checks: every call between workloads, and Prometheus's scrape, gets through the policies as
Kubernetes applies them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from mesh.kit.settings import ENV_PREFIX, CommonSettings, variable_names
from mesh.tools.k8s_check.policy import (
    ADDRESS_SUFFIXES,
    ADDRESSED_WORKLOADS,
    Overlay,
    Violation,
    addressed_service,
    container_port,
    effective_env,
    listeners,
    pod_labels,
    pod_spec,
    ref,
    selecting_services,
    selects,
    settings_class,
)
from mesh.tools.k8s_check.render import Manifest

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""The label Kubernetes gives every namespace: its name (what namespaceSelectors match on)."""
MONITORING_NAMESPACE = "monitoring"
"""Where Prometheus runs (docs/deploy.md): it scrapes the pods annotated ``prometheus.io/scrape: "true"``."""
SCRAPE_ANNOTATION = "prometheus.io/scrape"
SCRAPE_PORT_ANNOTATION = "prometheus.io/port"


@dataclass(frozen=True)
class Pods:
    """One end of a connection: pods with their namespace, for NetworkPolicy peers to match."""

    name: str
    """For messages: ``Deployment/file``, or who they are outside the manifests."""

    namespace: str | None
    namespace_labels: dict[str, str]
    labels: dict[str, str] | None
    """Their labels; None for pods outside the manifests, which only a peer selecting every pod matches."""

    identity: dict[str, str] | None = None
    """The labels that tell them apart (their Deployment's selector), for the fix a message proposes."""

    def describe(self) -> str:
        """How a NetworkPolicy peer selects them, for the fix a message proposes (both ends of a call between
        workloads are in the overlay's namespace)."""
        if self.identity:
            return f"podSelector {_pairs(self.identity)}"
        return f"namespaceSelector {NAMESPACE_NAME_LABEL}={self.namespace}"


@dataclass(frozen=True)
class PodPort:
    """The port a connection reaches on the callee's pod: NetworkPolicies match its number or its name."""

    number: int
    name: str | None

    def __str__(self) -> str:
        return f"{self.number} ({self.name})" if self.name else str(self.number)


def _pairs(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def namespace_labels(overlay: Overlay, namespace: str | None) -> dict[str, str]:
    """The labels of a namespace: its Namespace object's, if the manifests hold one, and the name label that
    Kubernetes sets on every namespace."""
    found = overlay.find("Namespace", namespace) if namespace else None
    labels = dict((found or {}).get("metadata", {}).get("labels", {}))
    if namespace:
        labels[NAMESPACE_NAME_LABEL] = namespace
    return labels


def deployment_pods(overlay: Overlay, deployment: Manifest) -> Pods:
    namespace = deployment["metadata"].get("namespace")
    labels = pod_labels(deployment)
    identity = deployment["spec"].get("selector", {}).get("matchLabels") or labels
    return Pods(ref(deployment), namespace, namespace_labels(overlay, namespace), labels, identity)


def policy_types(policy: Manifest) -> set[str]:
    """The directions a NetworkPolicy governs: its policyTypes, else Ingress, and Egress when it has egress rules
    (as Kubernetes defaults it: an empty or null ``egress`` adds no Egress)."""
    spec = policy["spec"]
    return set(spec.get("policyTypes") or (["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]))


def _peer_matches(peer: Manifest, policy_namespace: str | None, pods: Pods) -> bool:
    """Whether one ``from``/``to`` peer selects ``pods``: a podSelector alone selects in the policy's namespace, a
    namespaceSelector the namespaces it matches, both together the pods they both match. An ipBlock is not
    counted: pod IPs are not known here, and whether ipBlocks apply to pod traffic depends on the network plugin."""
    namespace_selector = peer.get("namespaceSelector")
    pod_selector = peer.get("podSelector")
    if "ipBlock" in peer or (namespace_selector is None and pod_selector is None):
        return False
    if namespace_selector is None:
        if pods.namespace != policy_namespace:
            return False
    elif not selects(namespace_selector, pods.namespace_labels):
        return False
    if pod_selector is None:
        return True
    if pods.labels is None:
        return not pod_selector.get("matchLabels") and not pod_selector.get("matchExpressions")
    return selects(pod_selector, pods.labels)


def _port_matches(rule_port: Manifest, port: PodPort) -> bool:
    """Whether a rule's port entry covers a TCP connection to ``port``: by name, by number or by range
    (``endPort``); an entry without a port covers every port of its protocol."""
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    wanted = rule_port.get("port")
    if wanted is None:
        return True
    if isinstance(wanted, str):
        return wanted == port.name
    first: int = wanted
    last: int = rule_port.get("endPort") or first
    return first <= port.number <= last


def governing_policies(overlay: Overlay, direction: str, pods: Pods) -> list[Manifest]:
    """The NetworkPolicies of ``direction`` (Ingress, Egress) that select ``pods``."""
    return [
        p
        for p in overlay.of_kind("NetworkPolicy")
        if p["metadata"].get("namespace") == pods.namespace
        and direction in policy_types(p)
        and pods.labels is not None
        and selects(p["spec"].get("podSelector"), pods.labels)
    ]


def allows(policies: list[Manifest], direction: str, peer: Pods, port: PodPort) -> bool:
    """Whether ``policies`` (those of one direction that select one side's pods) let a connection with
    ``peer`` on ``port`` through, as Kubernetes adds them up: none at all leaves the pods open; otherwise one
    rule of one of them must match both the peer (a rule without peers matches all) and the port (likewise)."""
    if not policies:
        return True
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return any(
        (
            not rule.get(peers_key)
            or any(_peer_matches(p, policy["metadata"].get("namespace"), peer) for p in rule[peers_key])
        )
        and (not rule.get("ports") or any(_port_matches(p, port) for p in rule["ports"]))
        for policy in policies
        for rule in policy["spec"].get(rules_key) or []
    )


def _connection_violations(
    overlay: Overlay, where: str, what: str, caller: Pods, callee: Pods, port: PodPort
) -> Iterator[Violation]:
    """A violation for each side whose NetworkPolicies drop ``caller``'s connection to ``callee`` on ``port``:
    the caller's egress (when the caller is in the manifests) and the callee's ingress."""
    port_spec = f"port {port.name or port.number}"
    if caller.labels is not None:
        egress = governing_policies(overlay, "Egress", caller)
        if not allows(egress, "Egress", callee, port):
            yield Violation(
                where,
                f"{what}, but its egress NetworkPolicies ({', '.join(p['metadata']['name'] for p in egress)}) "
                f"let no connection out to {callee.name} on {port}: add an egress rule to {callee.describe()} "
                f"on {port_spec}",
            )
    ingress = governing_policies(overlay, "Ingress", callee)
    if not allows(ingress, "Ingress", caller, port):
        yield Violation(
            where,
            f"{what}, but the ingress NetworkPolicies of {callee.name} "
            f"({', '.join(p['metadata']['name'] for p in ingress)}) let no connection in from {caller.name} on "
            f"{port}: add an ingress rule from {caller.describe()} on {port_spec}",
        )


def pod_port(containers: Iterable[Manifest], target: int | str) -> PodPort | None:
    """The port of a pod that a Service's ``targetPort`` (a number or a container port's name) reaches, with
    the name its container gives it; None for a name no container port has (check_ports reports that)."""
    number = container_port(containers, target)
    if number is None:
        return None
    name = next(
        (p.get("name") for c in containers for p in c.get("ports", []) if p.get("containerPort") == number),
        None,
    )
    return PodPort(number, name)


def _addressed_port(
    overlay: Overlay, namespace: str | None, address: str | None
) -> tuple[Manifest, Manifest] | None:
    """The Service and Service port that a ``host:port`` address names in the namespace; None for a value from
    a Secret, a host outside the namespace, or a Service or port that does not exist (check_service_addresses
    reports the last two)."""
    host, _, port_text = (address or "").rpartition(":")
    service_name = addressed_service(host, namespace) if host and port_text.isdigit() else None
    service = overlay.find("Service", service_name) if service_name else None
    if service is None:
        return None
    port = next((p for p in service["spec"].get("ports", []) if p.get("port") == int(port_text)), None)
    return (service, port) if port is not None else None


def _call_violations(
    overlay: Overlay, deployment: Manifest, cls: type[CommonSettings], container: Manifest, variable: str
) -> Iterator[Violation]:
    where = f"{ref(deployment)} container {container.get('name')}"
    setting = effective_env(overlay, container).get(variable)
    if setting is None:
        field = variable.removeprefix(ENV_PREFIX).lower()
        yield Violation(
            where,
            f"{variable} is not set, so it calls {cls.model_fields[field].default}, inside its own pod: set it to "
            "the address of the Service it is for",
        )
        return
    addressed = _addressed_port(overlay, deployment["metadata"].get("namespace"), setting.value)
    if addressed is None:
        return
    service, service_port = addressed
    suffix = next(s for s in ADDRESS_SUFFIXES if variable.endswith(s))
    callee = overlay.find(
        "Deployment", ADDRESSED_WORKLOADS[variable.removeprefix(ENV_PREFIX).removesuffix(suffix)]
    )
    callee_cls = settings_class(callee) if callee is not None else None
    # A Service that misses the workload, or a port where it does not listen, is reported by
    # check_service_addresses and check_ports: here, only the calls that would reach it but for the policies.
    if callee is None or callee_cls is None or service not in selecting_services(overlay, callee):
        return
    containers = pod_spec(callee).get("containers", [])
    port = pod_port(containers, service_port.get("targetPort") or service_port["port"])
    listening = {w.port for c in containers for w in listeners(overlay, callee_cls, c).values()}
    if port is not None and port.number in listening:
        yield from _connection_violations(
            overlay,
            where,
            f"calls {ref(callee)} ({variable} {setting.value})",
            deployment_pods(overlay, deployment),
            deployment_pods(overlay, callee),
            port,
        )


def called_addresses(cls: type[CommonSettings]) -> list[str]:
    """The variables of the service addresses a process dials: its settings class holds those it calls and
    no other (``FileServiceAddress`` and the like; the gateway's ``*_service_http`` for its dashboard)."""
    return [
        variable_names(cls, field)[0]
        for field in cls.model_fields
        if field.endswith(("_service_address", "_service_http"))
    ]


def check_network_calls(overlay: Overlay) -> Iterator[Violation]:
    """Every call a workload makes to another is let through by the NetworkPolicies, as Kubernetes applies
    them: the address settings its process dials (:func:`called_addresses`, as its container's environment
    sets them) name a Service, and the caller's egress and each selected workload's ingress allow that Service's
    target port. Prometheus, in the ``monitoring`` namespace, reaches the metrics (HTTP) port of every pod that
    asks to be scraped. A call the policies drop fails at run time only, with every pod healthy."""
    for deployment in overlay.of_kind("Deployment"):
        cls = settings_class(deployment)
        if cls is None:
            continue
        for container in pod_spec(deployment).get("containers", []):
            for variable in called_addresses(cls):
                yield from _call_violations(overlay, deployment, cls, container, variable)
        yield from _check_scrape(overlay, deployment, cls)


def _check_scrape(overlay: Overlay, deployment: Manifest, cls: type[CommonSettings]) -> Iterator[Violation]:
    template = deployment.get("spec", {}).get("template", {})
    annotations = template.get("metadata", {}).get("annotations", {})
    if str(annotations.get(SCRAPE_ANNOTATION)).lower() != "true":
        return
    containers = pod_spec(deployment).get("containers", [])
    metrics = [
        listener
        for container in containers
        if (listener := listeners(overlay, cls, container).get("HTTP")) is not None
        and listener.port is not None
    ]
    if not metrics:
        return
    annotated = annotations.get(SCRAPE_PORT_ANNOTATION)
    if annotated is not None and str(annotated) not in {str(m.port) for m in metrics}:
        yield Violation(
            ref(deployment),
            f"{SCRAPE_PORT_ANNOTATION} {annotated}, but its metrics are served on {metrics[0]}: Prometheus "
            f"scrapes nothing there; set it to {metrics[0].port}",
        )
    prometheus = Pods(
        f"Prometheus (namespace {MONITORING_NAMESPACE})",
        MONITORING_NAMESPACE,
        namespace_labels(overlay, MONITORING_NAMESPACE),
        None,
    )
    port = pod_port(containers, metrics[0].port or 0)
    declared = {p.get("containerPort") for c in containers for p in c.get("ports", [])}
    # A metrics port that no container port declares is reported by check_ports.
    if port is not None and port.number in declared:
        yield from _connection_violations(
            overlay,
            ref(deployment),
            f"is scraped on its metrics port ({SCRAPE_ANNOTATION})",
            prometheus,
            deployment_pods(overlay, deployment),
            port,
        )
