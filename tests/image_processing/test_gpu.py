"""GPU (CuPy) backend against the CPU backend, filter by filter, within each filter's stated tolerance.

Skipped cleanly where CuPy or a CUDA device is missing (this machine and CI have none).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from mesh.kit import errors
from mesh.services.image_processing.backend import run_pipeline
from mesh.services.image_processing.cpu_backend import CpuBackend
from mesh.services.image_processing.registry import FILTERS, validate_pipeline
from tests.image_processing.gpu_cases import CASES, within
from tests.image_processing.images import LAYOUTS, noise, smooth

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
try:
    _DEVICES = int(cupy.cuda.runtime.getDeviceCount())
except Exception:
    _DEVICES = 0
if _DEVICES < 1:
    pytest.skip("no CUDA device", allow_module_level=True)

from mesh.services.image_processing.gpu_backend import GpuBackend  # noqa: E402


@pytest.fixture(scope="module")
def gpu() -> Iterator[GpuBackend]:
    backend = GpuBackend(memory_limit_bytes=2 * 1024**3)
    backend.warm_up()
    yield backend
    backend.pool.set_limit(size=0)


def test_every_gpu_filter_is_covered() -> None:
    """The case list reaches every filter of the catalogue."""
    assert {name for name, _ in CASES} == set(FILTERS)


@pytest.mark.parametrize(("dtype", "channels"), LAYOUTS)
@pytest.mark.parametrize(("name", "params"), CASES)
def test_gpu_matches_cpu(
    gpu: GpuBackend, name: str, params: dict[str, Any], dtype: Any, channels: int
) -> None:
    """Each filter on the GPU equals the CPU result within the tolerance its catalogue entry states."""
    if name == "convert_color" and channels == 1:
        pytest.skip("colour conversion needs colour")
    image = smooth(67, 93, channels, dtype) if name == "rotate" else noise(67, 93, channels, dtype, seed=21)
    steps = validate_pipeline([(name, params)])
    expected = run_pipeline(CpuBackend(), image, steps).image
    actual = run_pipeline(gpu, image, steps).image
    within(name, expected, actual)


def test_fused_point_wise_pipeline_is_exact(gpu: GpuBackend) -> None:
    """invert -> adjust -> invert runs as one fused kernel and equals the CPU exactly, with a timing per step."""
    image = noise(120, 160, 4, seed=22)
    steps = validate_pipeline([("invert", {}), ("adjust", {"contrast": 1.4, "gamma": 0.8}), ("invert", {})])
    expected = run_pipeline(CpuBackend(), image, steps)
    actual = run_pipeline(gpu, image, steps)
    assert np.array_equal(expected.image, actual.image)
    assert len(actual.timings) == 3


def test_mixed_pipeline_stays_close(gpu: GpuBackend) -> None:
    """grayscale -> gaussian -> otsu threshold on a 1080p frame agrees with the CPU on almost every pixel."""
    image = smooth(1080, 1920, 3)
    steps = validate_pipeline(
        [("grayscale", {}), ("gaussian_blur", {"sigma": 3.0}), ("threshold", {"method": "otsu"})]
    )
    expected = run_pipeline(CpuBackend(), image, steps).image
    actual = run_pipeline(gpu, image, steps).image
    assert (expected == actual).mean() > 0.999


def test_out_of_memory_is_resource_exhausted(gpu: GpuBackend) -> None:
    """A pool limit below the image's size gives RESOURCE_EXHAUSTED, and the backend stays usable."""
    gpu.pool.free_all_blocks()
    gpu.pool.set_limit(size=1024 * 1024)
    try:
        with pytest.raises(errors.ResourceExhausted):
            session = gpu.start(noise(2048, 2048, 3))
            session.run(validate_pipeline([("gaussian_blur", {"sigma": 2.0})]))
    finally:
        gpu.pool.set_limit(size=2 * 1024**3)
    assert gpu.faulted is None
    assert "bytes free" in gpu.check()


def test_cuda_fault_marks_backend_unhealthy(gpu: GpuBackend) -> None:
    """A CUDA error other than out-of-memory makes check() fail (health NOT_SERVING) and requests UNAVAILABLE."""
    try:
        with pytest.raises(errors.Unavailable), gpu.guard():
            raise cupy.cuda.runtime.CUDARuntimeError(700)
        with pytest.raises(RuntimeError, match="faulted"):
            gpu.check()
        with pytest.raises(errors.Unavailable):
            gpu.start(noise(4, 4, 1))
    finally:
        gpu.faulted = None


@pytest.mark.parametrize("radius", range(1, 15))
@pytest.mark.parametrize(("dtype", "channels"), LAYOUTS)
def test_every_separable_radius_matches_cpu(gpu: GpuBackend, radius: int, dtype: Any, channels: int) -> None:
    """Gaussian blurs of every radius (register-blocked kernels 1-12, conv_fused beyond) on odd-sized images
    that leave partial tiles at the right and bottom edges agree with the CPU within the stated tolerance."""
    image = noise(75, 101, channels, dtype, seed=radius)
    steps = validate_pipeline([("gaussian_blur", {"sigma": radius / 2.5, "ksize": 2 * radius + 1})])
    within(
        "gaussian_blur", run_pipeline(CpuBackend(), image, steps).image, run_pipeline(gpu, image, steps).image
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("pixels", [1, 15, 17, 4099])
def test_point_wise_and_histogram_tails(gpu: GpuBackend, dtype: Any, pixels: int) -> None:
    """Sizes that are no multiple of the 16-byte vector: invert, grayscale and Otsu equal the CPU exactly."""
    for channels in (1, 3, 4):
        image = noise(1, pixels, channels, dtype, seed=pixels)
        pipelines: list[list[tuple[str, dict[str, float | str | bool]]]] = [
            [("invert", {})],
            [("grayscale", {})],
            [("threshold", {"method": "otsu"})],
            [("adjust", {"contrast": 1.3, "gamma": 0.7}), ("threshold", {"method": "otsu", "invert": True})],
        ]
        for pipeline in pipelines:
            steps = validate_pipeline(pipeline)
            expected = run_pipeline(CpuBackend(), image, steps).image
            assert np.array_equal(expected, run_pipeline(gpu, image, steps).image), (pipeline, channels)


def test_device_otsu_equals_host_otsu_on_hard_histograms(gpu: GpuBackend) -> None:
    """The threshold computed on the device equals filter_math.otsu_threshold for flat, two-valued and
    single-valued images (the tie-break and the empty-class cases)."""
    for values in ([7], [0, 255], [10, 10, 200], list(range(256))):
        image = np.resize(np.array(values, dtype=np.uint8), (64, 64, 1))
        steps = validate_pipeline([("threshold", {"method": "otsu"})])
        expected = run_pipeline(CpuBackend(), image, steps).image
        assert np.array_equal(expected, run_pipeline(gpu, image, steps).image), values
