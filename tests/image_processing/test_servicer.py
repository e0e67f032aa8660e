"""The gRPC service in process, over a real server on port 0 (ServiceRuntime)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.common.v1 import image_pb2, params_pb2
from mesh.image.v1 import image_processing_service_pb2 as pb
from mesh.image.v1 import image_processing_service_pb2_grpc as pb_grpc
from mesh.kit import errors
from mesh.kit.channels import open_channel
from mesh.kit.health import FunctionCheck
from mesh.kit.image_bytes import sniff_format
from mesh.kit.raw_pixels import read_raw
from mesh.kit.runtime import RESTARTING, ServiceRuntime
from mesh.kit.wire import Parted, Spliced, serialize_reply
from mesh.services.image_processing import codec
from mesh.services.image_processing.cpu_backend import CpuBackend
from mesh.services.image_processing.processor import REPLY_HEADROOM_BYTES, Delivered, Processor
from mesh.services.image_processing.registry import steps_from_proto
from mesh.services.image_processing.servicer import RAW_INPUT, ImageProcessingServicer, add_to_server
from mesh.services.image_processing.settings import SERVICE_NAME, ImageSettings
from tests.image_processing.fakes import CallContext, MemoryStore
from tests.image_processing.images import noise, smooth

LIMITS = codec.Limits(max_pixels=1_000_000, max_bytes=8 * 1024 * 1024)
SMALL_REPLY_LIMIT = REPLY_HEADROOM_BYTES + 10_000
"""A send limit that leaves 10,000 bytes for a reply's image (parametrize ``served`` with it, indirect)."""


@dataclass
class Served:
    stub: Any
    store: MemoryStore
    runtime: ServiceRuntime
    channel: grpc.aio.Channel


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """The service on port 0; an indirect parameter is the processor's max_message_bytes."""
    settings = ImageSettings(grpc_port=0, http_port=0, grace_seconds=1, health_interval_seconds=0.05)
    backend = CpuBackend()
    store = MemoryStore()
    max_message_bytes = getattr(request, "param", settings.max_message_bytes)
    processor = Processor(backend, store=store, limits=LIMITS, max_message_bytes=max_message_bytes)

    async def compute() -> str:
        return backend.check()

    runtime = ServiceRuntime(
        "image-processing", settings, service_names=[SERVICE_NAME], checks=[FunctionCheck("compute", compute)]
    )
    add_to_server(ImageProcessingServicer(processor), runtime.server)
    task = asyncio.create_task(runtime.run())
    await asyncio.wait_for(runtime.started.wait(), 10)
    channel = open_channel(
        f"localhost:{runtime.grpc_port}", settings, service=SERVICE_NAME, streaming_methods=["StreamProcess"]
    )
    yield Served(pb_grpc.ImageProcessingServiceStub(channel), store, runtime, channel)
    await channel.close(None)
    runtime.stopping.set()
    await asyncio.wait_for(task, 10)
    processor.close()


def _step(name: str, **params: Any) -> params_pb2.PipelineStep:
    values = {}
    for key, value in params.items():
        if isinstance(value, bool):
            values[key] = params_pb2.ParamValue(bool_value=value)
        elif isinstance(value, int):
            values[key] = params_pb2.ParamValue(int_value=value)
        elif isinstance(value, float):
            values[key] = params_pb2.ParamValue(number_value=value)
        else:
            values[key] = params_pb2.ParamValue(string_value=value)
    return params_pb2.PipelineStep(filter=name, params=values)


def _png(image: Any) -> image_pb2.ImageInput:
    return image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=codec.encode(image, codec.Format.PNG)))


async def test_health_and_list_filters(served: Served) -> None:
    """The service name is SERVING; ListFilters lists every filter with typed params and the CPU device."""
    health = health_pb2_grpc.HealthStub(served.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    catalogue = await served.stub.ListFilters(pb.ListFiltersRequest())
    assert catalogue.device == image_pb2.DEVICE_CPU
    blur = next(f for f in catalogue.filters if f.name == "gaussian_blur")
    sigma = next(p for p in blur.params if p.name == "sigma")
    assert sigma.type == pb.PARAM_TYPE_FLOAT
    assert (sigma.min, sigma.max, sigma.default_value.number_value) == (0.1, 20.0, 1.0)
    border = next(p for p in blur.params if p.name == "border")
    assert list(border.options) == ["reflect", "clamp", "wrap", "constant"]
    assert image_pb2.DEVICE_GPU in blur.devices
    canny = next(f for f in catalogue.filters if f.name == "canny")
    assert list(canny.devices) == [image_pb2.DEVICE_CPU]
    assert blur.tolerance.startswith("within 1 LSB on 99.9% of samples (float32 taps on the GPU")
    assert next(f for f in catalogue.filters if f.name == "invert").tolerance == "exact"


async def test_process_image_inline_png_to_png(served: Served) -> None:
    """An inline PNG through grayscale -> blur comes back as a one-channel PNG with step timings."""
    image = smooth(40, 60, 3)
    response = await served.stub.ProcessImage(
        pb.ProcessImageRequest(
            input=_png(image), pipeline=[_step("grayscale"), _step("gaussian_blur", sigma=1.5)]
        )
    )
    assert response.WhichOneof("result") == "encoded"
    assert response.encoded.format == image_pb2.IMAGE_FORMAT_PNG
    out = codec.decode(response.encoded.data, LIMITS)
    assert out.shape == (40, 60, 1)
    assert (response.width, response.height, response.channels) == (60, 40, 1)
    assert [t.filter for t in response.timings] == ["grayscale", "gaussian_blur"]
    assert response.device == image_pb2.DEVICE_CPU


async def test_an_rgba_image_delivered_as_jpeg_reports_the_three_channels_it_has(served: Served) -> None:
    """JPEG has no alpha: the response's channels say what the delivered bytes hold (3), as PNG's say 4.
    It reported the pipeline's 4 for a 3-channel JPEG."""
    rgba = _png(noise(8, 6, 4))
    for fmt, channels in ((image_pb2.IMAGE_FORMAT_JPEG, 3), (image_pb2.IMAGE_FORMAT_PNG, 4)):
        response = await served.stub.ProcessImage(
            pb.ProcessImageRequest(input=rgba, pipeline=[_step("invert")], output=pb.OutputSpec(format=fmt))
        )
        decoded = codec.decode(response.encoded.data, LIMITS)
        assert response.channels == decoded.shape[2] == channels


async def test_process_image_raw_in_raw_out_16_bit(served: Served) -> None:
    """Raw 16-bit pixels in, raw out: invert is exact."""
    image = noise(9, 7, 3, np.uint16)
    raw = image_pb2.RawImage(
        pixels=image.astype("<u2").tobytes(),
        width=7,
        height=9,
        channels=3,
        pixel_type=image_pb2.PIXEL_TYPE_UINT16,
    )
    response = await served.stub.ProcessImage(
        pb.ProcessImageRequest(
            input=image_pb2.ImageInput(raw=raw),
            pipeline=[_step("invert")],
            output=pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_RAW),
        )
    )
    out = read_raw(response.raw, max_pixels=LIMITS.max_pixels)
    assert np.array_equal(out, 65535 - image)


def _address(buffer: bytes | memoryview) -> int:
    return int(np.frombuffer(buffer, np.uint8).ctypes.data)


async def test_raw_pixels_cross_the_servicer_without_a_copy() -> None:
    """A raw input reaches the pipeline as a view of the received bytes, and a RAW output is appended to the
    serialised reply as a view of the result's memory: with no filter the reply's pixels are the request's
    very bytes. The reply parses as the whole message (size, channels, pixels); an encoded output is a plain
    message."""
    servicer = ImageProcessingServicer(Processor(CpuBackend(), store=None, limits=LIMITS))
    image = noise(5, 4, 3)
    request = pb.ProcessImageRequest(
        input=image_pb2.ImageInput(
            raw=image_pb2.RawImage(pixels=image.tobytes(), width=4, height=5, channels=3)
        ),
        output=pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_RAW),
    )
    payload = request.SerializeToString()
    reply = await servicer.ProcessImage(RAW_INPUT.parse(payload), CallContext())  # type: ignore[arg-type]
    assert isinstance(reply, Spliced)
    assert payload.find(image.tobytes()) == _address(reply.data) - _address(payload)

    request.pipeline.append(_step("invert"))
    reply = await servicer.ProcessImage(RAW_INPUT.parse(request.SerializeToString()), CallContext())  # type: ignore[arg-type]
    assert isinstance(reply, Spliced)
    assert isinstance(reply.message, pb.ProcessImageResponse)
    assert not reply.message.raw.pixels
    assert isinstance(reply.data, memoryview)
    assert isinstance(reply.data.obj, np.ndarray)  # the result's own array, not a bytes copy of it
    parsed = pb.ProcessImageResponse.FromString(serialize_reply(reply))
    assert (parsed.raw.width, parsed.raw.height, parsed.raw.channels) == (4, 5, 3)
    assert parsed.raw.pixels == (255 - image).tobytes()

    request.output.format = image_pb2.IMAGE_FORMAT_PNG
    encoded = await servicer.ProcessImage(RAW_INPUT.parse(request.SerializeToString()), CallContext())  # type: ignore[arg-type]
    assert isinstance(encoded, pb.ProcessImageResponse)


async def test_process_image_by_reference_and_stored(served: Served) -> None:
    """An image_id input is fetched from the file service; store=True returns the stored output's id."""
    image_id = served.store.put(codec.encode(noise(10, 10, 3), codec.Format.PNG))
    response = await served.stub.ProcessImage(
        pb.ProcessImageRequest(
            input=image_pb2.ImageInput(image_id=image_id),
            pipeline=[_step("flip", direction="vertical")],
            output=pb.OutputSpec(
                format=image_pb2.IMAGE_FORMAT_JPEG, quality=80, store=True, labels={"a": "b"}
            ),
        )
    )
    assert response.WhichOneof("result") == "image_id"
    data, labels = served.store.images[response.image_id]
    assert sniff_format(data) == "JPEG"
    assert labels == {"a": "b"}


async def _call_error(served: Served, request: pb.ProcessImageRequest) -> errors.MeshError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.ProcessImage(request)
    return errors.from_rpc_error(caught.value)


def _raw(image: Any) -> image_pb2.ImageInput:
    height, width, channels = image.shape
    raw = image_pb2.RawImage(pixels=image.tobytes(), width=width, height=height, channels=channels)
    return image_pb2.ImageInput(raw=raw)


@pytest.mark.parametrize("served", [SMALL_REPLY_LIMIT], indirect=True)
async def test_a_reply_larger_than_the_send_limit_is_payload_too_large_naming_the_output(
    served: Served,
) -> None:
    """A RAW output whose bytes would not fit in a reply is PAYLOAD_TOO_LARGE (HTTP 413) on ``output``, saying
    the size, the limit and what to ask for instead; the same output as PNG fits and is delivered. gRPC used
    to fail the send itself: RESOURCE_EXHAUSTED without details, which the gateway answered 429 (retry)."""
    request = pb.ProcessImageRequest(
        input=_raw(smooth(40, 40, 3)),
        pipeline=[_step("resize", scale=2.0)],
        output=pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_RAW),
    )
    error = await _call_error(served, request)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == errors.REASON_PAYLOAD_TOO_LARGE
    assert errors.http_status(error) == 413
    assert [v.field for v in error.field_violations] == ["output"]
    description = error.field_violations[0].description
    assert "80x80 output is 19200 bytes as RAW, more than the 10000 bytes a reply can carry" in description
    assert "an encoded format (PNG, JPEG or WebP)" in description
    assert "output.store" in description

    request.output.format = image_pb2.IMAGE_FORMAT_PNG
    response = await served.stub.ProcessImage(request)
    assert (response.width, response.height) == (80, 80)


@pytest.mark.parametrize("served", [SMALL_REPLY_LIMIT], indirect=True)
async def test_a_stream_frame_larger_than_the_send_limit_is_a_frame_error_and_the_stream_goes_on(
    served: Served,
) -> None:
    """An oversized frame yields a PAYLOAD_TOO_LARGE response naming ``config.output``, and the next frame is
    still processed. The failed send used to end the whole stream."""
    config = pb.StreamConfig(
        pipeline=[_step("resize", scale=2.0)], output=pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_RAW)
    )
    messages = _frames(config, [_raw(noise(10, 10, 3)), _raw(noise(40, 40, 3)), _raw(noise(10, 10, 3))])

    async def requests() -> AsyncIterator[pb.StreamProcessRequest]:
        for message in messages:
            yield message

    responses = await asyncio.wait_for(_collect(served.stub.StreamProcess(requests())), 10)
    assert [r.sequence for r in responses] == [1, 2, 3]
    assert [r.HasField("error") for r in responses] == [False, True, False]
    error = errors.from_status(responses[1].error)
    assert error.reason == errors.REASON_PAYLOAD_TOO_LARGE
    assert [v.field for v in error.field_violations] == ["config.output"]
    assert (responses[2].result.width, responses[2].result.height) == (20, 20)


async def test_an_output_too_wide_for_webp_is_invalid_argument_naming_the_output_format(
    served: Served,
) -> None:
    """WebP holds at most 16383 pixels a side: a wider output is INVALID_ARGUMENT on output.format naming the
    limit and the size, not INTERNAL from the encoder."""
    request = pb.ProcessImageRequest(
        input=_raw(noise(1, 16384, 1)), output=pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_WEBP)
    )
    error = await _call_error(served, request)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.field_violations] == ["output.format"]
    assert "at most 16383 pixels" in error.message
    assert "16384x1" in error.message


async def test_bad_parameter_is_invalid_argument_with_field(served: Served) -> None:
    """A bad parameter is INVALID_ARGUMENT with a BadRequest naming the field and the range."""
    error = await _call_error(
        served,
        pb.ProcessImageRequest(
            input=_png(noise(4, 4, 1)), pipeline=[_step("invert"), _step("median", ksize=9)]
        ),
    )
    assert isinstance(error, errors.InvalidArgument)
    assert error.field_violations[0].field == "pipeline[1].params.ksize"
    assert "between 3 and 5" in error.field_violations[0].description


async def test_unknown_filter_and_undecodable_and_too_large(served: Served) -> None:
    """Unknown filter and undecodable image are INVALID_ARGUMENT; an oversized image RESOURCE_EXHAUSTED."""
    unknown = await _call_error(
        served, pb.ProcessImageRequest(input=_png(noise(4, 4, 1)), pipeline=[_step("nope")])
    )
    assert "valid filters" in unknown.field_violations[0].description
    broken = image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=b"\x89PNG\r\n\x1a\nbroken"))
    undecodable = await _call_error(served, pb.ProcessImageRequest(input=broken))
    assert undecodable.code == grpc.StatusCode.INVALID_ARGUMENT
    big = image_pb2.RawImage(pixels=bytes(2000 * 1000), width=2000, height=1000, channels=1)
    too_large = await _call_error(served, pb.ProcessImageRequest(input=image_pb2.ImageInput(raw=big)))
    assert too_large.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_declared_format_the_bytes_contradict_is_invalid_argument(served: Served) -> None:
    """PNG bytes declared JPEG (or declared a format number that is none) are refused naming
    input.encoded.format, as inference refuses them; they were processed as if nothing were declared."""
    png = codec.encode(noise(4, 4, 1), codec.Format.PNG)
    for declared, words in (
        (image_pb2.IMAGE_FORMAT_JPEG, "format says JPEG but the bytes are a PNG image"),
        (image_pb2.ImageFormat.ValueType(99), "format 99 is not an image format"),
    ):
        encoded = image_pb2.EncodedImage(data=png, format=declared)
        error = await _call_error(served, pb.ProcessImageRequest(input=image_pb2.ImageInput(encoded=encoded)))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert words in error.message
        assert [v.field for v in error.field_violations] == ["input.encoded.format"]


async def test_an_output_that_cannot_be_delivered_is_refused_before_the_input_is_loaded(
    served: Served,
) -> None:
    """Every problem of the output spec is named at once, before the input is fetched or a step runs: the
    input here does not exist, and the answer is still the spec's INVALID_ARGUMENT. It used to come after the
    pipeline, one problem at a time, with a bad label named ``metadata.labels`` by the file service."""
    missing = image_pb2.ImageInput(image_id="00000000-0000-0000-0000-000000000000")
    spec = pb.OutputSpec(
        format=image_pb2.ImageFormat.ValueType(99), quality=101, store=True, labels={"": "x", "ok": "a\x00"}
    )
    error = await _call_error(
        served, pb.ProcessImageRequest(input=missing, pipeline=[_step("invert")], output=spec)
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.field_violations] == [
        "output.format",
        "output.quality",
        "output.labels['']",
        "output.labels['ok']",
    ]
    assert "output.quality: must be between 1 and 100" in error.message
    raw_stored = pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_RAW, store=True)
    error = await _call_error(served, pb.ProcessImageRequest(input=missing, output=raw_stored))
    assert "stored outputs are PNG, JPEG or WebP, not RAW" in error.field_violations[0].description


async def test_stream_with_an_output_that_cannot_be_delivered_fails_at_its_config(served: Served) -> None:
    """A config whose output can never be delivered ends the stream at once, as a bad pipeline does,
    instead of answering every frame with the same error."""
    config = pb.StreamConfig(
        pipeline=[_step("grayscale")],
        output=pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_JPEG, quality=101),
    )

    never = asyncio.Event()

    async def requests() -> AsyncIterator[pb.StreamProcessRequest]:
        # The frames wait for an answer that only a server which ignored the bad config would let come;
        # sending them at once races grpcio's asyncio client, which can then report INTERNAL
        # (grpc/grpc#36066).
        yield pb.StreamProcessRequest(config=config)
        await never.wait()
        for message in _frames(None, [_png(noise(4, 4, 1))]):
            yield message

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = await asyncio.wait_for(_collect(served.stub.StreamProcess(requests())), 10)
    error = errors.from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.field_violations] == ["config.output.quality"]


async def _collect(call: AsyncIterator[pb.StreamProcessResponse]) -> list[pb.StreamProcessResponse]:
    return [response async for response in call]


def _frames(
    config: pb.StreamConfig | None, frames: list[image_pb2.ImageInput]
) -> list[pb.StreamProcessRequest]:
    messages = [] if config is None else [pb.StreamProcessRequest(config=config)]
    for sequence, frame in enumerate(frames, start=1):
        messages.append(pb.StreamProcessRequest(frame=pb.Frame(sequence=sequence, image=frame)))
    return messages


async def test_stream_keeps_order_and_survives_a_bad_frame(served: Served) -> None:
    """Frames come back in order; a bad frame in the middle yields an error response and the stream goes on."""
    good = _png(smooth(16, 16, 3))
    bad = image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=b"not an image"))
    config = pb.StreamConfig(
        pipeline=[_step("grayscale")], output=pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_RAW)
    )
    messages = _frames(config, [good, good, bad, good, good])

    async def requests() -> AsyncIterator[pb.StreamProcessRequest]:
        for message in messages:
            yield message

    responses = [r async for r in served.stub.StreamProcess(requests())]
    assert [r.sequence for r in responses] == [1, 2, 3, 4, 5]
    assert [r.HasField("error") for r in responses] == [False, False, True, False, False]
    status: status_pb2.Status = responses[2].error
    assert errors.from_status(status).code == grpc.StatusCode.INVALID_ARGUMENT
    assert all(r.result.channels == 1 for r in responses if not r.HasField("error"))


async def test_a_frame_that_crashes_the_server_is_an_internal_frame_error_and_the_stream_goes_on(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug met by one frame (any exception that is not the service's own error) answers that frame INTERNAL,
    without the exception's text, and the frames after it are processed: it ended the whole stream with
    INTERNAL, which the proto's "the stream stays open" does not allow, as StreamInference already did."""
    crash = image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=b"\x89PNG crash me"))
    original = Processor.process

    async def flaky(self: Processor, image: image_pb2.ImageInput, *args: Any, **kwargs: Any) -> Any:
        if image.encoded.data == crash.encoded.data:
            raise RuntimeError("secret internals")
        return await original(self, image, *args, **kwargs)

    monkeypatch.setattr(Processor, "process", flaky)
    good = _png(smooth(8, 8, 3))
    messages = _frames(pb.StreamConfig(pipeline=[_step("invert")]), [good, crash, good])

    async def requests() -> AsyncIterator[pb.StreamProcessRequest]:
        for message in messages:
            yield message

    responses = await asyncio.wait_for(_collect(served.stub.StreamProcess(requests())), 10)
    assert [(r.sequence, r.HasField("error")) for r in responses] == [(1, False), (2, True), (3, False)]
    assert errors.from_status(responses[1].error).code == grpc.StatusCode.INTERNAL
    assert "secret" not in responses[1].error.message


async def test_stream_without_config_fails(served: Served) -> None:
    """A stream whose first message is a frame ends with INVALID_ARGUMENT."""

    async def requests() -> AsyncIterator[pb.StreamProcessRequest]:
        for message in _frames(None, [_png(noise(4, 4, 1))]):
            yield message

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [r async for r in served.stub.StreamProcess(requests())]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_stream_with_bad_pipeline_fails(served: Served) -> None:
    """A config with an invalid pipeline ends the stream with INVALID_ARGUMENT naming config.pipeline."""

    async def requests() -> AsyncIterator[pb.StreamProcessRequest]:
        yield pb.StreamProcessRequest(config=pb.StreamConfig(pipeline=[_step("median", ksize=2)]))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [r async for r in served.stub.StreamProcess(requests())]
    error = errors.from_rpc_error(caught.value)
    assert error.field_violations[0].field == "config.pipeline[0].params.ksize"


_BAD_UTF8 = "not-utf8?"
"""A string a request holds where a test turns its last character into a byte that is not UTF-8."""


def _with_bad_utf8(message: pb.ProcessImageRequest | pb.StreamProcessRequest) -> bytes:
    """``message`` serialised, with the ``_BAD_UTF8`` string it holds no longer UTF-8."""
    data = message.SerializeToString()
    assert data.count(_BAD_UTF8.encode()) == 1
    return data.replace(_BAD_UTF8.encode(), _BAD_UTF8.encode()[:-1] + b"\xff")


def _error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings, errors and tracebacks the service and gRPC logged. Not asyncio's or OpenTelemetry's: the garbage
    collector may finish an earlier test's leftovers during this one ("Task was destroyed but it is pending"),
    and a test server stopped earlier in this process shut the tracer provider down, so every span warns."""
    return [
        r.getMessage()
        for r in caplog.records
        if (r.levelno >= logging.WARNING or r.exc_info) and r.name.startswith(("mesh", "grpc"))
    ]


@pytest.mark.parametrize("inline", ["encoded", "raw"])
async def test_a_process_image_request_that_cannot_be_parsed_is_invalid_argument_naming_its_type(
    served: Served, caplog: pytest.LogCaptureFixture, inline: str
) -> None:
    """A request holding bytes that are not UTF-8 in a string field (a filter's name) is INVALID_ARGUMENT
    naming the type, with nothing logged as an error, whether or not the service's own deserializer takes
    raw pixels out first; it was UNKNOWN with protobuf's internals and a traceback in the log."""
    image = _raw(noise(4, 4, 1)) if inline == "raw" else _png(noise(4, 4, 1))
    payload = _with_bad_utf8(pb.ProcessImageRequest(input=image, pipeline=[_step(_BAD_UTF8)]))
    call = served.channel.unary_unary(f"/{SERVICE_NAME}/ProcessImage", None, None)
    with caplog.at_level(logging.INFO), pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(payload)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "the request is not a valid mesh.image.v1.ProcessImageRequest: "
        "a string field holds bytes that are not UTF-8"
    )
    assert _error_lines(caplog) == []


async def test_a_stream_frame_that_cannot_be_parsed_ends_the_stream_invalid_argument_after_the_frames_before_it(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """Frames 1, <not parseable>, 3: frame 1 is answered, then the stream ends INVALID_ARGUMENT naming the
    type, with nothing logged as an error; it ended OK after a warning, frame 3 silently dropped."""
    config = pb.StreamConfig(
        pipeline=[_step("invert")], output=pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_PNG)
    )
    config_message, frame, _ = _frames(config, [_png(noise(4, 4, 3)), _png(noise(4, 4, 3))])
    bad = _with_bad_utf8(
        pb.StreamProcessRequest(frame=pb.Frame(sequence=2, image=image_pb2.ImageInput(image_id=_BAD_UTF8)))
    )
    after = pb.StreamProcessRequest(frame=pb.Frame(sequence=3, image=_png(noise(4, 4, 3))))
    messages = [config_message.SerializeToString(), frame.SerializeToString(), bad, after.SerializeToString()]

    async def requests() -> AsyncIterator[bytes]:
        for message in messages:
            yield message

    call = served.channel.stream_stream(
        f"/{SERVICE_NAME}/StreamProcess", None, pb.StreamProcessResponse.FromString
    )
    answered: list[pb.StreamProcessResponse] = []
    with caplog.at_level(logging.INFO), pytest.raises(grpc.aio.AioRpcError) as caught:
        async for reply in call(requests()):
            answered.append(reply)
    assert [(r.sequence, r.HasField("error")) for r in answered] == [(1, False)]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "the request is not a valid mesh.image.v1.StreamProcessRequest: "
        "a string field holds bytes that are not UTF-8"
    )
    assert _error_lines(caplog) == []


@dataclass
class _StreamContext(CallContext):
    """A call context that says whether the client has gone away."""

    gone: bool = False

    def cancelled(self) -> bool:
        return self.gone


@pytest.mark.parametrize("gone", [False, True], ids=["client-there", "client-gone"])
async def test_a_stream_read_failure_is_raised_unless_the_client_went_away(
    caplog: pytest.LogCaptureFixture, gone: bool
) -> None:
    """A read that fails for another reason than a MeshError ends the stream with that error (the interceptor
    answers it INTERNAL), after the frames read before it; only where the client went away does it end
    quietly with a warning. Every such failure ended the stream OK, as if the client had sent no more."""
    processor = _BlockedProcessor()
    processor.release.set()
    servicer = ImageProcessingServicer(processor)  # type: ignore[arg-type]

    async def requests() -> AsyncIterator[Parted[pb.StreamProcessRequest]]:
        yield Parted(pb.StreamProcessRequest(config=pb.StreamConfig()), None)
        frame = pb.Frame(sequence=1, image=_png(noise(2, 2, 1)))
        yield Parted(pb.StreamProcessRequest(frame=frame), None)
        raise ConnectionResetError("the read broke")

    stream = servicer.StreamProcess(requests(), _StreamContext(gone=gone))  # type: ignore[arg-type]
    answered: list[Any] = []
    with caplog.at_level(logging.INFO, logger="mesh.services.image_processing.servicer"):
        if gone:
            answered = [reply async for reply in stream]
        else:
            with pytest.raises(ConnectionResetError):
                async for reply in stream:
                    answered.append(reply)
    assert [r.sequence for r in answered] == [1]
    warned = [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.levelno == logging.WARNING]
    assert [line["event"] for line in warned] == (
        ["stream ended by a read failure after the client went away"] if gone else []
    )


class _BlockedProcessor:
    """A processor whose every frame waits until released, to observe read-ahead."""

    def __init__(self) -> None:
        self.backend = CpuBackend()
        self.release = asyncio.Event()

    def check_output(self, spec: pb.OutputSpec, where: str = "output") -> codec.Format:
        return codec.Format.RAW

    async def process(
        self, *args: Any, into: pb.ProcessImageResponse | None = None, **kwargs: Any
    ) -> Delivered:
        await self.release.wait()
        response = pb.ProcessImageResponse() if into is None else into
        response.width = 1
        return Delivered(response)


async def test_stream_reads_ahead_only_a_bounded_number_of_frames() -> None:
    """While a frame is being processed the servicer reads at most stream_queue_frames (+1 waiting) ahead."""
    processor = _BlockedProcessor()
    servicer = ImageProcessingServicer(processor, stream_queue_frames=2)  # type: ignore[arg-type]
    pulled = 0

    async def requests() -> AsyncIterator[Parted[pb.StreamProcessRequest]]:
        nonlocal pulled
        pulled += 1
        yield Parted(pb.StreamProcessRequest(config=pb.StreamConfig()), None)
        for sequence in range(100):
            pulled += 1
            frame = pb.Frame(sequence=sequence, image=_png(noise(2, 2, 1)))
            yield Parted(pb.StreamProcessRequest(frame=frame), None)

    stream = servicer.StreamProcess(requests(), CallContext())  # type: ignore[arg-type]
    first = asyncio.ensure_future(anext(stream))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not first.done()
    assert pulled <= 1 + 1 + 2 + 1
    processor.release.set()
    reply = await first
    assert isinstance(reply, pb.StreamProcessResponse)  # encoded (not RAW): a plain message
    assert reply.result.width == 1
    responses = [first.result(), *[r async for r in stream]]
    assert [r.sequence for r in responses if isinstance(r, pb.StreamProcessResponse)] == list(range(100))


async def test_too_many_queued_pipelines_are_resource_exhausted() -> None:
    """Beyond max_pending pipelines waiting for the backend, a call is refused with RESOURCE_EXHAUSTED."""
    processor = Processor(CpuBackend(), store=None, limits=LIMITS, workers=1, max_pending=2)
    image = noise(600, 600, 3)
    steps = [step for step in steps_from_proto([_step("median", ksize=5)] * 8)]
    try:
        results = await asyncio.gather(
            *(processor.run(image, steps) for _ in range(6)), return_exceptions=True
        )
    finally:
        processor.close()
    refused = [r for r in results if isinstance(r, errors.ResourceExhausted)]
    assert len(refused) == 4
    assert all(r.retry_after_seconds for r in refused)


async def test_a_stream_left_open_ends_unavailable_when_stopping_after_answering_the_frames_it_read() -> None:
    """When the service stops, a stream reads no more frames, answers those it has read, then ends UNAVAILABLE
    (``RESTARTING``) so that the client reopens it elsewhere; it does not hold the drain for the grace."""
    processor = _BlockedProcessor()
    stopping = asyncio.Event()
    servicer = ImageProcessingServicer(processor, stream_queue_frames=2, stopping=stopping)  # type: ignore[arg-type]
    held_open = asyncio.Event()

    async def requests() -> AsyncIterator[Parted[pb.StreamProcessRequest]]:
        yield Parted(pb.StreamProcessRequest(config=pb.StreamConfig()), None)
        for sequence in (1, 2):
            frame = pb.Frame(sequence=sequence, image=_png(noise(2, 2, 1)))
            yield Parted(pb.StreamProcessRequest(frame=frame), None)
        await held_open.wait()  # the client neither sends nor ends the stream

    stream = servicer.StreamProcess(requests(), CallContext())  # type: ignore[arg-type]
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    stopping.set()
    processor.release.set()
    answered = [await first]
    try:
        with pytest.raises(errors.Unavailable) as info:
            async with asyncio.timeout(5):
                async for reply in stream:
                    answered.append(reply)
    finally:
        held_open.set()  # nothing of the test is left waiting for the garbage collector to find
    assert info.value.message == RESTARTING
    assert [r.sequence for r in answered if isinstance(r, pb.StreamProcessResponse)] == [1, 2]


async def test_the_drain_does_not_wait_for_a_stream_the_client_keeps_open() -> None:
    """Over a real server with a 20 s grace: a client holding StreamProcess open gets UNAVAILABLE as soon as the
    service stops, and the service stops within a second (it waited out the grace before)."""
    settings = ImageSettings(grpc_port=0, http_port=0, grace_seconds=20, health_interval_seconds=0.05)
    processor = Processor(CpuBackend(), store=None, limits=LIMITS)
    runtime = ServiceRuntime("image-processing", settings, service_names=[SERVICE_NAME])
    add_to_server(ImageProcessingServicer(processor, stopping=runtime.stopping), runtime.server)
    task = asyncio.create_task(runtime.run())
    await asyncio.wait_for(runtime.started.wait(), 10)
    held_open = asyncio.Event()
    config = pb.StreamConfig(
        pipeline=[_step("invert")], output=pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_PNG)
    )

    async def requests() -> AsyncIterator[pb.StreamProcessRequest]:
        for message in _frames(config, [_png(noise(8, 8, 3))]):
            yield message
        await held_open.wait()

    try:
        async with grpc.aio.insecure_channel(f"localhost:{runtime.grpc_port}") as channel:
            call = pb_grpc.ImageProcessingServiceStub(channel).StreamProcess(requests())
            reply = await call.read()
            assert isinstance(reply, pb.StreamProcessResponse)
            assert reply.sequence == 1
            assert not reply.HasField("error")
            started = asyncio.get_running_loop().time()
            runtime.stopping.set()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 5)
            await asyncio.wait_for(task, 30)
            stopped = asyncio.get_running_loop().time() - started
            held_open.set()  # the client's sending task ends with its call, not with the garbage collector
            await asyncio.sleep(0.05)
    finally:
        held_open.set()
        processor.close()
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAVAILABLE, RESTARTING)
    assert stopped < 5  # it waited out its 20 s grace


@pytest.mark.parametrize(
    ("message", "said", "field"),
    [
        (pb.StreamProcessRequest(config=pb.StreamConfig()), "a second config", "config"),
        (pb.StreamProcessRequest(), "an empty message", "frame"),
    ],
    ids=["second-config", "empty"],
)
async def test_a_message_after_the_config_that_is_not_a_frame_is_answered_saying_what_it_is(
    served: Served, message: pb.StreamProcessRequest, said: str, field: str
) -> None:
    """A second config, or an empty message, after the config gets an error response saying that every later
    message must be a frame and what this one was (an empty one was told "only the first message may be a
    config"); the stream goes on."""

    async def requests() -> AsyncIterator[pb.StreamProcessRequest]:
        yield pb.StreamProcessRequest(config=pb.StreamConfig())
        yield message
        yield pb.StreamProcessRequest(frame=pb.Frame(sequence=2, image=_png(noise(4, 4, 1))))

    responses = [r async for r in served.stub.StreamProcess(requests())]
    error = errors.from_status(responses[0].error)
    assert error.message == f"each message after the config must be a frame; this one is {said}"
    assert error.field_violations[0].field == field
    assert responses[1].sequence == 2
    assert not responses[1].HasField("error")
