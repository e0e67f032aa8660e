"""The list of checks run on every rendered overlay."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from mesh.tools.k8s_check.memory import check_inference_memory, check_memory_limits
from mesh.tools.k8s_check.network import check_network_calls
from mesh.tools.k8s_check.policy import (
    Overlay,
    Violation,
    check_autoscaling,
    check_blob_store,
    check_exposure,
    check_identity,
    check_images,
    check_inventory,
    check_job_queues,
    check_lifecycle,
    check_ports,
    check_probes,
    check_resources,
    check_security,
    check_service_addresses,
    check_settings_variables,
)

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
    check_settings_variables,
    check_ports,
    check_service_addresses,
    check_blob_store,
    check_network_calls,
    check_memory_limits,
    check_inference_memory,
)


def check_overlay(overlay: Overlay) -> list[Violation]:
    """Every policy violation in one rendered overlay."""
    return [violation for check in CHECKS for violation in check(overlay)]
