"""Image processing benchmarks on 1080p and 4K RGB frames, every figure from the same run.

- CPU: each filter's time against OpenCV doing the same operation directly (target: within 2x), and the
  3-step pipeline (grayscale -> gaussian_blur sigma 3 -> otsu threshold) against plain OpenCV calls.
- GPU (only where CuPy sees a device, else ``{"skipped": "no GPU"}``): each filter's kernel time and
  effective bandwidth ((bytes read + bytes written) / time) as a fraction of a device-to-device copy of a
  buffer of the same size measured in this run; the pipeline end to end (host -> device -> steps -> host)
  and its kernels alone against OpenCV on every CPU core.
- ``ProcessImage`` over gRPC with inline raw images against a bare gRPC echo of the same bytes, at 1 MB and
  8 MB, on whichever backend this machine selects (so it runs on the CPU too).
"""

from __future__ import annotations

import asyncio
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import cv2
import grpc
import numpy as np
import numpy.typing as npt

from mesh.common.v1 import image_pb2, params_pb2
from mesh.image.v1 import image_processing_service_pb2 as pb
from mesh.kit.channels import open_channel
from mesh.kit.jpeg_data import check_jpeg_data
from mesh.kit.logging import configure_logging
from mesh.kit.memory import tune_allocator
from mesh.kit.runtime import ServiceRuntime
from mesh.services.image_processing import codec, cpu_filters
from mesh.services.image_processing.backend import Backend, run_pipeline, select_backend
from mesh.services.image_processing.cpu_backend import CpuBackend
from mesh.services.image_processing.processor import Processor
from mesh.services.image_processing.registry import Device, validate_pipeline
from mesh.services.image_processing.servicer import ImageProcessingServicer, add_to_server
from mesh.services.image_processing.settings import SERVICE_NAME, ImageSettings

Array = npt.NDArray[Any]
SIZES = {"1080p": (1080, 1920), "4k": (2160, 3840)}
REPEATS = {"1080p": 7, "4k": 5}
ECHO_SERVICE = "bench.v1.Echo"
PIPELINE: list[tuple[str, dict[str, Any]]] = [
    ("grayscale", {}),
    ("gaussian_blur", {"sigma": 3.0}),
    ("threshold", {"method": "otsu"}),
]


def _frame(height: int, width: int) -> Array:
    """A photo-like RGB frame: gradients, a disc and mild noise."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 0.3 + 0.4 * x / width + 0.2 * y / height
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 4) ** 2).astype(np.float32) * 0.2
    planes = [np.clip(base * (1 - c / 5) + disc, 0, 1) for c in range(3)]
    image = np.stack(planes, axis=2) * 235 + rng.integers(0, 20, (height, width, 3))
    return image.astype(np.uint8)


def _best(work: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` runs after one warm run, in seconds."""
    return _compare(work, None, repeats)[0]


def _compare(
    ours: Callable[[], object], theirs: Callable[[], object] | None, repeats: int
) -> tuple[float, float]:
    """Fastest runs of two alternatives, interleaved so that load on a shared machine hits both alike."""
    best = [float("inf"), float("inf")]
    works = [ours] if theirs is None else [ours, theirs]
    for work in works:
        work()
    for _ in range(repeats):
        for index, work in enumerate(works):
            started = time.perf_counter()
            work()
            best[index] = min(best[index], time.perf_counter() - started)
    return best[0], best[1]


def _grey(image: Array) -> Array:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _equalize_cv(image: Array) -> Array:
    return cv2.merge([cv2.equalizeHist(c) for c in cv2.split(image)])


def _sobel_cv(image: Array) -> Array:
    dx = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3)
    dy = cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3)
    return cv2.convertScaleAbs(cv2.magnitude(dx, dy))


def _unsharp_cv(image: Array) -> Array:
    blurred = cv2.GaussianBlur(image, (7, 7), 1.0)
    return cv2.addWeighted(image, 2.0, blurred, -1.0, 0.0)


def _rotate_cv(image: Array) -> Array:
    h, w = image.shape[:2]
    return cv2.warpAffine(image, cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 30.0, 1.0), (w, h))


# (filter, params, the same operation done directly with OpenCV)
CPU_CASES: list[tuple[str, dict[str, Any], Callable[[Array], object]]] = [
    ("grayscale", {}, _grey),
    ("gaussian_blur", {"sigma": 3.0}, lambda im: cv2.GaussianBlur(im, (19, 19), 3.0)),
    ("box_blur", {"ksize": 5}, lambda im: cv2.blur(im, (5, 5))),
    ("median", {"ksize": 5}, lambda im: cv2.medianBlur(im, 5)),
    ("unsharp_mask", {"sigma": 1.0, "amount": 1.0}, _unsharp_cv),
    ("sobel", {"direction": "magnitude"}, _sobel_cv),
    ("canny", {}, lambda im: cv2.Canny(_grey(im), 50, 150)),
    (
        "threshold",
        {"method": "otsu"},
        lambda im: cv2.threshold(_grey(im), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU),
    ),
    (
        "threshold",
        {"method": "adaptive"},
        lambda im: cv2.adaptiveThreshold(
            _grey(im), 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 11, 2
        ),
    ),
    ("resize", {"scale": 0.5}, lambda im: cv2.resize(im, (im.shape[1] // 2, im.shape[0] // 2))),
    (
        "resize",
        {"scale": 0.5, "interpolation": "area"},
        lambda im: cv2.resize(im, (im.shape[1] // 2, im.shape[0] // 2), interpolation=cv2.INTER_AREA),
    ),
    ("crop", {"x": 100, "y": 100, "width": 800, "height": 600}, lambda im: im[100:700, 100:900].copy()),
    ("rotate", {"angle": 90.0}, lambda im: cv2.rotate(im, cv2.ROTATE_90_COUNTERCLOCKWISE)),
    ("rotate", {"angle": 30.0, "expand": False}, _rotate_cv),
    ("flip", {}, lambda im: cv2.flip(im, 1)),
    ("adjust", {"contrast": 1.2, "gamma": 1.5}, lambda im: cv2.LUT(im, np.arange(256, dtype=np.uint8))),
    ("invert", {}, cv2.bitwise_not),
    ("equalize", {}, _equalize_cv),
    (
        "equalize",
        {"method": "clahe"},
        lambda im: cv2.merge([cv2.createCLAHE(2.0, (8, 8)).apply(c) for c in cv2.split(im)]),
    ),
    ("convert_color", {}, lambda im: cv2.cvtColor(im, cv2.COLOR_RGB2HSV_FULL)),
]


def _label(name: str, params: dict[str, Any]) -> str:
    detail = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{name}({detail})" if detail else name


def _opencv_pipeline(image: Array) -> Array:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    blurred = cv2.GaussianBlur(grey, (19, 19), 3.0)
    return cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]


def cpu_results() -> list[dict[str, object]]:
    """Every filter on the CPU against OpenCV directly, and the 3-step pipeline."""
    results: list[dict[str, object]] = []
    threads = cv2.getNumThreads()
    for size, (height, width) in SIZES.items():
        image = _frame(height, width)
        repeats = REPEATS[size]
        for name, params, reference in CPU_CASES:
            step = validate_pipeline([(name, params)])[0]
            ours, theirs = _compare(
                functools.partial(cpu_filters.apply, image, step),
                functools.partial(reference, image),
                repeats,
            )
            results.append(
                {
                    "benchmark": f"image.cpu.filter.{_label(name, params)}.{size}",
                    "seconds": round(ours, 6),
                    "opencv_seconds": round(theirs, 6),
                    "ratio_to_opencv": round(ours / theirs, 3),
                    "within_2x": ours <= 2 * theirs,
                    "opencv_threads": threads,
                }
            )
        steps = validate_pipeline(PIPELINE)
        backend = CpuBackend()
        ours, theirs = _compare(
            functools.partial(run_pipeline, backend, image, steps),
            functools.partial(_opencv_pipeline, image),
            repeats,
        )
        results.append(
            {
                "benchmark": f"image.cpu.pipeline.grayscale-gaussian3-otsu.{size}",
                "seconds": round(ours, 6),
                "opencv_seconds": round(theirs, 6),
                "ratio_to_opencv": round(ours / theirs, 3),
                "opencv_threads": threads,
            }
        )
    return results


def gpu_results(backend: Backend | None) -> list[dict[str, object]]:
    """Kernel times and bandwidth against a device copy; the pipeline against OpenCV on all cores."""
    if backend is None or backend.device is not Device.GPU:
        return [{"benchmark": "image.gpu", "skipped": "no GPU"}]
    from mesh.services.image_processing.gpu_backend import GpuBackend, device_copy_seconds, device_seconds

    assert isinstance(backend, GpuBackend)
    results: list[dict[str, object]] = []
    cv2.setNumThreads(os.cpu_count() or 1)
    cases: list[tuple[str, dict[str, Any], bool]] = [(n, p, False) for n, p, _ in CPU_CASES]
    cases.append(("gaussian_blur", {"sigma": 3.0}, True))  # the reference: sigma 3 on 4K grey
    for size, (height, width) in SIZES.items():
        frame = _frame(height, width)
        grey = frame[:, :, :1].copy()
        copy_seconds = {
            frame.nbytes: device_copy_seconds(frame.nbytes),
            grey.nbytes: device_copy_seconds(grey.nbytes),
        }
        for name, params, on_grey in cases:
            image = grey if on_grey else frame
            step = validate_pipeline([(name, params)])[0]
            session = backend.start(image)
            original = session.image

            def queue(session: Any = session, original: Any = original, step: Any = step) -> None:
                session.image = original
                session.queue([step])

            kernel = device_seconds(queue, stream=backend.stream)
            out = session.result()
            moved = image.nbytes + out.nbytes
            copy_bandwidth = 2 * image.nbytes / copy_seconds[image.nbytes]
            bandwidth = moved / kernel
            results.append(
                {
                    "benchmark": f"image.gpu.filter.{_label(name, params)}.{size}{'.grey' if on_grey else ''}",
                    "kernel_seconds": round(kernel, 7),
                    "bytes_moved": moved,
                    "effective_bandwidth_gbps": round(bandwidth / 1e9, 1),
                    "device_copy_bandwidth_gbps": round(copy_bandwidth / 1e9, 1),
                    "fraction_of_device_copy": round(bandwidth / copy_bandwidth, 3),
                }
            )
        steps = validate_pipeline(PIPELINE)
        end_to_end = _best(functools.partial(run_pipeline, backend, frame, steps), 7)
        session = backend.start(frame)
        original = session.image

        def queue_pipeline(session: Any = session, original: Any = original, steps: Any = steps) -> None:
            session.image = original
            session.queue(steps)

        kernels = device_seconds(queue_pipeline, stream=backend.stream)

        def upload(frame: Array = frame) -> None:
            backend.start(frame)
            backend.stream.synchronize()

        session.queue(steps)
        upload_s = _best(upload, 7)
        download_s = _best(session.result, 7)
        opencv = _best(functools.partial(_opencv_pipeline, frame), 7)
        results.append(
            {
                "benchmark": f"image.gpu.pipeline.grayscale-gaussian3-otsu.{size}",
                "end_to_end_seconds": round(end_to_end, 6),
                "kernels_seconds": round(kernels, 7),
                "upload_seconds": round(upload_s, 6),
                "download_seconds": round(download_s, 6),
                "opencv_seconds": round(opencv, 6),
                "opencv_threads": cv2.getNumThreads(),
                "speedup_end_to_end": round(opencv / end_to_end, 2),
                "speedup_kernels": round(opencv / kernels, 1),
            }
        )
    return results


async def _grpc_results(backend: Backend) -> list[dict[str, object]]:
    settings = ImageSettings(
        grpc_host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0, grace_seconds=1
    )
    processor = Processor(
        backend, store=None, limits=codec.Limits(max_pixels=100_000_000, max_bytes=96 * 1024 * 1024)
    )
    runtime = ServiceRuntime("image-bench", settings, service_names=[SERVICE_NAME])
    add_to_server(ImageProcessingServicer(processor), runtime.server)

    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    def identity(data: bytes) -> bytes:
        return data

    handler = grpc.unary_unary_rpc_method_handler(echo, identity, identity)
    runtime.server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": handler})]
    )
    task = asyncio.create_task(runtime.run())
    await asyncio.wait_for(runtime.started.wait(), 20)
    results: list[dict[str, object]] = []
    channel = open_channel(f"127.0.0.1:{runtime.grpc_port}", settings, service=SERVICE_NAME)
    try:
        # Both calls send the same pre-serialised bytes and take the reply as bytes, so client-side
        # protobuf work is identical and the difference is the server's: parse, pipeline, reply.
        process_call = channel.unary_unary(
            f"/{SERVICE_NAME}/ProcessImage", request_serializer=identity, response_deserializer=identity
        )
        echo_call = channel.unary_unary(
            f"/{ECHO_SERVICE}/Echo", request_serializer=identity, response_deserializer=identity
        )
        for label, side in (("1MB", 592), ("8MB", 1672)):
            image = _frame(side, side)
            raw = image_pb2.RawImage(pixels=image.tobytes(), width=side, height=side, channels=3)
            for pipeline_name, pipeline in (
                ("none", []),
                ("invert", [params_pb2.PipelineStep(filter="invert")]),
            ):
                request = pb.ProcessImageRequest(
                    input=image_pb2.ImageInput(raw=raw),
                    pipeline=pipeline,
                    output=pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_RAW),
                )
                payload = request.SerializeToString()
                process_times, echo_times = [], []
                for _ in range(3):
                    await process_call(payload)
                    await echo_call(payload)
                for _ in range(15):
                    started = time.perf_counter()
                    await process_call(payload)
                    process_times.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await echo_call(payload)
                    echo_times.append(time.perf_counter() - started)
                process_s, echo_s = statistics.median(process_times), statistics.median(echo_times)
                results.append(
                    {
                        "benchmark": f"image.grpc.process_image_vs_echo.{label}.pipeline={pipeline_name}",
                        "device": backend.device.value,
                        "payload_bytes": len(payload),
                        "process_image_seconds": round(process_s, 6),
                        "echo_seconds": round(echo_s, 6),
                        "process_image_mbps": round(len(payload) / process_s / 1e6, 1),
                        "echo_mbps": round(len(payload) / echo_s / 1e6, 1),
                        "fraction_of_echo": round(echo_s / process_s, 3),
                    }
                )
    finally:
        await channel.close(None)
        runtime.stopping.set()
        await asyncio.wait_for(task, 20)
        processor.close()
    return results


def codec_results() -> list[dict[str, object]]:
    """Decoding a 1080p JPEG (quality 90) as the service does (libjpeg-turbo's strict decode, which also
    refuses image data cut short) against the strict check followed by OpenCV's own decode, as it was done."""
    ok, encoded = cv2.imencode(".jpg", _frame(*SIZES["1080p"])[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    data = encoded.tobytes()
    limits = codec.Limits()

    def check_then_opencv() -> object:
        check_jpeg_data(data, "input")
        decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
        assert decoded is not None
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)

    ours, theirs = _compare(lambda: codec.decode(data, limits), check_then_opencv, 15)
    return [
        {
            "benchmark": "image.codec.decode_jpeg.1080p",
            "device": "cpu",
            "encoded_bytes": len(data),
            "seconds": round(ours, 6),
            "check_then_opencv_seconds": round(theirs, 6),
            "speedup": round(theirs / ours, 2),
        }
    ]


def run() -> list[dict[str, object]]:
    """Every image benchmark."""
    configure_logging("bench", level="warning", fmt="console")
    tune_allocator()  # as the service's __main__ does
    backend = select_backend("auto")
    if backend.device is Device.GPU:
        backend.warm_up()
    # The device check (scripts/device/check.sh) skips the CPU filters, measured here, to fit its time.
    results = codec_results()
    if not os.environ.get("MESH_BENCH_IMAGE_SKIP_CPU"):
        results.extend(cpu_results())
    results.extend(gpu_results(backend))
    results.extend(asyncio.run(_grpc_results(backend)))
    return results
