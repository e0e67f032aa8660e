"""Memory checks: each container's limit holds what its service's own bounds let the process hold."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mesh.kit.pinned import MAX_BYTES as PINNED_MAX_BYTES
from mesh.kit.settings import CommonSettings, variable_names
from mesh.kit.units import binary_size
from mesh.services.file import settings as file_settings
from mesh.services.image_processing import settings as image_settings
from mesh.services.inference.models import default_factories
from mesh.services.inference.repository import AUTO_INSTANCES, ModelConfigError, ModelVersion, scan
from mesh.services.inference.settings import InferenceSettings
from mesh.services.inference.strip.config import ReaderConfig
from mesh.services.inference.workers import KEEP_BYTES
from mesh.tools.k8s_check.policy import Overlay, Violation, effective_env, pod_spec, ref, settings_class
from mesh.tools.k8s_check.render import Manifest
from mesh.tools.k8s_check.settings_env import default_int

PROCESS_BASELINE_BYTES = 150 * 2**20
"""What a service process holds before any request (interpreter, libraries, gRPC, models aside): about 150 MB,
as the file and image processing settings state."""
THUMBNAIL_BYTES = 10 * 10**6
"""What making an upload's thumbnail adds to its decoded image (FileSettings.max_concurrent_decodes)."""
UPLOAD_COPIES = 2
"""An upload received holds its bytes, twice while its parts are joined (FileSettings.max_concurrent_uploads)."""
WAITING_UPLOAD_BYTES = 256 * 2**10
"""What an upload waiting, unread, for a slot of those received at once holds in the file service
(FileSettings.max_waiting_uploads): its call and the 64 KiB its client may send ahead (BDP probing is off,
mesh.services.file.server.SERVER_OPTIONS). Measured (2026-12-07, 22.4 MiB PNGs on one connection, VmRSS/VmHWM):
100 waiting behind one stalled upload added 9 MiB; 100 concurrent uploads peaked at 595 MiB against 577 for 8.
With BDP probing on, each held most of its file (48 concurrent: 1504 MiB)."""
DECODED_BYTES_PER_PIXEL = 4
"""An upload is decoded to 8-bit RGBA (FileSettings.max_concurrent_decodes)."""
IMAGE_BUDGET_PEAK = 2.5
"""The image processing service peaks at about 2.5 times its budget: a step's input and output, the codec's
copies (ImageSettings.image_memory_budget_bytes)."""
IMAGE_BUDGET_CARRIED = 0.5
"""The inputs of the requests waiting for the budget, held outside it: at most half of it, beyond which more
are shed (``max_carried`` in mesh.services.image_processing.admission)."""
INFERENCE_BUDGET_PEAK = 7.5
"""What the inference server holds for each byte of a model version's ``max_image_memory_mb``, its instances'
own memory aside (see INSTANCE_IMAGE_PEAK).

Derived: an image holds at most 3.67 times the bytes the budget counts while it decodes (an EXIF-turned RGB PNG:
Pillow's image at 4 bytes a pixel, 1.33 times the 3 counted, its turned copy, and the array) and 2 times while
its batch computes (the array, and its copy in the buffer the server shares with a worker); glibc keeps what
those steps free in the heap (``mesh.kit.memory``) and in each decoding thread's arena, so their peaks add up in
part. Measured on the CPU (256 MiB, 2 workers, the server's growth in PSS, sampled every 3 ms): 48-64 concurrent
12-megapixel photos took it to 2.0 (JPEG), 4.7 (RGBA PNG), 4.8 (RGB PNG), 4.9 (EXIF-turned RGB PNG) and, three
rounds of RGB PNGs, 5.0 times the budget; eight 40-megapixel RGBA PNGs to 2.9. 5.5 leaves a tenth for what the
samples missed. Loads whose image sizes change took it further, to about 10 times after 40- and 12-megapixel
PNGs in turn (5.1 with ``MALLOC_ARENA_MAX=2``): the arenas' fragments, which no budget bounds. With the kit's two
arenas and its trim (2026-12-07, the dev overlay's 2 workers, PSS of the server and its workers summed every
80 ms, rounds of 18 concurrent 9-36 Mpx PNGs, four runs of 10-20 rounds): the server peaked at 1788-1948 MiB
PSS, 7.3 times the budget over its idle 78 MiB, the carried inputs included, while its workers held 308-431 MiB
each (modelled 576): 7.5 and the carried 0.5 leave a tenth over that, so that the server's share holds without
the workers' slack (with one instance there is little of it)."""
INFERENCE_BUDGET_CARRIED = 0.5
"""The inputs of the requests waiting for a version's budget, held outside it: at most half of it, beyond which
more are shed (``max_carried`` in mesh.services.inference.batching.ModelMemory)."""
INSTANCE_IMAGE_PEAK = 1.75
"""What an instance reading an image holds beside it, in times the image: the reader's 8-bit RGB copy
(strip.reader.to_uint8), at most for an RGBA image with transparency, whose premultiplied copy (1) and RGB copy
(0.75) live at once; its downscale (0.19 at most) comes after them. An instance reads one image at a time, but
its process keeps that memory after its largest image (glibc's trim threshold, ``mesh.kit.memory``): measured,
each of 8 CPU workers grew by 288 MiB after a 40-megapixel RGBA PNG (152.6 MiB: 267 MiB at 1.75, 288 with its
crop)."""
INSTANCE_CROP_BYTES = 2 * 3 * 4 * ReaderConfig().crop_length ** 2
"""The strip reader's rectified crop (strip.backend.rectify): float32, three channels, at most ``crop_length``
along and less across (a strip is at least 1.8 times as long as wide, 1.24 times its width with the margins),
twice while it is scaled to 0..1: 21.1 MiB at 960."""
WORKER_PROCESS_BYTES = 160 * 2**20
"""A worker process before its first batch: the interpreter, NumPy, OpenCV and its own copy of the model,
110-160 MB for the strip reader (models/README.md; 107 MB of RSS measured on the CPU)."""
INFERENCE_BYTES_PER_PIXEL = 4
"""The most a decoded pixel takes in the inference service: 8-bit RGBA (mesh.services.inference.images)."""
IMAGE_WORKDIR = PurePosixPath("/app")
"""The inference images' WORKDIR, where a relative MESH_MODEL_DIR starts (deploy/docker/Dockerfile)."""
IMAGE_MODEL_DIR = IMAGE_WORKDIR / "models"
"""Where the inference images hold the checkout's models/: the Dockerfile's inference targets COPY it there and
set MESH_MODEL_DIR to it."""
CHECKOUT_MODELS = Path(__file__).resolve().parents[4] / "models"
"""The models/ directory the inference images are built from (src/mesh/tools/k8s_check/memory.py)."""
GPU_RESOURCE = "nvidia.com/gpu"
"""The limit of a container on a GPU, whose instances each pin a staging buffer (mesh.kit.pinned)."""
QUANTITY_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


@dataclass(frozen=True)
class Setting:
    """An integer setting as a container's process reads it."""

    variable: str
    value: int
    origin: str
    """``env``, ``ConfigMap/name`` or ``the default``."""

    def __str__(self) -> str:
        return f"{self.variable} {self.value} ({self.origin})"


@dataclass(frozen=True)
class MemoryBound:
    """The most memory a process may hold: ``per_unit`` bytes for each unit of the setting that bounds it
    (a budget's byte, a decode), and the fixed headroom besides."""

    setting: Setting
    per_unit: float
    why: str
    """What each unit holds, for messages."""
    besides: float = 0.0
    """Bytes held besides, bounded by other settings."""
    besides_why: str = ""
    """What ``besides`` holds, for messages."""


def memory_bytes(quantity: object) -> float | None:
    """Bytes of a Kubernetes memory quantity (``1536Mi``, ``4Gi``, ``1G``, ``129e6``, ``268435456``); None when
    it is not one (the schema check reports that)."""
    text = str(quantity).strip()
    suffix = next((s for s in sorted(QUANTITY_SUFFIXES, key=len, reverse=True) if text.endswith(s)), "")
    try:
        number = float(text.removesuffix(suffix)) if suffix else float(text)
    except ValueError:
        return None
    return number * QUANTITY_SUFFIXES.get(suffix, 1)


def int_setting(
    overlay: Overlay, container: Manifest, cls: type[CommonSettings], field: str
) -> Setting | None:
    """``field`` of ``cls`` as the container's process reads it: its variable (or a deprecated name) from the
    container's environment, else the default; None when it comes from a Secret or is no integer (the service
    fails to start on that)."""
    env = effective_env(overlay, container)
    names = variable_names(cls, field)
    for variable in names:
        found = env.get(variable)
        if found is None:
            continue
        if found.value is None or not found.value.strip().isdigit():
            return None
        return Setting(variable, int(found.value), found.source)
    default = default_int(cls, field)
    return Setting(names[0], default, "the default") if default is not None else None


def _image_memory(overlay: Overlay, container: Manifest, cls: type[CommonSettings]) -> MemoryBound | None:
    budget = int_setting(overlay, container, cls, "image_memory_budget_bytes")
    if budget is None:
        return None
    why = (
        f"{IMAGE_BUDGET_PEAK:g} times it for the images in progress (a step's input and output, the codec's "
        f"copies) and {IMAGE_BUDGET_CARRIED:g} times it for the inputs of the requests waiting for it"
    )
    return MemoryBound(budget, IMAGE_BUDGET_PEAK + IMAGE_BUDGET_CARRIED, why)


def _file_memory(overlay: Overlay, container: Manifest, cls: type[CommonSettings]) -> MemoryBound | None:
    decodes = int_setting(overlay, container, cls, "max_concurrent_decodes")
    pixels = int_setting(overlay, container, cls, "max_image_pixels")
    upload = int_setting(overlay, container, cls, "max_upload_bytes")
    uploads = int_setting(overlay, container, cls, "max_concurrent_uploads")
    waiting = int_setting(overlay, container, cls, "max_waiting_uploads")
    if decodes is None or pixels is None or upload is None or uploads is None or waiting is None:
        return None
    per_decode = pixels.value * DECODED_BYTES_PER_PIXEL + THUMBNAIL_BYTES
    why = (
        f"{binary_size(per_decode)} a decode: the image of {pixels} at {DECODED_BYTES_PER_PIXEL} bytes a pixel "
        f"and its thumbnail (~{THUMBNAIL_BYTES // 10**6} MB)"
    )
    received = uploads.value * UPLOAD_COPIES * upload.value
    held_waiting = waiting.value * WAITING_UPLOAD_BYTES
    received_why = (
        f"{binary_size(received)} for the uploads received at once ({uploads}, {upload}, twice each), "
        f"{binary_size(held_waiting)} for those waiting ({waiting}, {binary_size(WAITING_UPLOAD_BYTES)} each)"
    )
    return MemoryBound(decodes, per_decode, why, received + held_waiting, received_why)


MEMORY_BOUNDS: dict[str, Callable[[Overlay, Manifest, type[CommonSettings]], MemoryBound | None]] = {
    image_settings.ImageSettings.__name__: _image_memory,
    file_settings.FileSettings.__name__: _file_memory,
}
"""The services whose settings bound the memory a process holds, by their settings class."""


def check_memory_limits(overlay: Overlay) -> Iterator[Violation]:
    """A container's memory limit holds what its service's own bound lets the process hold: the image
    processing service's ``MESH_IMAGE_MEMORY_BUDGET_BYTES`` (3 times it: see IMAGE_BUDGET_PEAK and
    IMAGE_BUDGET_CARRIED), the file service's ``MESH_MAX_CONCURRENT_DECODES`` decodes,
    ``MESH_MAX_CONCURRENT_UPLOADS`` uploads and ``MESH_MAX_WAITING_UPLOADS`` waiting ones, plus one gRPC message of
    ``MESH_MAX_MESSAGE_BYTES`` (gRPC receives each message whole before the service, and its budget, see it)
    and the process itself (PROCESS_BASELINE_BYTES). Settings the manifests do not set count at their defaults.
    Below that, the kernel kills the pod under load before the bound sheds any."""
    for deployment in overlay.of_kind("Deployment"):
        cls = settings_class(deployment)
        bound_of = MEMORY_BOUNDS.get(cls.__name__) if cls is not None else None
        if cls is None or bound_of is None:
            continue
        for container in pod_spec(deployment).get("containers", []):
            limit = memory_bytes(container.get("resources", {}).get("limits", {}).get("memory"))
            bound = bound_of(overlay, container, cls)
            message = int_setting(overlay, container, cls, "max_message_bytes")
            if limit is None or bound is None or message is None:
                continue
            fixed = message.value + PROCESS_BASELINE_BYTES + bound.besides
            needed = bound.setting.value * bound.per_unit + fixed
            if limit >= needed:
                continue
            most = int((limit - fixed) // bound.per_unit)
            lower = f" or lower {bound.setting.variable} to {most}" if most >= 1 else ""
            yield Violation(
                f"{ref(deployment)} container {container.get('name')}",
                f"memory limit {binary_size(int(limit))} is below the {binary_size(int(needed))} that "
                f"{bound.setting} lets the process hold ({bound.why}), with "
                f"{bound.besides_why + ', ' if bound.besides_why else ''}one gRPC message of {message} and "
                f"{binary_size(PROCESS_BASELINE_BYTES)} for the process itself: the kernel kills the pod before "
                f"the bound sheds load; raise the limit to at least {-(-int(needed) // 2**20)}Mi{lower}",
            )


@dataclass(frozen=True)
class VersionMemory:
    """What one model version lets the inference process hold, for messages."""

    bytes: float
    why: str


def cpu_cores(quantity: object) -> float | None:
    """Cores of a Kubernetes CPU quantity (``2``, ``1.5``, ``500m``); None when it is not one."""
    text = str(quantity).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def shipped_models(overlay: Overlay, container: Manifest, checkout_models: Path) -> Path | None:
    """The checkout's directory of the models the container's process loads, when it loads the ones the image
    ships (MESH_MODEL_DIR unset, or the image's directory); None for models from elsewhere (a volume), which the
    checkout does not show."""
    env = effective_env(overlay, container)
    found = next((env[n] for n in variable_names(InferenceSettings, "model_dir") if n in env), None)
    if found is None:
        return checkout_models
    if found.value is None:
        return None
    return checkout_models if IMAGE_WORKDIR / found.value == IMAGE_MODEL_DIR else None


def _instances(version: ModelVersion, container: Manifest) -> tuple[int, str]:
    """How many batches the version computes at once in the container, as ``ModelConfig.instances`` resolves
    ``auto`` there (the cgroup's quota is the pod's CPU limit), and why."""
    count = version.config.instance_count
    if count != "auto":
        return count, f"instance_count {count}"
    limit = container.get("resources", {}).get("limits", {}).get("cpu")
    cores = cpu_cores(limit) if limit is not None else None
    if cores is None:
        return AUTO_INSTANCES, f"instance_count auto, no CPU limit: at most {AUTO_INSTANCES}"
    return (
        min(AUTO_INSTANCES, max(1, math.ceil(cores))),
        f"instance_count auto: one per CPU of the limit {limit}, at most {AUTO_INSTANCES}",
    )


def _version_memory(version: ModelVersion, container: Manifest, pixels: Setting) -> VersionMemory:
    """What ``version`` lets the container's process hold: its budget's share in the server and its instances'
    own memory; its largest image is the budget, or the largest one the decoder takes when that is less."""
    budget = version.config.max_image_memory_mb * 2**20
    largest = min(budget, pixels.value * INFERENCE_BYTES_PER_PIXEL)
    largest_why = (
        "all of max_image_memory_mb"
        if largest == budget
        else f"{pixels} at {INFERENCE_BYTES_PER_PIXEL} bytes a pixel"
    )
    count, why_count = _instances(version, container)
    each = largest * INSTANCE_IMAGE_PEAK + INSTANCE_CROP_BYTES
    parts = [
        f"{INSTANCE_IMAGE_PEAK:g} times its largest image of {binary_size(largest)} ({largest_why}) in the "
        "reader's copies",
        f"{binary_size(INSTANCE_CROP_BYTES)} for its crop",
    ]
    kind = "threads of the server"
    if version.config.instance_kind == "process":
        kept = min(KEEP_BYTES, budget)
        each += WORKER_PROCESS_BYTES + kept
        parts = [
            f"{binary_size(WORKER_PROCESS_BYTES)} for the process and its copy of the model",
            *parts,
            f"{binary_size(kept)} of the buffer it shares with the server, kept between batches",
        ]
        kind = "worker processes"
    if GPU_RESOURCE in container.get("resources", {}).get("limits", {}):
        each += PINNED_MAX_BYTES
        parts.append(f"{binary_size(PINNED_MAX_BYTES)} of pinned memory for uploads to the GPU")
    held = budget * (INFERENCE_BUDGET_PEAK + INFERENCE_BUDGET_CARRIED)
    why = (
        f"model {version.name} version {version.version} with max_image_memory_mb "
        f"{version.config.max_image_memory_mb}: {INFERENCE_BUDGET_PEAK + INFERENCE_BUDGET_CARRIED:g} times it "
        f"({binary_size(int(held))}: {INFERENCE_BUDGET_PEAK:g} for the images in progress (the decoder's buffers, "
        f"the pixels, a batch's copy shared with a worker) and {INFERENCE_BUDGET_CARRIED:g} for the inputs of the "
        f"requests waiting for it) and {count} {kind} ({why_count}) of {binary_size(int(each))} each "
        f"({', '.join(parts)})"
    )
    return VersionMemory(held + count * each, why)


def check_inference_memory(overlay: Overlay, checkout_models: Path = CHECKOUT_MODELS) -> Iterator[Violation]:
    """An inference container's memory limit holds what the models its image ships let the process hold: for
    each version (each budget counts on its own) its ``max_image_memory_mb`` 8 times (INFERENCE_BUDGET_PEAK
    and INFERENCE_BUDGET_CARRIED) and each of its instances' own memory (its worker process, the reader's
    copies of the largest image and its crop), plus one gRPC message of ``MESH_MAX_MESSAGE_BYTES`` and the
    process itself (PROCESS_BASELINE_BYTES). Models from outside the image, and settings from a Secret, are not
    checked."""
    for deployment in overlay.of_kind("Deployment"):
        if settings_class(deployment) is not InferenceSettings:
            continue
        for container in pod_spec(deployment).get("containers", []):
            where = f"{ref(deployment)} container {container.get('name')}"
            limit = memory_bytes(container.get("resources", {}).get("limits", {}).get("memory"))
            message = int_setting(overlay, container, InferenceSettings, "max_message_bytes")
            pixels = int_setting(overlay, container, InferenceSettings, "max_image_pixels")
            models = shipped_models(overlay, container, checkout_models)
            if limit is None or message is None or pixels is None or models is None:
                continue
            try:
                entries = scan(models, default_factories())
            except ModelConfigError as error:
                yield Violation(where, f"the models its image ships cannot be read: {error}")
                continue
            versions = [
                _version_memory(version, container, pixels)
                for entry in entries.values()
                for version in entry.versions.values()
            ]
            needed = message.value + PROCESS_BASELINE_BYTES + sum(v.bytes for v in versions)
            if limit >= needed:
                continue
            yield Violation(
                where,
                f"memory limit {binary_size(int(limit))} is below the {binary_size(int(needed))} that its models "
                f"let the process hold: {'; '.join(v.why for v in versions)}; with one gRPC message of {message} "
                f"and {binary_size(PROCESS_BASELINE_BYTES)} for the process itself: the kernel kills the pod "
                f"before the budgets shed load; raise the limit to at least {-(-int(needed) // 2**20)}Mi or lower "
                "max_image_memory_mb",
            )
