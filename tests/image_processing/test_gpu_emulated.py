"""The GPU backend's host code on emulated kernels (``fake_cupy``): launches, tables, fusion and errors.

Runs everywhere. The emulated kernels follow the CUDA source, so agreement with the CPU backend within each
filter's tolerance pins the GPU algorithms and the way the backend drives them; the CUDA code itself is
checked against the CPU on real hardware by ``test_gpu.py``.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from mesh.common.v1 import image_pb2, params_pb2
from mesh.image.v1 import image_processing_service_pb2 as pb
from mesh.kit import errors
from mesh.kit.wire import Spliced, serialize_reply
from mesh.services.image_processing import backend as backend_module
from mesh.services.image_processing import codec
from mesh.services.image_processing.backend import run_pipeline
from mesh.services.image_processing.cpu_backend import CpuBackend
from mesh.services.image_processing.processor import Processor
from mesh.services.image_processing.registry import Device, validate_pipeline
from mesh.services.image_processing.servicer import RAW_INPUT, ImageProcessingServicer
from tests.image_processing import fake_cupy
from tests.image_processing.fakes import CallContext
from tests.image_processing.gpu_cases import CASES, within
from tests.image_processing.images import noise, smooth

GPU_MODULE = "mesh.services.image_processing.gpu_backend"
FAKE_MODULES = ("cupy", "cupyx", "cupyx.scipy", "cupyx.scipy.ndimage")


@pytest.fixture(scope="module")
def emulated() -> Iterator[Any]:
    """The gpu_backend module imported against fake CuPy, removed again afterwards."""
    fakes = fake_cupy.build()
    saved = {name: sys.modules.get(name) for name in (*FAKE_MODULES, GPU_MODULE)}
    sys.modules.update(fakes)
    sys.modules.pop(GPU_MODULE, None)
    try:
        yield importlib.import_module(GPU_MODULE)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        package = sys.modules["mesh.services.image_processing"]
        if hasattr(package, "gpu_backend"):
            delattr(package, "gpu_backend")


@pytest.fixture(scope="module")
def gpu(emulated: Any) -> Any:
    backend = emulated.GpuBackend(memory_limit_bytes=1 << 30)
    backend.warm_up()
    return backend


def test_warm_up_launches_every_kernel(gpu: Any) -> None:
    """Start-up compiles both sample types and runs every kernel at least once."""
    for kernels in gpu.kernels.values():
        unused = [name for name, kernel in kernels.functions.items() if kernel.launches == 0]
        assert not unused


@pytest.mark.parametrize(
    ("dtype", "channels"), [(np.uint8, 3), (np.uint8, 4), (np.uint16, 1), (np.uint16, 3)]
)
@pytest.mark.parametrize(("name", "params"), CASES)
def test_emulated_gpu_matches_cpu(
    gpu: Any, name: str, params: dict[str, Any], dtype: Any, channels: int
) -> None:
    """Every filter through the GPU backend's host code agrees with the CPU within its stated tolerance."""
    if name == "convert_color" and channels == 1:
        pytest.skip("colour conversion needs colour")
    image = smooth(37, 53, channels, dtype) if name == "rotate" else noise(37, 53, channels, dtype, seed=40)
    steps = validate_pipeline([(name, params)])
    expected = run_pipeline(CpuBackend(), image, steps).image
    actual = run_pipeline(gpu, image, steps)
    within(name, expected, actual.image)
    assert len(actual.timings) == 1


def test_point_wise_steps_are_fused_into_one_launch(gpu: Any) -> None:
    """invert -> adjust -> invert is one lookup-table launch, exact, with a share of its time per step."""
    kernel = gpu.kernels[np.dtype(np.uint8)]["lut_apply"]
    before = kernel.launches
    image = noise(20, 30, 4, seed=41)
    steps = validate_pipeline([("invert", {}), ("adjust", {"contrast": 1.4, "gamma": 0.8}), ("invert", {})])
    output = run_pipeline(gpu, image, steps)
    assert kernel.launches == before + 1
    assert np.array_equal(output.image, run_pipeline(CpuBackend(), image, steps).image)
    assert len(output.timings) == 3
    assert output.timings[0][1] == output.timings[2][1]


def test_mixed_pipeline_matches_cpu(gpu: Any) -> None:
    """A pipeline mixing kernels, a host fallback (canny) and fused steps stays within tolerance."""
    image = smooth(60, 80, 3)
    steps = validate_pipeline(
        [
            ("gaussian_blur", {"sigma": 1.0}),
            ("invert", {}),
            ("adjust", {"gamma": 1.2}),
            ("resize", {"scale": 0.5}),
            ("canny", {}),
        ]
    )
    expected = run_pipeline(CpuBackend(), image, steps).image
    actual = run_pipeline(gpu, image, steps).image
    assert actual.shape == expected.shape == (30, 40, 1)
    assert (actual == expected).mean() > 0.95


def test_out_of_memory_is_resource_exhausted(gpu: Any) -> None:
    """An allocation beyond the pool limit is RESOURCE_EXHAUSTED and does not fault the backend."""
    gpu.pool.set_limit(size=1024)
    try:
        with pytest.raises(errors.ResourceExhausted):
            gpu.start(noise(64, 64, 3))
    finally:
        gpu.pool.set_limit(size=1 << 30)
    assert gpu.faulted is None


def test_cuda_fault_makes_health_fail(gpu: Any, emulated: Any) -> None:
    """Any other CUDA error marks the backend faulted: check() raises and new work is UNAVAILABLE."""
    try:
        with pytest.raises(errors.Unavailable), gpu.guard():
            raise fake_cupy.CUDARuntimeError("an illegal memory access was encountered")
        with pytest.raises(RuntimeError, match="faulted"):
            gpu.check()
        with pytest.raises(errors.Unavailable):
            gpu.start(noise(4, 4, 1))
    finally:
        gpu.faulted = None
    assert "Emulated GPU" in gpu.check()


def test_auto_selects_the_gpu_when_cupy_sees_one(emulated: Any) -> None:
    """MESH_DEVICE=auto picks the GPU backend when CuPy imports and reports a device."""
    chosen = backend_module.select_backend("auto")
    assert chosen.device is Device.GPU
    assert backend_module.select_backend("cpu").device is Device.CPU


def test_a_gpu_backend_that_does_not_import_is_the_cpu_for_auto_and_a_start_error_for_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CuPy sees a device but the GPU backend cannot load (no cupyx): MESH_DEVICE=auto runs on the CPU, and
    MESH_DEVICE=gpu stops the start naming why, rather than an ImportError's traceback."""
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy.build()["cupy"])
    for name in FAKE_MODULES[1:]:  # cupyx and below
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, GPU_MODULE, raising=False)
    assert backend_module.select_backend("auto").device is Device.CPU
    with pytest.raises(errors.StartupError, match=r"^MESH_DEVICE=gpu but the GPU backend does not import: "):
        backend_module.select_backend("gpu")


def test_grey_binary_threshold_fuses_with_its_neighbours(gpu: Any) -> None:
    """grayscale -> adjust -> threshold(binary) -> invert: one grey kernel and one fused table, exact."""
    tables = gpu.kernels[np.dtype(np.uint16)]["lut_apply"]
    grey = gpu.kernels[np.dtype(np.uint16)]["grayscale"]
    before = (tables.launches, grey.launches)
    image = noise(30, 40, 3, np.uint16, seed=42)
    steps = validate_pipeline(
        [("grayscale", {}), ("adjust", {"gamma": 1.5}), ("threshold", {"value": 30000.0}), ("invert", {})]
    )
    output = run_pipeline(gpu, image, steps)
    assert (tables.launches, grey.launches) == (before[0] + 1, before[1] + 1)
    assert np.array_equal(output.image, run_pipeline(CpuBackend(), image, steps).image)


def test_a_set_cancel_flag_stops_the_gpu_pipeline_before_its_next_step(gpu: Any) -> None:
    """The GPU session checks the shared cancel flag before each step group, as the CPU's does before each
    step: a pipeline whose caller went away queues no more kernels (CANCELLED)."""
    kernel = gpu.kernels[np.dtype(np.uint8)]["lut_apply"]
    before = kernel.launches
    cancel = threading.Event()
    cancel.set()
    steps = validate_pipeline([("invert", {}), ("flip", {}), ("invert", {})])
    with pytest.raises(errors.Cancelled, match=r"stopped before invert \(0\)"):
        run_pipeline(gpu, noise(20, 30, 3), steps, cancel)
    assert kernel.launches == before
    assert np.array_equal(
        run_pipeline(gpu, noise(20, 30, 3), steps, threading.Event()).image,
        run_pipeline(CpuBackend(), noise(20, 30, 3), steps).image,
    )


def test_large_upload_goes_through_chunked_staging_intact(gpu: Any) -> None:
    """An image over the chunking size (1 MB) arrives on the device byte for byte, whatever its chunk edges,
    and the pipeline over it equals the CPU's."""
    image = noise(601, 907, 3, seed=5)  # 1.6 MB: four chunks, none aligned to a pixel or a row
    steps = validate_pipeline([("invert", {})])
    session = gpu.start(image)
    assert np.array_equal(np.asarray(session.image), image)
    assert np.array_equal(
        run_pipeline(gpu, image, steps).image, run_pipeline(CpuBackend(), image, steps).image
    )


async def test_raw_replies_on_the_gpu_backend_are_its_own_results_and_outlive_the_next_call(gpu: Any) -> None:
    """Through the servicer's zero-copy path on the (emulated) GPU backend: a RAW reply carries the pipeline's
    result (equal to the CPU backend's) as a view of the result's memory, and that memory is the reply's own:
    a second call run before the first reply is serialised leaves it as it was. Pins what the raw-pixel change
    assumed of the GPU path (a fresh host array per result, not a reused staging buffer)."""
    limits = codec.Limits(max_pixels=1_000_000, max_bytes=8 * 1024 * 1024)
    on_gpu = ImageProcessingServicer(Processor(gpu, store=None, limits=limits))
    on_cpu = ImageProcessingServicer(Processor(CpuBackend(), store=None, limits=limits))

    def request(image: np.ndarray) -> bytes:
        height, width, channels = image.shape
        return pb.ProcessImageRequest(
            input=image_pb2.ImageInput(
                raw=image_pb2.RawImage(pixels=image.tobytes(), width=width, height=height, channels=channels)
            ),
            pipeline=[params_pb2.PipelineStep(filter="invert")],
            output=pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_RAW),
        ).SerializeToString()

    first, second = noise(40, 30, 3), smooth(40, 30, 3)
    reply = await on_gpu.ProcessImage(RAW_INPUT.parse(request(first)), CallContext())  # type: ignore[arg-type]
    assert isinstance(reply, Spliced)
    await on_gpu.ProcessImage(RAW_INPUT.parse(request(second)), CallContext())  # type: ignore[arg-type]
    expected = await on_cpu.ProcessImage(RAW_INPUT.parse(request(first)), CallContext())  # type: ignore[arg-type]
    assert isinstance(expected, Spliced)
    gpu_pixels = pb.ProcessImageResponse.FromString(serialize_reply(reply)).raw.pixels
    assert gpu_pixels == pb.ProcessImageResponse.FromString(serialize_reply(expected)).raw.pixels
    assert gpu_pixels == (255 - first).tobytes()
