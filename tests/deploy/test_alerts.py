"""``deploy/prometheus/alerts.yaml``: rules Prometheus would load, on metrics the mesh exposes."""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

import mesh.kit
import mesh.services

from .conftest import REPO

RULES = REPO / "deploy" / "prometheus" / "alerts.yaml"
DURATION = re.compile(r"^\d+[smhd]$")
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
}


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _exposed_series() -> set[str]:
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
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in SAMPLE_SUFFIXES.get(family.type, ("",))
    }


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
