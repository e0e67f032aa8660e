"""Every step's output is bounded by the service's pixel limit (``MESH_MAX_IMAGE_PIXELS``), not only the
pipeline's result: a 510-byte request (a 10x10 PNG resized to 10000x10000, a sobel, resized back to 10x10) ran
for 11.6 s through a 4.2 GB peak, because a step's size was bounded only by a fixed 100 megapixels."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mesh.common.v1 import image_pb2
from mesh.image.v1 import image_processing_service_pb2 as pb
from mesh.kit import errors
from mesh.kit.param_values import ParamScalar
from mesh.services.image_processing import codec
from mesh.services.image_processing.cpu_backend import CpuBackend, CpuSession
from mesh.services.image_processing.filter_math import Image, output_shapes
from mesh.services.image_processing.processor import Processor
from mesh.services.image_processing.registry import Step, validate_pipeline
from tests.image_processing.images import noise, smooth

LIMITS = codec.Limits(max_pixels=10_000, max_bytes=1024 * 1024)


class CountingBackend(CpuBackend):
    """The CPU backend, counting the pipelines it starts."""

    def __init__(self) -> None:
        self.started = 0

    def start(self, image: Image) -> CpuSession:
        self.started += 1
        return super().start(image)


def _png(image: Image) -> image_pb2.ImageInput:
    return image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=codec.encode(image, codec.Format.PNG)))


async def _refused(
    image: Image, pipeline: list[tuple[str, dict[str, ParamScalar]]], monkeypatch: pytest.MonkeyPatch
) -> errors.MeshError:
    """What ProcessImage's core answers for ``image`` through ``pipeline`` under LIMITS; nothing may be
    decoded or run for it."""
    decoded: list[bytes] = []
    real_decode = codec.decode

    def decode(*args: Any, **kwargs: Any) -> Image:
        decoded.append(args[0])
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(codec, "decode", decode)
    backend = CountingBackend()
    processor = Processor(backend, store=None, limits=LIMITS)
    try:
        with pytest.raises(errors.MeshError) as caught:
            (await processor.process(_png(image), validate_pipeline(pipeline), pb.OutputSpec())).release()
    finally:
        processor.close()
    assert (decoded, backend.started, processor.admission.pending) == ([], 0, 0)
    return caught.value


async def test_a_tiny_input_blown_up_mid_pipeline_is_refused_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reviewer's request in small: a 10x10 PNG resized to 200x200 (4 times the 10 000-pixel limit), a
    sobel, and a resize back to 10x10. Its result is within the limit, but its first step's output is not:
    refused as an input over the limit is (RESOURCE_EXHAUSTED, PAYLOAD_TOO_LARGE, HTTP 413), naming the step,
    its parameter and the limit, before it is decoded."""
    refusal = await _refused(
        noise(10, 10, 3),
        [
            ("resize", {"width": 200, "height": 200, "keep_aspect": False}),
            ("sobel", {}),
            ("resize", {"width": 10, "height": 10, "keep_aspect": False}),
        ],
        monkeypatch,
    )
    assert isinstance(refusal, errors.PayloadTooLarge)
    assert errors.http_status(refusal) == 413
    assert refusal.message.startswith(
        "pipeline[0] (resize) output is 200x200 = 40000 pixels; the limit is 10000, for every step's output"
    )
    assert [violation.field for violation in refusal.field_violations] == ["pipeline[0].params.width"]
    assert "at most 10000" in refusal.field_violations[0].description


async def test_a_rotation_that_grows_past_the_limit_mid_pipeline_names_its_angle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 45-degree turn of a 100x100 image makes 141x141 (19 881 pixels, over 10 000), which a crop then cuts
    to 50x50: the turn is refused, naming its angle. The rotation's bound was a fixed 100 megapixels."""
    refusal = await _refused(
        smooth(100, 100, 3),
        [("rotate", {"angle": 45.0}), ("crop", {"width": 50, "height": 50})],
        monkeypatch,
    )
    assert isinstance(refusal, errors.PayloadTooLarge)
    assert "pipeline[0] (rotate) output is 141x141 = 19881 pixels; the limit is 10000" in refusal.message
    assert [violation.field for violation in refusal.field_violations] == ["pipeline[0].params.angle"]


async def test_a_step_at_the_limit_runs_and_one_pixel_more_is_refused() -> None:
    """The bound is inclusive, as it is for an input: a middle step of exactly the limit's pixels runs, one of a
    pixel more is refused though the result is small."""
    processor = Processor(CpuBackend(), store=None, limits=LIMITS)

    def blown_up(height: int) -> list[Step]:
        return validate_pipeline(
            [
                ("resize", {"width": 100, "height": height, "keep_aspect": False}),
                ("invert", {}),
                ("resize", {"width": 10, "height": 10, "keep_aspect": False}),
            ]
        )

    try:
        output = await processor.run(noise(10, 10, 3), blown_up(100))
        with pytest.raises(
            errors.PayloadTooLarge, match=r"pipeline\[0\] \(resize\) output is 100x101 = 10100"
        ):
            await processor.run(noise(10, 10, 3), blown_up(101))
    finally:
        processor.close()
    assert output.image.shape == (10, 10, 3)


def test_the_step_bound_is_the_configured_limit_not_a_constant() -> None:
    """Planned with the service's limit, a resize is bounded by that limit both ways: below the old fixed 100
    megapixels it is refused, above it (a limit raised past it) allowed. Planning allocates nothing."""
    steps = validate_pipeline([("resize", {"width": 12_000, "height": 12_000, "keep_aspect": False})])
    with pytest.raises(
        errors.PayloadTooLarge, match=r"output is 12000x12000 = 144000000 pixels; the limit is 50"
    ):
        output_shapes(10, 10, 3, steps, 50_000_000)
    assert output_shapes(10, 10, 3, steps, 200_000_000) == [(12_000, 12_000, 3)]


def test_a_step_over_the_limit_is_refused_as_an_input_over_it_is() -> None:
    """The same status, reason and HTTP code for a step's output as for an input over the pixel limit."""
    big = np.zeros((101, 100, 1), np.uint8)
    with pytest.raises(errors.MeshError) as input_refusal:
        codec.probe(codec.encode(big, codec.Format.PNG), LIMITS)
    steps = validate_pipeline([("resize", {"scale": 2.0})])
    with pytest.raises(errors.MeshError) as step_refusal:
        output_shapes(100, 100, 1, steps, LIMITS.max_pixels)
    assert type(step_refusal.value) is type(input_refusal.value) is errors.PayloadTooLarge
    assert errors.http_status(step_refusal.value) == errors.http_status(input_refusal.value) == 413
    assert step_refusal.value.reason == input_refusal.value.reason
    assert step_refusal.value.to_status().code == input_refusal.value.to_status().code
