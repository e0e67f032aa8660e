"""``deploy/prometheus/alerts.yaml`` and ``deploy/grafana/mesh-overview.json``: rules Prometheus would load and
a dashboard Grafana would import, both on metrics the mesh exposes."""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

import mesh.kit
import mesh.services
from mesh.kit.gpu_metrics import GpuCollector
from tests.conftest import require

from .conftest import REPO

RULES = REPO / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts.test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "mesh-overview.json"
# Unpacked from Debian's prometheus package by `make test`; a promtool on the PATH serves as well.
PROMTOOL = REPO / ".tools" / "prometheus" / "usr" / "bin" / "promtool"
# Grafana's own variables, replaced by what it would put there before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
DURATION = re.compile(r"^\d+[smhd]$")
# Series that Prometheus records itself for every scrape target.
PROMETHEUS_SERIES = frozenset({"up"})
SAMPLE_SUFFIXES = {
    "info": ("_info",),
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
}


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query on the dashboard, Grafana's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((f"{panel['title']} ({target['refId']})", expr))
    return queries


@functools.cache
def _exposed_series() -> frozenset[str]:
    """Every series name the mesh's processes can expose: each module of the kit and the services imported (as
    each process does at start), then the metric families registered, labelled ones included before any
    sample is recorded."""
    for package in (mesh.kit, mesh.services):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if module.name.endswith("__main__"):
                continue
            try:
                importlib.import_module(module.name)
            except ModuleNotFoundError as error:
                if error.name not in ("cupy", "cupyx"):  # the GPU modules, where CuPy is absent
                    raise
    # The GPU series are registered only where NVML finds a GPU: here a one-device stand-in says which.
    gpu = GpuCollector(_OneGpu(), pool_bytes=lambda: (1, 2))
    families = [*REGISTRY.collect(), *gpu.collect()]
    return PROMETHEUS_SERIES | frozenset(
        family.name + suffix for family in families for suffix in SAMPLE_SUFFIXES.get(family.type, ("",))
    )


class _OneGpu:
    """An NVML that sees one device."""

    def device_count(self) -> int:
        return 1

    def name(self, index: int) -> str:
        return "stand-in"

    def memory(self, index: int) -> tuple[int, int]:
        return 1, 2

    def utilization(self, index: int) -> float:
        return 0.5


def _metric_names(node: Any) -> Iterator[str]:
    """The metric names an expression selects."""
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            yield node.name
        return
    for attribute in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attribute, None)
        if child is not None:
            yield from _metric_names(child)
    for argument in getattr(node, "args", None) or ():
        yield from _metric_names(argument)


def test_every_rule_is_complete_and_named_once() -> None:
    """Each rule is an alert with a unique name, an expression, a severity Prometheus routes on, and a summary
    and description for the person it wakes."""
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert re.fullmatch(r"Mesh[A-Z][A-Za-z]+", rule["alert"])
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        assert "for" not in rule or DURATION.match(rule["for"])


@pytest.mark.parametrize("rule", _rules(), ids=lambda rule: rule["alert"])
def test_each_expression_parses_and_selects_only_exposed_metrics(rule: dict[str, Any]) -> None:
    """The PromQL parses, and every metric it selects is one a mesh process registers: a renamed metric
    would otherwise leave its alert silent for ever."""
    expression = promql_parser.parse(rule["expr"])
    selected = set(_metric_names(expression))
    assert selected
    assert selected <= _exposed_series(), f"not exposed by the mesh: {sorted(selected - _exposed_series())}"


def test_an_unknown_metric_is_caught() -> None:
    """The check above can fail: a misspelt metric is not among the exposed series."""
    expression = promql_parser.parse("max(mesh_queue_oldest_queued_age) > 300")
    assert set(_metric_names(expression)) - _exposed_series() == {"mesh_queue_oldest_queued_age"}


def test_the_dashboard_is_laid_out_and_every_panel_queries_the_chosen_prometheus() -> None:
    """Panel ids are unique, every panel fits Grafana's 24 columns, and every query uses the dashboard's
    Prometheus data source variable (so it imports into any Grafana without editing)."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert _queries()


@pytest.mark.parametrize(("panel", "expr"), _queries(), ids=[title for title, _ in _queries()])
def test_each_dashboard_query_parses_and_selects_only_exposed_metrics(panel: str, expr: str) -> None:
    """As for the alerts: each panel's PromQL parses and selects only series the mesh registers."""
    selected = set(_metric_names(promql_parser.parse(expr)))
    assert selected, panel
    assert selected <= _exposed_series(), f"{panel}: not exposed: {sorted(selected - _exposed_series())}"


def _promtool() -> str:
    found = str(PROMTOOL) if PROMTOOL.exists() else shutil.which("promtool")
    require(found is not None, "promtool (make test unpacks it from Debian's prometheus package)")
    assert found is not None
    return found


def _run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_prometheus_loads_the_rule_file() -> None:
    """promtool checks alerts.yaml as Prometheus loads it: syntax, templates in annotations, durations."""
    checked = _run_promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in checked.stdout


def test_each_alert_fires_when_it_should_and_only_then() -> None:
    """promtool's unit tests (alerts.test.yaml) replay series into every alert: each fires, with its labels and
    filled-in annotations, once its ``for`` runs out, and stays quiet for blips and for the callers' errors."""
    tested = {
        case["alertname"]
        for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == {rule["alert"] for rule in _rules()}, "every alert needs a case in which it fires"
    result = _run_promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_threshold_fails_the_alert_tests(tmp_path: Path) -> None:
    """The unit tests can fail: with MeshJobsWaiting's 5 minutes made 10, its firing case does not fire."""
    rules = RULES.read_text()
    assert "mesh_queue_oldest_queued_age_seconds) > 300" in rules
    (tmp_path / "alerts.yaml").write_text(rules.replace("age_seconds) > 300", "age_seconds) > 600"))
    (tmp_path / "alerts.test.yaml").write_text(RULE_TESTS.read_text())
    result = _run_promtool("test", "rules", tmp_path / "alerts.test.yaml")
    assert result.returncode != 0
    assert "MeshJobsWaiting" in result.stdout + result.stderr
