"""Admission weighs a request by the memory it really holds: every step as its input, its output and its
filter's temporaries (the float copies of sobel, the padded copies of a wrap border, CLAHE's tables...), the
decoded input kept beside later steps, the codec's copies, and the encoded bytes. It weighed the largest image
alone: a sobel held 14 times that, and two of them took a service with a 1 GiB budget to 3.7 GB.

Run as a module it prints each filter's measured peak against its weight, or with ``--requests`` those of whole
requests (the README's figures): ``PYTHONPATH=src python -m tests.image_processing.test_step_memory``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from mesh.common.v1 import image_pb2
from mesh.image.v1 import image_processing_service_pb2 as pb
from mesh.kit import errors
from mesh.kit.param_values import ParamScalar
from mesh.services.image_processing import codec
from mesh.services.image_processing.cpu_backend import CpuBackend
from mesh.services.image_processing.filter_math import plan_steps
from mesh.services.image_processing.processor import Input, Processor, weigh
from mesh.services.image_processing.registry import FILTERS, Device, validate_pipeline
from tests.image_processing.images import noise, smooth

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
LIMITS = codec.Limits(max_pixels=50_000_000, max_bytes=256 * MiB)

MEASURED_SIZE = (1000, 1200)
"""Height and width of the measured images: large enough that OpenCV's fixed buffers are small beside them."""
SLACK_BYTES = 4 * MiB
"""What a step may hold beyond its weight: OpenCV's fixed per-call buffers (thread blocks, histograms), up to
2.6 MiB measured whatever the image size."""
OVER_FACTOR = 1.35
"""How far a weight may exceed the measured peak (beyond the slack): the models round up (Canny's stacks,
each thread's rows of a wide blur), but a weight that doubled the truth would starve the budget."""

CASES: list[tuple[str, dict[str, ParamScalar]]] = [
    ("grayscale", {"method": "lightness"}),
    ("gaussian_blur", {"sigma": 20.0}),
    ("gaussian_blur", {"border": "wrap"}),
    ("box_blur", {"ksize": 129}),
    ("box_blur", {"ksize": 31, "border": "wrap"}),
    ("median", {"ksize": 5}),
    ("unsharp_mask", {}),
    ("unsharp_mask", {"threshold": 5}),
    ("sobel", {}),
    ("sobel", {"direction": "x"}),
    ("canny", {}),
    ("threshold", {"method": "otsu"}),
    ("threshold", {"method": "adaptive", "block_size": 101}),
    ("resize", {"scale": 2.0}),
    ("crop", {"x": 100, "y": 100}),
    ("rotate", {"angle": 30.0}),
    ("flip", {}),
    ("adjust", {"gamma": 2.0}),
    ("invert", {}),
    ("equalize", {}),
    ("equalize", {"method": "clahe"}),
    ("convert_color", {}),
    ("convert_color", {"conversion": "hsv_to_rgb"}),
    ("convert_color", {"conversion": "rgb_to_bgr"}),
]
MEASURED_LAYOUTS: list[tuple[Any, int]] = [(np.uint8, 1), (np.uint8, 3), (np.uint16, 4)]


# --- measuring (Linux: /proc's peak RSS, reset before what is measured) -------------------------------
def _status_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    found = re.search(rf"{field}:\s+(\d+) kB", status)
    assert found is not None, field
    return int(found.group(1)) * 1024


def _live_bytes_only() -> None:
    """Large buffers mapped and unmapped one by one (a tiny mmap threshold), so that the peak RSS is the peak
    of live bytes; OpenCV's thread pool started, so that its threads' stacks are not counted."""
    import cv2

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    cv2.GaussianBlur(np.zeros((256, 256, 3), np.uint8), (5, 5), 1.0)


def _growth(work: Callable[[], object]) -> int:
    """The peak bytes ``work`` adds to the process."""
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    held = work()
    peak = _status_bytes("VmHWM")
    del held
    return peak - before


def _step_peak(name: str, params: dict[str, ParamScalar], dtype: Any, channels: int) -> int:
    """The bytes one CPU step holds at its peak, its input included."""
    from mesh.services.image_processing import cpu_filters

    _live_bytes_only()
    image = noise(*MEASURED_SIZE, channels, dtype)
    step = validate_pipeline([(name, params)])[0]
    return image.nbytes + _growth(lambda: cpu_filters.apply(image, step))


def _in_child(measured: Callable[..., int], *args: Any) -> int:
    """``measured(*args)`` in a forked child (its own heap and OpenCV threads), its answer through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(read)
            os.write(write, str(measured(*args)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        data = answer.read()
    os.waitpid(pid, 0)
    return int(data)


async def _admitted(name: str, params: dict[str, ParamScalar], dtype: Any, channels: int) -> int:
    """The bytes admission reserves for this step on an image of the measured size (as ``Processor.run``)."""
    processor = Processor(CpuBackend(), store=None, limits=LIMITS, memory_budget_bytes=1 << 40)
    image: npt.NDArray[Any] = np.broadcast_to(np.zeros(1, dtype), (*MEASURED_SIZE, channels))
    try:
        ticket = await processor.admit(Input.of_image(image), validate_pipeline([(name, params)]))
        ticket.release()
        return ticket.nbytes
    finally:
        processor.close()


def measure() -> list[dict[str, Any]]:
    """Every case on every layout: its measured peak and the weight admission gives it."""
    rows = []
    for dtype, channels in MEASURED_LAYOUTS:
        for name, params in CASES:
            if name == "convert_color" and channels == 1:
                continue
            rows.append(
                {
                    "filter": name,
                    "params": params,
                    "layout": f"{np.dtype(dtype).name} x{channels}",
                    "input": MEASURED_SIZE[0] * MEASURED_SIZE[1] * channels * np.dtype(dtype).itemsize,
                    "measured": _in_child(_step_peak, name, params, dtype, channels),
                    "admitted": asyncio.run(_admitted(name, params, dtype, channels)),
                }
            )
    return rows


# --- whole requests (--requests): a PNG in, each output format, through Processor.process ---------------
REQUEST_SIZE = (3000, 4000)
REQUEST_PIPELINES: list[list[tuple[str, dict[str, ParamScalar]]]] = [
    [],
    [("invert", {})],
    [("gaussian_blur", {"sigma": 3.0})],
    [("gaussian_blur", {"border": "wrap"})],
    [("unsharp_mask", {"threshold": 5})],
    [("sobel", {})],
    [("convert_color", {})],
    [("threshold", {"method": "adaptive"})],
    [("canny", {})],
    [("equalize", {})],
    [("rotate", {"angle": 30.0})],
    [("grayscale", {}), ("gaussian_blur", {"sigma": 3.0}), ("threshold", {"method": "otsu"})],
]
REQUEST_FORMATS = {
    "PNG": image_pb2.IMAGE_FORMAT_PNG,
    "JPEG": image_pb2.IMAGE_FORMAT_JPEG,
    "RAW": image_pb2.IMAGE_FORMAT_RAW,
}


def _request_peak(data: bytes, pipeline: list[tuple[str, dict[str, ParamScalar]]], fmt: str) -> int:
    """The bytes a ProcessImage request holds at its peak: its message's copy of the file (in memory before the
    call), and what ``Processor.process`` adds until its reply is made."""
    _live_bytes_only()
    processor = Processor(
        CpuBackend(), store=None, limits=LIMITS, memory_budget_bytes=1 << 40, max_message_bytes=1 << 30
    )
    source = image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=data))
    spec, steps = pb.OutputSpec(format=REQUEST_FORMATS[fmt]), validate_pipeline(pipeline)
    tiny = _encoded(np.zeros((16, 16, 3), np.uint8))

    async def run(image: image_pb2.ImageInput) -> pb.ProcessImageResponse:
        delivered = await processor.process(image, steps, spec)
        delivered.release()
        return delivered.response

    # One loop for both runs: asyncio.run's teardown (threads joined) would be measured with the request.
    loop = asyncio.new_event_loop()
    loop.run_until_complete(run(tiny))  # the codec's and the pipeline's threads, started
    return len(data) + _growth(lambda: loop.run_until_complete(run(source)))


async def _request_weight(data: bytes, pipeline: list[tuple[str, dict[str, ParamScalar]]], fmt: str) -> int:
    processor = Processor(CpuBackend(), store=None, limits=LIMITS, memory_budget_bytes=1 << 40)
    try:
        source = Input.of_encoded(data, LIMITS, "input", inline=True)
        ticket = await processor.admit(source, validate_pipeline(pipeline), output=codec.Format[fmt])
        ticket.release()
        return ticket.nbytes
    finally:
        processor.close()


def print_requests() -> None:
    """Each pipeline, on an 8-bit and a 16-bit RGB PNG, delivered in each format: peak and weight."""
    for dtype in (np.uint8, np.uint16):
        top = np.iinfo(dtype).max
        detail = noise(*REQUEST_SIZE, 3, dtype) // 16  # as a photo has
        image = np.minimum(smooth(*REQUEST_SIZE, 3, dtype).astype(np.int64) + detail, top).astype(dtype)
        data = codec.encode(image, codec.Format.PNG)
        print(
            f"{REQUEST_SIZE[1]}x{REQUEST_SIZE[0]} RGB {np.dtype(dtype).name} PNG of {len(data) / MiB:.1f} MiB "
            f"({image.nbytes / MiB:.1f} MiB decoded); peak / weight in MiB, per output format"
        )
        for pipeline in REQUEST_PIPELINES:
            cells = []
            for fmt in REQUEST_FORMATS:
                peak = _in_child(_request_peak, data, pipeline, fmt)
                weight = asyncio.run(_request_weight(data, pipeline, fmt))
                cells.append(f"{fmt} {peak / MiB:6.1f} / {weight / MiB:6.1f}")
            label = ", ".join(f"{name} {json.dumps(params)}" if params else name for name, params in pipeline)
            print(f"  {label or '(no step)':58s} " + "   ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description="Measured peaks against admission's weights.")
    parser.add_argument(
        "--json", action="store_true", help="the filters' table as one JSON list, for the test"
    )
    parser.add_argument("--requests", action="store_true", help="whole requests instead of single steps")
    args = parser.parse_args()
    if args.requests:
        print_requests()
        return
    rows = measure()
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{MEASURED_SIZE[1]}x{MEASURED_SIZE[0]} images of noise; MiB; peak and weight include the input")
    for row in rows:
        print(
            f"{row['filter']:14s} {json.dumps(row['params']):40s} {row['layout']:9s} "
            f"input {row['input'] / MiB:6.1f}  peak {row['measured'] / MiB:7.1f} "
            f"({row['measured'] / row['input']:5.2f}x)  weight {row['admitted'] / MiB:7.1f} "
            f"({row['admitted'] / row['input']:5.2f}x)"
        )


# --- the tests ------------------------------------------------------------------------------------------
@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS"
)
def test_every_filter_is_admitted_for_the_memory_it_peaks_at() -> None:
    """Each filter, on grey, RGB and 16-bit RGBA, is weighed at least at its measured peak (input, output and
    temporaries, within OpenCV's fixed buffers) and not far above it. Weighed by its largest image, a sobel
    reserved 1/14 of what it held, 16-bit HSV 1/7, an unsharp mask with a threshold 1/5."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-m", "tests.image_processing.test_step_memory", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    )
    rows = json.loads(done.stdout)
    assert {row["filter"] for row in rows} == set(FILTERS)
    under = [row for row in rows if row["measured"] > row["admitted"] + SLACK_BYTES]
    assert not under, f"weighed below their peak: {under}"
    over = [row for row in rows if row["admitted"] > OVER_FACTOR * row["measured"] + SLACK_BYTES]
    assert not over, f"weighed far above their peak: {over}"


async def test_a_sobel_is_refused_by_its_float_arrays_not_its_images() -> None:
    """A 100x100 RGB sobel holds two float32 derivatives (8 bytes a sample) beside its 30 000-byte input and
    output: with a 200 000-byte budget it is refused up front, naming the step and its working memory. It was
    admitted for 30 000 bytes."""
    processor = Processor(CpuBackend(), store=None, limits=LIMITS, memory_budget_bytes=200_000)
    try:
        with pytest.raises(errors.PayloadTooLarge) as caught:
            await processor.run(noise(100, 100, 3), validate_pipeline([("sobel", {})]))
    finally:
        processor.close()
    message = caught.value.message
    assert "the 100x100 input (3 channels of 8 bits) at pipeline[0] (sobel: its 100x100x3 input" in message
    assert "210000 bytes of working memory) needs 270000 bytes of memory" in message
    assert errors.http_status(caught.value) == 413
    assert processor.admission.pending == 0


async def test_a_later_step_is_weighed_with_the_decoded_input_kept_beside_it() -> None:
    """The caller keeps the decoded input until the reply is made, so a step after the first holds it besides
    its own images: a sobel on the half-size image of a resize is weighed with the full-size input."""
    processor = Processor(CpuBackend(), store=None, limits=LIMITS)
    image = noise(200, 200, 3)
    steps = validate_pipeline([("resize", {"scale": 0.5}), ("sobel", {})])
    sobel = plan_steps((200, 200, 3), 1, steps)[1]
    try:
        ticket = await processor.admit(Input.of_image(image), steps)
        ticket.release()
    finally:
        processor.close()
    assert sobel.nbytes == 100 * 100 * 3 * (1 + 1 + 7)
    assert ticket.nbytes == image.nbytes + sobel.nbytes


def test_on_the_gpu_only_the_steps_run_on_the_host_weigh_their_working_memory() -> None:
    """The GPU backend's steps work in device memory (bounded by its own pool): a sobel there weighs no host
    temporaries, only the input and the result it comes back as; Canny runs its CPU code on a host copy, so it
    weighs what it does on the CPU, beside the input the caller keeps."""
    source = Input.of_image(noise(100, 100, 3))
    for name in ("sobel", "canny"):
        planned = plan_steps((100, 100, 3), 1, validate_pipeline([(name, {})]))
        on_cpu = weigh(source, planned, Device.CPU).nbytes
        on_gpu = weigh(source, planned, Device.GPU).nbytes
        if name == "sobel":
            assert on_gpu == source.nbytes + planned[0].images.output_bytes < on_cpu
        else:
            assert on_gpu == source.nbytes + planned[0].nbytes == on_cpu + source.nbytes


async def test_a_16_bit_clahe_is_weighed_by_its_tables_whatever_the_image_size() -> None:
    """OpenCV's 16-bit CLAHE builds a table of 65 536 entries per tile: with 64x64 tiles 512 MiB for a 64x64
    image. Such a request is refused by a smaller budget; it was admitted for the image's 8 KiB."""
    processor = Processor(CpuBackend(), store=None, limits=LIMITS, memory_budget_bytes=256 * MiB)
    steps = validate_pipeline([("equalize", {"method": "clahe", "tiles": 64})])
    try:
        with pytest.raises(errors.PayloadTooLarge, match=r"at pipeline\[0\] \(equalize"):
            await processor.run(noise(64, 64, 1, np.uint16), steps)
    finally:
        processor.close()
    assert plan_steps((64, 64, 1), 2, steps)[0].working_bytes >= 64 * 64 * 65536 * 2


def _encoded(image: npt.NDArray[Any]) -> image_pb2.ImageInput:
    return image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=codec.encode(image, codec.Format.PNG)))


async def test_decoding_and_an_encoded_reply_are_weighed_with_the_codec_copies_and_the_file() -> None:
    """Without a step, a PNG in and a PNG out still hold more than the decoded image: OpenCV's BGR pixels and
    their RGB conversion while decoding, the file (twice: the request's copy and the one read from it), and
    for the reply the image, its BGR copy and the encoded bytes twice. A budget of three decoded images admits
    it as RAW but refuses it as PNG; it was weighed by the decoded image alone."""
    image = smooth(200, 300, 3)
    source = _encoded(image)
    processor = Processor(CpuBackend(), store=None, limits=LIMITS, memory_budget_bytes=3 * image.nbytes)
    png = pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_PNG)
    try:
        with pytest.raises(errors.PayloadTooLarge) as caught:
            await processor.process(source, [], png)
        raw = await processor.process(source, [], pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_RAW))
        raw.release()
    finally:
        processor.close()
    message = caught.value.message
    assert "the 300x200 input (3 channels of 8 bits) when its 300x200x3 result is delivered" in message
    assert f"with {2 * len(source.encoded.data)} bytes of the file it came in" in message


if __name__ == "__main__":
    main()
