"""Memory checks: each container's limit holds what its service's own bounds let the process hold."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mesh.kit.settings import CommonSettings, variable_names
from mesh.kit.units import binary_size
from mesh.services.file import settings as file_settings
from mesh.services.image_processing import settings as image_settings
from mesh.tools.k8s_check.policy import Overlay, Violation, effective_env, pod_spec, ref, settings_class
from mesh.tools.k8s_check.render import Manifest
from mesh.tools.k8s_check.settings_env import default_int

PROCESS_BASELINE_BYTES = 150 * 2**20
"""What a service process holds before any request (interpreter, libraries, gRPC, models aside): about 150 MB,
as the file and image processing settings state."""
THUMBNAIL_BYTES = 10 * 10**6
"""What making an upload's thumbnail adds to its decoded image (FileSettings.max_concurrent_decodes)."""
DECODED_BYTES_PER_PIXEL = 4
"""An upload is decoded to 8-bit RGBA (FileSettings.max_concurrent_decodes)."""
IMAGE_BUDGET_PEAK = 2.5
"""The image processing service peaks at about 2.5 times its budget: a step's input and output, the codec's
copies (ImageSettings.image_memory_budget_bytes)."""
IMAGE_BUDGET_CARRIED = 0.5
"""The inputs of the requests waiting for the budget, held outside it: at most half of it, beyond which more
are shed (``max_carried`` in mesh.services.image_processing.admission)."""
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
    if decodes is None or pixels is None or upload is None:
        return None
    per_decode = pixels.value * DECODED_BYTES_PER_PIXEL + THUMBNAIL_BYTES + upload.value
    why = (
        f"{binary_size(per_decode)} a decode: the image of {pixels} at {DECODED_BYTES_PER_PIXEL} bytes a pixel, "
        f"its thumbnail (~{THUMBNAIL_BYTES // 10**6} MB) and its upload ({upload})"
    )
    return MemoryBound(decodes, per_decode, why)


MEMORY_BOUNDS: dict[str, Callable[[Overlay, Manifest, type[CommonSettings]], MemoryBound | None]] = {
    image_settings.ImageSettings.__name__: _image_memory,
    file_settings.FileSettings.__name__: _file_memory,
}
"""The services whose settings bound the memory a process holds, by their settings class."""


def check_memory_limits(overlay: Overlay) -> Iterator[Violation]:
    """A container's memory limit holds what its service's own bound lets the process hold: the image
    processing service's ``MESH_IMAGE_MEMORY_BUDGET_BYTES`` (3 times it: see IMAGE_BUDGET_PEAK and
    IMAGE_BUDGET_CARRIED), the file service's ``MESH_MAX_CONCURRENT_DECODES`` decodes, plus one gRPC message of
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
            fixed = message.value + PROCESS_BASELINE_BYTES
            needed = bound.setting.value * bound.per_unit + fixed
            if limit >= needed:
                continue
            most = int((limit - fixed) // bound.per_unit)
            lower = f" or lower {bound.setting.variable} to {most}" if most >= 1 else ""
            yield Violation(
                f"{ref(deployment)} container {container.get('name')}",
                f"memory limit {binary_size(int(limit))} is below the {binary_size(int(needed))} that "
                f"{bound.setting} lets the process hold ({bound.why}), with one gRPC message of {message} and "
                f"{binary_size(PROCESS_BASELINE_BYTES)} for the process itself: the kernel kills the pod before "
                f"the bound sheds load; raise the limit to at least {-(-int(needed) // 2**20)}Mi{lower}",
            )
