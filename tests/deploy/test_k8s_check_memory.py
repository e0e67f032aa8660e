"""``make k8s-check``: a container's memory limit holds what its service's own memory bound lets the process
hold, so that under load the bound sheds requests before the kernel kills the pod."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from mesh.tools.k8s_check import check_directory, dockerfile
from mesh.tools.k8s_check.memory import (
    CHECKOUT_MODELS,
    IMAGE_MODEL_DIR,
    IMAGE_WORKDIR,
    check_inference_memory,
    check_memory_limits,
    memory_bytes,
)
from mesh.tools.k8s_check.policy import Overlay
from mesh.tools.k8s_check.render import Manifest, render

from .conftest import K8S, REPO

MODELS = CHECKOUT_MODELS

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
    1 GiB image budget (3.2 GiB with its headroom), the file service's 1536 MiB its four decodes, eight uploads
    received and 32 waiting (1.4 GiB)."""
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
    """Eight concurrent decodes of 50-megapixel uploads (200 MiB each) beside eight uploads received at once
    (twice 25 MiB each) and 256 waiting (256 KiB each) need 2.3 GiB, more than the file service's 1536 MiB; more
    uploads received at once, more waiting and larger uploads count too, and a setting from a Secret is not known,
    so not checked."""
    container = _container(dev, "file")
    _set_env(container, "MESH_MAX_CONCURRENT_DECODES", "8")
    assert _limits(dev) == [
        "Deployment/file container file: memory limit 1.5 GiB is below the 2.3 GiB that MESH_MAX_CONCURRENT_DECODES "
        "8 (env) lets the process hold (200.3 MiB a decode: the image of MESH_MAX_IMAGE_PIXELS 50000000 (the "
        "default) at 4 bytes a pixel and its thumbnail (~10 MB)), with 400.0 MiB for the uploads received at once "
        "(MESH_MAX_CONCURRENT_UPLOADS 8 (the default), MESH_MAX_UPLOAD_BYTES 26214400 (the default), twice each), "
        "64.0 MiB for those waiting (MESH_MAX_WAITING_UPLOADS 256 (the default), 256.0 KiB each), "
        "one gRPC message of MESH_MAX_MESSAGE_BYTES 100663296 (the default) and 150.0 MiB for the process itself: "
        "the kernel kills the pod before the bound sheds load; raise the limit to at least 2313Mi or lower "
        "MESH_MAX_CONCURRENT_DECODES to 4"
    ]
    _set_env(container, "MESH_MAX_CONCURRENT_DECODES", "4")
    assert _limits(dev) == []
    _set_env(container, "MESH_MAX_CONCURRENT_UPLOADS", "16")
    assert len(_limits(dev)) == 1, "sixteen uploads received at once no longer fit"
    _set_env(container, "MESH_MAX_CONCURRENT_UPLOADS", "8")
    _set_env(container, "MESH_MAX_WAITING_UPLOADS", "1000")
    assert len(_limits(dev)) == 1, "a thousand uploads waiting (250 MiB) no longer fit"
    _set_env(container, "MESH_MAX_WAITING_UPLOADS", "256")
    _set_env(container, "MESH_MAX_UPLOAD_BYTES", str(100 * 2**20))
    assert len(_limits(dev)) == 1, "eight uploads of 100 MiB received at once no longer fit"
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


INFERENCE_VERSION_TERMS = (
    "model strip-reader version {version} with max_image_memory_mb 256: 8 times it (2.0 GiB: 7.5 for the images "
    "in progress (the decoder's buffers, the pixels, a batch's copy shared with a worker) and 0.5 for the inputs "
    "of the requests waiting for it) and {workers} worker processes (instance_count auto: one per CPU of the "
    "limit {cpus}, at most 8) of {each} each (160.0 MiB for the process and its copy of the model, 1.75 times its "
    "largest image of 152.6 MiB (MESH_MAX_IMAGE_PIXELS 40000000 (the default) at 4 bytes a pixel) in the reader's "
    "copies, 21.1 MiB for its crop, 128.0 MiB of the buffer it shares with the server, kept between batches"
)
INFERENCE_FIXED_TERMS = (
    "with one gRPC message of MESH_MAX_MESSAGE_BYTES 100663296 (the default) and 150.0 MiB for the process "
    "itself: the kernel kills the pod before the budgets shed load"
)


def _inference_limits(objects: list[Manifest], models: Path = MODELS, *, gpu: bool = False) -> list[str]:
    return [str(v) for v in check_inference_memory(Overlay("test", objects, gpu=gpu), models)]


def _models_copy(tmp_path: Path) -> Path:
    """A writable copy of the models/ the inference images ship."""
    target = tmp_path / "models"
    shutil.copytree(MODELS, target)
    return target


@pytest.mark.parametrize("overlay", ["dev", "prod-gpu"])
def test_committed_inference_limits_hold_the_shipped_models(overlay: str) -> None:
    """The inference pods' limits hold the strip reader's 256 MiB budget 8 times (2.0 GiB) with its workers:
    dev's 3.5 GiB holds 2 (one per CPU of its limit, 576 MiB each; 3447 MiB in all), prod-gpu's 8 GiB holds 8
    (with their pinned buffers, 640 MiB each; 7415 MiB in all)."""
    assert _inference_limits(render(K8S / "overlays" / overlay), gpu=overlay == "prod-gpu") == []


def test_inference_limit_below_its_models_is_caught(k8s_copy: Path) -> None:
    """A 2 GiB limit for inference is below the 3.4 GiB that the shipped strip reader (version 1, 256 MiB of
    decoded images, two worker processes at the 2-CPU limit) lets the process hold: the message names the
    version, its max_image_memory_mb, the factor, each worker's share and the least limit."""
    path = k8s_copy / "base" / "inference.yaml"
    text = path.read_text()
    assert text.count("memory: 3584Mi") == 1
    path.write_text(text.replace("memory: 3584Mi", "memory: 2Gi"))
    messages = [str(v) for v in check_directory(k8s_copy / "overlays" / "dev", kubernetes_version=VERSION)]
    assert messages == [
        "Deployment/inference container inference: memory limit 2.0 GiB is below the 3.4 GiB that its models let "
        f"the process hold: {INFERENCE_VERSION_TERMS.format(version=1, workers=2, cpus=2, each='576.1 MiB')}); "
        f"{INFERENCE_FIXED_TERMS}; raise the limit to at least 3447Mi or lower max_image_memory_mb"
    ]


def test_each_model_version_counts_on_its_own(tmp_path: Path, dev: list[Manifest]) -> None:
    """A second version of the strip reader brings its own budget and its own workers: 2 x (2.0 GiB + 2 x 576
    MiB) and the fixed 246 MiB need 6647 MiB, beyond dev's 3.5 GiB; the message names both versions."""
    models = _models_copy(tmp_path)
    shutil.copytree(models / "strip-reader" / "1", models / "strip-reader" / "2")
    (message,) = _inference_limits(dev, models)
    for version in (1, 2):
        assert INFERENCE_VERSION_TERMS.format(version=version, workers=2, cpus=2, each="576.1 MiB") in message
    assert message.endswith("raise the limit to at least 6647Mi or lower max_image_memory_mb")


def test_a_larger_budget_in_a_models_config_is_caught(tmp_path: Path, dev: list[Manifest]) -> None:
    """max_image_memory_mb 512 in the strip reader's config needs 4 GiB for the budget alone, beyond dev's
    limit; its workers' largest image stays the decoder's largest (40 M pixels RGBA), not the budget."""
    models = _models_copy(tmp_path)
    config = models / "strip-reader" / "1" / "config.yaml"
    text = config.read_text()
    assert text.count("max_image_memory_mb: 256") == 1
    config.write_text(text.replace("max_image_memory_mb: 256", "max_image_memory_mb: 512"))
    (message,) = _inference_limits(dev, models)
    assert "model strip-reader version 1 with max_image_memory_mb 512: 8 times it (4.0 GiB" in message
    assert "largest image of 152.6 MiB (MESH_MAX_IMAGE_PIXELS 40000000 (the default)" in message
    config.write_text(text.replace("max_image_memory_mb: 256", "max_image_memory_mb: 64"))
    assert _inference_limits(dev, models) == [], "a smaller budget needs less"


def test_auto_instances_follow_the_cpu_limit(dev: list[Manifest]) -> None:
    """``instance_count: auto`` starts a worker per CPU of the limit (rounded up, as the cgroup quota is), each
    with its own copy of its memory: 4 CPUs need 4 workers (4599 MiB), beyond dev's 3.5 GiB; 1500m is 2, as
    committed; without a CPU limit the count is the most auto takes, 8."""
    limits = _container(dev, "inference")["resources"]["limits"]
    limits["cpu"] = "4"
    (message,) = _inference_limits(dev)
    assert INFERENCE_VERSION_TERMS.format(version=1, workers=4, cpus=4, each="576.1 MiB") in message
    assert message.endswith("raise the limit to at least 4599Mi or lower max_image_memory_mb")
    limits["cpu"] = "1500m"
    assert _inference_limits(dev) == []
    del limits["cpu"]
    (message,) = _inference_limits(dev)
    assert "8 worker processes (instance_count auto, no CPU limit: at most 8)" in message


def test_gpu_workers_count_their_pinned_buffers(prod_gpu: list[Manifest]) -> None:
    """On a GPU each of prod-gpu's 8 workers also pins a 64 MiB staging buffer for uploads: 7415 MiB in all,
    beyond a 6 GiB limit."""
    _container(prod_gpu, "inference")["resources"]["limits"]["memory"] = "6Gi"
    (message,) = _inference_limits(prod_gpu, gpu=True)
    assert (
        "8 worker processes (instance_count auto: one per CPU of the limit 8, at most 8) of 640.1 MiB"
        in message
    )
    assert "64.0 MiB of pinned memory for uploads to the GPU" in message
    assert message.endswith("raise the limit to at least 7415Mi or lower max_image_memory_mb")


@pytest.mark.parametrize(
    ("model_dir", "checked"), [("/app/models", True), ("models", True), ("/models", False)]
)
def test_only_the_models_the_image_ships_are_checked(
    dev: list[Manifest], model_dir: str, checked: bool
) -> None:
    """MESH_MODEL_DIR at the image's /app/models (or ``models``, from its WORKDIR /app) loads the models/ the
    image ships, which the check reads; a directory elsewhere (a volume) holds models the checkout does not
    show, so that container is not checked."""
    container = _container(dev, "inference")
    container["resources"]["limits"]["memory"] = "1Gi"
    _set_env(container, "MESH_MODEL_DIR", model_dir)
    assert len(_inference_limits(dev)) == (1 if checked else 0)


def test_the_inference_images_ship_the_checked_models_where_the_check_expects_them() -> None:
    """The Dockerfile's inference targets copy the checkout's models/ to IMAGE_MODEL_DIR, work in
    IMAGE_WORKDIR and point MESH_MODEL_DIR there: what check_inference_memory assumes of the images."""
    stages = {s.name: s for s in dockerfile.parse((REPO / "deploy" / "docker" / "Dockerfile").read_text())}
    for target in ("inference", "inference-cuda"):
        instructions = []
        stage = stages.get(target)
        while stage is not None:
            instructions += stage.instructions
            stage = stages.get(stage.base)
        copies = [v.split()[-2:] for k, v in instructions if k == "COPY" and "models/" in v]
        assert copies == [["models/", f"{IMAGE_MODEL_DIR}/"]], target
        assert ("WORKDIR", str(IMAGE_WORKDIR)) in instructions, target
        assert any(k == "ENV" and f"MESH_MODEL_DIR={IMAGE_MODEL_DIR}" in v.split() for k, v in instructions)
    assert MODELS == REPO / "models"
