"""``make k8s-check``: a container's memory limit holds what its service's own memory bound lets the process
hold, so that under load the bound sheds requests before the kernel kills the pod."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh.tools.k8s_check import check_directory
from mesh.tools.k8s_check.memory import check_memory_limits, memory_bytes
from mesh.tools.k8s_check.policy import Overlay
from mesh.tools.k8s_check.render import Manifest, render

from .conftest import K8S

VERSION = "1.31.0"
IMAGE_TERMS = (
    "MESH_IMAGE_MEMORY_BUDGET_BYTES 1073741824 (the default) lets the process hold (2.5 times it for the images "
    "in progress (a step's input and output, the codec's copies) and 0.5 times it for the inputs of the requests "
    "waiting for it), with one gRPC message of MESH_MAX_MESSAGE_BYTES 100663296 (the default) and 150.0 MiB for "
    "the process itself: the kernel kills the pod before the bound sheds load; raise the limit to at least 3318Mi"
)


def _limits(objects: list[Manifest], *, gpu: bool = False) -> list[str]:
    return [str(v) for v in check_memory_limits(Overlay("test", objects, gpu=gpu))]


def _container(objects: list[Manifest], name: str) -> Any:
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _set_env(container: Any, name: str, value: str) -> None:
    container["env"] = [e for e in container["env"] if e["name"] != name] + [{"name": name, "value": value}]


@pytest.mark.parametrize("overlay", ["dev", "prod-gpu"])
def test_committed_limits_hold_the_budgets(overlay: str) -> None:
    """The committed limits hold each bound at its default: image-processing's 4 GiB (8 GiB on GPUs) its
    1 GiB image budget (3.2 GiB with its headroom), the file service's 1536 MiB its four decodes (1.1 GiB)."""
    assert _limits(render(K8S / "overlays" / overlay), gpu=overlay == "prod-gpu") == []


def test_image_limit_below_its_budget_is_caught(k8s_copy: Path) -> None:
    """A 3 GiB limit for image-processing is below the 3.2 GiB its default 1 GiB budget lets it hold: the pod
    would be OOM-killed at full load instead of shedding. The message names the limit, the budget, the
    headroom and both fixes."""
    path = k8s_copy / "base" / "image-processing.yaml"
    text = path.read_text()
    assert text.count("memory: 4Gi") == 1
    path.write_text(text.replace("memory: 4Gi", "memory: 3Gi"))
    messages = [str(v) for v in check_directory(k8s_copy / "overlays" / "dev", kubernetes_version=VERSION)]
    assert messages == [
        "Deployment/image-processing container image-processing: memory limit 3.0 GiB is below the 3.2 GiB that "
        f"{IMAGE_TERMS} or lower MESH_IMAGE_MEMORY_BUDGET_BYTES to 987758592"
    ]


def test_budget_raised_by_a_setting_is_checked_against_each_overlays_limit(
    dev: list[Manifest], prod_gpu: list[Manifest]
) -> None:
    """MESH_IMAGE_MEMORY_BUDGET_BYTES at 2 GiB (6.2 GiB with headroom) fits prod-gpu's 8 GiB limit but not
    dev's 4 GiB; set in the shared ConfigMap, it is read there."""
    for objects in (dev, prod_gpu):
        config = next(
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "mesh-config"
        )
        config["data"]["MESH_IMAGE_MEMORY_BUDGET_BYTES"] = str(2 * 2**30)
    assert _limits(prod_gpu, gpu=True) == []
    messages = _limits(dev)
    assert len(messages) == 1
    assert messages[0].startswith(
        "Deployment/image-processing container image-processing: memory limit 4.0 GiB is below the 6.2 GiB that "
        "MESH_IMAGE_MEMORY_BUDGET_BYTES 2147483648 (ConfigMap/mesh-config) lets the process hold"
    )
    assert messages[0].endswith("or lower MESH_IMAGE_MEMORY_BUDGET_BYTES to 1345672533")


def test_file_decodes_beyond_the_limit_are_caught(dev: list[Manifest]) -> None:
    """Eight concurrent decodes of 50-megapixel uploads (225 MiB each) need 2 GiB, more than the file
    service's 1536 MiB; larger uploads count too, and a setting from a Secret is not known, so not checked."""
    container = _container(dev, "file")
    _set_env(container, "MESH_MAX_CONCURRENT_DECODES", "8")
    assert _limits(dev) == [
        "Deployment/file container file: memory limit 1.5 GiB is below the 2.0 GiB that MESH_MAX_CONCURRENT_DECODES "
        "8 (env) lets the process hold (225.3 MiB a decode: the image of MESH_MAX_IMAGE_PIXELS 50000000 (the "
        "default) at 4 bytes a pixel, its thumbnail (~10 MB) and its upload (MESH_MAX_UPLOAD_BYTES 26214400 (the "
        "default))), with one gRPC message of MESH_MAX_MESSAGE_BYTES 100663296 (the default) and 150.0 MiB for the "
        "process itself: the kernel kills the pod before the bound sheds load; raise the limit to at least 2049Mi "
        "or lower MESH_MAX_CONCURRENT_DECODES to 5"
    ]
    _set_env(container, "MESH_MAX_CONCURRENT_DECODES", "5")
    assert _limits(dev) == []
    _set_env(container, "MESH_MAX_UPLOAD_BYTES", str(100 * 2**20))
    assert len(_limits(dev)) == 1, "five decodes of 100 MiB uploads no longer fit"
    container["env"] = [e for e in container["env"] if e["name"] != "MESH_MAX_CONCURRENT_DECODES"] + [
        {
            "name": "MESH_MAX_CONCURRENT_DECODES",
            "valueFrom": {"secretKeyRef": {"name": "mesh-secrets", "key": "decodes"}},
        }
    ]
    assert _limits(dev) == []


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("1536Mi", 1536 * 2**20),
        ("4Gi", 4 * 2**30),
        ("1.5Gi", 1.5 * 2**30),
        ("2G", 2e9),
        ("129e6", 129e6),
        (268435456, 268435456),
        ("128974848", 128974848),
        ("lots", None),
    ],
)
def test_memory_quantities_are_read_as_kubernetes_does(quantity: object, expected: float | None) -> None:
    """Binary and decimal suffixes, exponents and plain byte counts; anything else is no quantity."""
    assert memory_bytes(quantity) == expected
