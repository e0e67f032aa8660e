"""One trace across every hop: gateway -> queue -> RabbitMQ -> worker -> file service and inference; and the
same mesh's metrics, as a real Prometheus scrapes them and evaluates the alert rules on them."""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import free_port, require
from tests.system.collector import CollectedSpan, Collector
from tests.system.conftest import FILE_METRICS, GATEWAY, PORT_OFFSET, Mesh, start_mesh, stop_mesh, until

# Each runs the whole mesh on the same moved ports: `make test` runs them after its parallel run, one after another.
pytestmark = pytest.mark.serial

REPO = Path(__file__).resolve().parents[2]

TERMINAL = {"SUCCEEDED", "FAILED", "DEAD", "CANCELLED"}


@pytest.fixture(scope="module")
def traced_mesh(
    tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> Iterator[tuple[Mesh, Collector]]:
    """The whole mesh exporting spans over OTLP/HTTP to a collector run by the test."""
    with Collector() as collector:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        mesh = start_mesh(tmp_path_factory.mktemp("traced"), database_url, env)
        try:
            yield mesh, collector
        finally:
            stop_mesh(mesh)


def _photo() -> bytes:
    rng = np.random.default_rng(7)
    pixels = (rng.random((120, 320, 3)) * 40 + 200).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_job_forms_one_connected_trace(traced_mesh: tuple[Mesh, Collector]) -> None:
    """A job submitted with a known traceparent yields one connected tree of spans from every hop."""
    mesh, collector = traced_mesh
    trace_id = secrets.token_hex(16)
    root_span = secrets.token_hex(8)
    headers = {"traceparent": f"00-{trace_id}-{root_span}-01"}
    with httpx.Client(base_url=GATEWAY, timeout=15) as client:
        upload = client.post("/v1/images", files={"file": ("s.png", _photo(), "image/png")}, headers=headers)
        assert upload.status_code == 201, upload.text
        assert trace_id in upload.headers["traceparent"]
        body = {
            "image_id": upload.json()["id"],
            "pipeline": [{"filter": "grayscale", "params": {}}],
            "model": "strip-reader",
        }
        submitted = client.post("/v1/jobs", json=body, headers=headers)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = client.get(f"/v1/jobs/{job_id}").json()["state"]
            if state in TERMINAL:
                break
            time.sleep(0.2)
    assert state == "SUCCEEDED", state

    wanted = {"gateway", "queue", "image-processing", "file", "inference"}

    def orphans_of(spans: list[CollectedSpan]) -> list[CollectedSpan]:
        ids = {s.span_id for s in spans}
        return [s for s in spans if s.parent_span_id not in ids and s.parent_span_id != root_span]

    # Parents end (and are exported) after their children: wait until the tree is complete.
    deadline = time.monotonic() + 20
    spans = collector.trace(trace_id)
    while time.monotonic() < deadline and (not wanted <= {s.service for s in spans} or orphans_of(spans)):
        time.sleep(0.3)
        spans = collector.trace(trace_id)
    services = {s.service for s in spans}
    assert wanted <= services, f"services in the trace: {sorted(services)}"
    orphans = orphans_of(spans)
    assert not orphans, f"orphan spans: {[(s.service, s.name, s.parent_span_id) for s in orphans]}"
    names = " ".join(s.name.lower() for s in spans)
    assert "publish" in names or "send" in names, "no RabbitMQ publish span"
    consumers = [s for s in spans if "process" in s.name.lower() or "receive" in s.name.lower()]
    assert any(s.links for s in consumers), "the consumer span must link to the producer context"

    log_services = set()
    for line in mesh.log().splitlines():
        if trace_id in line and line.startswith("{"):
            log_services.add(json.loads(line).get("service"))
    assert {"gateway", "queue", "file", "image-processing", "inference"} <= log_services, (
        f"services logging the trace id: {log_services}"
    )


def test_a_callers_error_is_named_on_its_spans_in_the_trace(traced_mesh: tuple[Mesh, Collector]) -> None:
    """A prediction on an image that does not exist answers 404; in its trace the inference service's server
    span, the file service's, and the inference.predict span inside each name NOT_FOUND and its message (the
    server spans carried only the code beside two AbortError events, and inference.predict was an ERROR with
    the exception recorded, as if the mesh had crashed)."""
    _, collector = traced_mesh
    trace_id = secrets.token_hex(16)
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    missing = "00000000-0000-0000-0000-000000000000"
    with httpx.Client(base_url=GATEWAY, timeout=15) as client:
        answer = client.post("/v1/models/strip-reader:predict", json={"image_id": missing}, headers=headers)
    assert answer.status_code == 404, answer.text
    wanted = {
        ("inference", "/mesh.inference.v1.InferenceService/Predict"),
        ("file", "/mesh.file.v1.FileService/DownloadImage"),
        ("inference", "inference.predict"),
    }

    def named() -> dict[tuple[str, str], dict[str, object]]:
        spans = {(s.service, s.name): s.attributes for s in collector.trace(trace_id)}
        return spans if wanted <= set(spans) else {}

    spans = until(named, 20)
    assert spans, f"spans in the trace: {sorted((s.service, s.name) for s in collector.trace(trace_id))}"
    for key in wanted:
        assert spans[key].get("mesh.error.code") == "NOT_FOUND", (key, spans[key])
        assert missing in str(spans[key].get("mesh.error.message")), (key, spans[key])
    for key in sorted(wanted - {("inference", "inference.predict")}):
        assert spans[key].get("rpc.grpc.status_code") == 5, (key, spans[key])


def test_metrics_count_traffic(traced_mesh: tuple[Mesh, Collector], tmp_path: Path) -> None:
    """After traffic, each process's Prometheus counters show it: gateway routes and file service RPCs."""
    with httpx.Client(base_url=GATEWAY, timeout=15) as client:
        before = client.get("/metrics").text
        for _ in range(3):
            assert client.get("/v1/images", params={"page_size": 1}).status_code == 200
        after = client.get("/metrics").text
        file_metrics = httpx.get(FILE_METRICS, timeout=5, follow_redirects=True).text

    def count(text: str, needle: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if needle in line and not line.startswith("#")
        )

    route_needle = 'route="/v1/images"'
    assert count(after, route_needle) - count(before, route_needle) >= 3
    assert count(file_metrics, 'grpc_method="ListImages"') >= 3


PROMETHEUS = REPO / ".tools" / "prometheus" / "usr" / "bin" / "prometheus"
RULES = REPO / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "mesh-overview.json"
METRICS_PORTS = {"gateway": 8080, "file": 9101, "image-processing": 9102, "inference": 9103, "queue": 9104}


def test_a_real_prometheus_scrapes_every_process_and_evaluates_every_rule(
    traced_mesh: tuple[Mesh, Collector], tmp_path: Path
) -> None:
    """Prometheus (from Debian's package, as make test unpacks it) scrapes the five processes of a running mesh,
    loads deploy/prometheus/alerts.yaml and evaluates every rule on the live series without an error and with
    none firing; each process names its service in mesh_build_info, and every dashboard query runs."""
    require(PROMETHEUS.exists(), "prometheus (make test unpacks it from Debian's prometheus package)")
    targets = [f"127.0.0.1:{port + PORT_OFFSET}" for port in METRICS_PORTS.values()]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [{"job_name": "mesh", "static_configs": [{"targets": targets}]}],
            }
        )
    )
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    server = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    try:

        def query(expr: str) -> list[dict[str, Any]]:
            answer = httpx.get(f"{api}/query", params={"query": expr}, timeout=5).json()
            assert answer["status"] == "success", (expr, answer)
            result: list[dict[str, Any]] = answer["data"]["result"]
            return result

        def ready_data(path: str) -> Any:
            """The API's data, or None while Prometheus starts (no listener yet, then 503s)."""
            try:
                answer = httpx.get(f"{api}/{path}", timeout=5)
            except httpx.TransportError:
                return None
            if answer.status_code == httpx.codes.SERVICE_UNAVAILABLE:
                return None
            answer.raise_for_status()
            return answer.json()["data"]

        def all_up() -> bool:
            data = ready_data("targets")
            if data is None:
                return False
            active = data["activeTargets"]
            return len(active) == len(targets) and all(t["health"] == "up" for t in active)

        def rules_evaluated() -> list[dict[str, Any]]:
            data = ready_data("rules")
            if data is None:
                return []
            groups = data["groups"]
            rules: list[dict[str, Any]] = [rule for group in groups for rule in group["rules"]]
            evaluated = rules and all(not rule["lastEvaluation"].startswith("0001") for rule in rules)
            return rules if evaluated else []

        assert until(all_up, 45), "not every process was scraped"
        rules = until(rules_evaluated, 30)
        assert rules, "not every rule was evaluated"
        assert [rule["name"] for rule in rules if rule["health"] != "ok"] == []
        assert len(rules) == len(
            [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
        )
        assert [rule["name"] for rule in rules if rule["state"] == "firing"] == []
        services = until(lambda: query("mesh_build_info"), 30)
        assert services, "no mesh_build_info"
        assert sorted(series["metric"]["service"] for series in services) == sorted(METRICS_PORTS)
        for panel in json.loads(DASHBOARD.read_text())["panels"]:
            for target in panel.get("targets", []):
                query(target["expr"].replace("$__rate_interval", "1m").replace("$__interval", "15s"))
    finally:
        server.terminate()
        server.wait(timeout=10)
