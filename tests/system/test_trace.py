"""One trace across every hop: gateway -> queue -> RabbitMQ -> worker -> file service and inference."""

from __future__ import annotations

import io
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.system.collector import CollectedSpan, Collector
from tests.system.conftest import FILE_METRICS, GATEWAY, Mesh, start_mesh, stop_mesh

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
