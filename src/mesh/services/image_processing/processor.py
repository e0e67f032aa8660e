"""The service core behind ProcessImage, StreamProcess and jobs: load, run on the backend, deliver.

It speaks the protobuf messages of the contract but no gRPC: the file service is reached through the small
:class:`ImageStore` port (the real one is :class:`mesh.services.file.client.FileClient`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Histogram

from mesh.common.v1 import image_pb2
from mesh.file.v1 import file_service_pb2
from mesh.image.v1 import image_processing_service_pb2 as pb
from mesh.kit import errors, tracing
from mesh.kit.image_bytes import check_declared_format
from mesh.kit.image_limits import check_pixels
from mesh.kit.labels import label_violations
from mesh.kit.param_values import to_param_value
from mesh.kit.raw_pixels import read_raw
from mesh.kit.settings import MAX_MESSAGE_BYTES
from mesh.services.image_processing import codec
from mesh.services.image_processing.backend import Backend, PipelineOutput, run_pipeline
from mesh.services.image_processing.filter_math import Image
from mesh.services.image_processing.params import ParamType
from mesh.services.image_processing.registry import FILTERS, Device, Step

STEP_SECONDS = Histogram(
    "mesh_image_step_seconds",
    "Time of one pipeline step (device time on the GPU).",
    ["filter", "device"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PIXELS = Counter("mesh_image_pixels_total", "Input pixels processed by pipelines.", ["device"])
PIPELINES_REJECTED = Counter(
    "mesh_image_pipelines_rejected_total", "Pipelines refused because too many were queued.", ["device"]
)
_tracer = tracing.tracer(__name__)

DEVICES = {Device.CPU: image_pb2.DEVICE_CPU, Device.GPU: image_pb2.DEVICE_GPU}
PARAM_TYPES = {
    ParamType.INT: pb.PARAM_TYPE_INT,
    ParamType.FLOAT: pb.PARAM_TYPE_FLOAT,
    ParamType.BOOL: pb.PARAM_TYPE_BOOL,
    ParamType.ENUM: pb.PARAM_TYPE_ENUM,
}
FORMATS = {
    image_pb2.IMAGE_FORMAT_UNSPECIFIED: codec.Format.PNG,
    image_pb2.IMAGE_FORMAT_PNG: codec.Format.PNG,
    image_pb2.IMAGE_FORMAT_JPEG: codec.Format.JPEG,
    image_pb2.IMAGE_FORMAT_WEBP: codec.Format.WEBP,
    image_pb2.IMAGE_FORMAT_RAW: codec.Format.RAW,
}
FORMAT_ENUMS = {
    codec.Format.PNG: image_pb2.IMAGE_FORMAT_PNG,
    codec.Format.JPEG: image_pb2.IMAGE_FORMAT_JPEG,
    codec.Format.WEBP: image_pb2.IMAGE_FORMAT_WEBP,
}
REPLY_HEADROOM_BYTES = 64 * 1024
"""Room left in a reply for everything but the image: sizes, device, step timings, a stream's sequence."""


@dataclass(frozen=True)
class Delivered:
    """A finished pipeline's response. A RAW output's samples stay beside it, a view of the result's own
    memory, for the servicer to append when the reply is serialised (``mesh.kit.wire``): copied into the
    message they would be copied three more times on the way out."""

    response: pb.ProcessImageResponse
    pixels: memoryview | None = None


class ImageStore(Protocol):
    """The part of the file service the processor uses."""

    async def download(self, image_id: str) -> tuple[file_service_pb2.Image, str, bytes]:
        """Metadata, content type and bytes of a stored image."""
        ...

    async def upload(
        self,
        data: bytes,
        *,
        filename: str,
        content_type: str = "",
        labels: Mapping[str, str] | None = None,
        idempotency_key: str = "",
    ) -> file_service_pb2.UploadImageResponse:
        """Store bytes as a new image."""
        ...


def filter_catalogue(device: Device) -> pb.ListFiltersResponse:
    """Every filter as a FilterSpec."""
    response = pb.ListFiltersResponse(device=DEVICES[device])
    for definition in FILTERS.values():
        spec = response.filters.add(
            name=definition.name,
            description=definition.description,
            devices=[DEVICES[d] for d in definition.devices],
            output_channels=definition.output_channels,
            tolerance=definition.tolerance.describe(),
        )
        for param in definition.params:
            item = spec.params.add(
                name=param.name,
                type=PARAM_TYPES[param.type],
                description=param.description,
                default_value=to_param_value(param.default),
                step=param.step,
                options=list(param.options),
            )
            if param.min is not None:
                item.min = param.min
            if param.max is not None:
                item.max = param.max
    return response


class Processor:
    """Loads images, runs pipelines on the backend off the event loop, and delivers the output."""

    def __init__(
        self,
        backend: Backend,
        *,
        store: ImageStore | None,
        limits: codec.Limits,
        workers: int = 2,
        max_pending: int = 32,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        """``max_message_bytes``: the server's gRPC send limit (``settings.max_message_bytes``, whose default
        this is); a reply whose image would not fit is refused here with a message that says what to ask
        for, where gRPC would fail the call without one."""
        self.backend = backend
        self.store = store
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        # At 0 from the start, so that rate() sees the first refusal (the shedding alert).
        PIPELINES_REJECTED.labels(backend.device.value)
        self._max_pending = max_pending
        self._pending = 0
        # The GPU backend owns one stream and its staging buffers: one pipeline at a time keeps them safe.
        size = 1 if backend.device is Device.GPU else workers
        self._executor = ThreadPoolExecutor(
            max_workers=size, thread_name_prefix=f"{backend.device.value}-pipeline"
        )

    @property
    def device_enum(self) -> image_pb2.Device.ValueType:
        return DEVICES[self.backend.device]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _require_store(self, where: str) -> ImageStore:
        if self.store is None:
            raise errors.FailedPrecondition(
                "this server has no file service configured",
                field_violations=[errors.FieldViolation(where, "needs the file service")],
            )
        return self.store

    def check_output(self, spec: pb.OutputSpec, where: str = "output") -> codec.Format:
        """The output format ``spec`` asks for, or INVALID_ARGUMENT naming every problem in it.

        Checked before the input is loaded or a step runs (and once per stream, at its config), so that a
        spec that can never be delivered costs nothing and a stream is refused once, not frame by frame.
        """
        fmt = FORMATS.get(spec.format)
        violations = []
        if fmt is None:
            violations.append(
                errors.FieldViolation(
                    f"{where}.format", f"{spec.format} names no format; PNG, JPEG, WebP or RAW"
                )
            )
        if spec.quality > 100:
            violations.append(
                errors.FieldViolation(
                    f"{where}.quality", f"must be between 1 and 100 (0: 90), got {spec.quality}"
                )
            )
        if spec.store and fmt is codec.Format.RAW:
            violations.append(
                errors.FieldViolation(f"{where}.format", "stored outputs are PNG, JPEG or WebP, not RAW")
            )
        if spec.store:
            self._require_store(f"{where}.store")
        violations.extend(label_violations(spec.labels, f"{where}.labels"))
        if violations:
            raise errors.InvalidArgument(
                f"invalid output: {errors.listing(violations)}", field_violations=violations
            )
        assert fmt is not None
        return fmt

    async def load(
        self, source: image_pb2.ImageInput, where: str = "input", raw_pixels: memoryview | None = None
    ) -> Image:
        """The input's pixels, by reference or by value (``raw_pixels``: a raw input's samples, received
        beside the message rather than in it; see ``mesh.kit.wire.Parted``)."""
        kind = source.WhichOneof("source")
        if kind == "image_id":
            _, _, data = await self._require_store(f"{where}.image_id").download(source.image_id)
            return await asyncio.to_thread(codec.decode, data, self.limits, f"{where}.image_id")
        if kind == "encoded":
            check_declared_format(source.encoded.format, source.encoded.data, f"{where}.encoded")
            return await asyncio.to_thread(
                codec.decode, source.encoded.data, self.limits, f"{where}.encoded.data"
            )
        if kind == "raw":
            return read_raw(
                source.raw,
                pixels=raw_pixels,
                max_pixels=self.limits.max_pixels,
                max_bytes=self.limits.max_bytes,
                field=f"{where}.raw",
            )
        raise errors.InvalidArgument(
            f"no input image: set one of {where}.image_id, {where}.encoded or {where}.raw",
            field_violations=[errors.FieldViolation(where, "set image_id, encoded or raw")],
        )

    async def run(self, image: Image, steps: Sequence[Step]) -> PipelineOutput:
        """Run a pipeline on the backend in its worker thread (no hop at all for an empty pipeline)."""
        if not steps:
            return PipelineOutput(image, (), 0.0)
        loop = asyncio.get_running_loop()
        with self._admitted():
            output = await loop.run_in_executor(self._executor, run_pipeline, self.backend, image, steps)
        device = self.backend.device.value
        PIXELS.labels(device).inc(image.shape[0] * image.shape[1])
        for name, seconds in output.timings:
            STEP_SECONDS.labels(name, device).observe(seconds)
        return output

    async def run_steps(
        self, image: Image, steps: Sequence[Step], on_step: Callable[[int, Step, float], Awaitable[None]]
    ) -> Image:
        """Run a pipeline step by step (the image stays on the device), awaiting ``on_step`` after each."""
        loop = asyncio.get_running_loop()
        with self._admitted():
            session = await loop.run_in_executor(self._executor, self.backend.start, image)
            device = self.backend.device.value
            PIXELS.labels(device).inc(image.shape[0] * image.shape[1])
            for index, step in enumerate(steps):
                seconds = await loop.run_in_executor(self._executor, session.apply, step)
                STEP_SECONDS.labels(step.filter, device).observe(seconds)
                await on_step(index, step, seconds)
            return await loop.run_in_executor(self._executor, session.result)

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Bound the pipelines waiting for or on the backend; beyond it callers get RESOURCE_EXHAUSTED."""
        if self._pending >= self._max_pending:
            PIPELINES_REJECTED.labels(self.backend.device.value).inc()
            raise errors.ResourceExhausted(
                f"{self._pending} pipelines are already queued on the {self.backend.device.value} backend",
                retry_after_seconds=0.5,
            )
        self._pending += 1
        try:
            yield
        finally:
            self._pending -= 1

    async def deliver(
        self,
        output: PipelineOutput,
        spec: pb.OutputSpec,
        where: str = "output",
        into: pb.ProcessImageResponse | None = None,
    ) -> Delivered:
        """The response for a finished pipeline: encoded, raw (its samples beside the message) or stored.

        ``into`` is filled in place when given (a message nested in a stream response), because copying a
        nested message of megabytes re-serialises it.
        """
        image = output.image
        height, width, channels = image.shape
        check_pixels(width, height, self.limits.max_pixels, "pipeline output")
        fmt = self.check_output(spec, where)
        quality = spec.quality or 90
        response = pb.ProcessImageResponse() if into is None else into
        response.device = self.device_enum
        response.width, response.height = width, height
        response.channels = codec.encoded_channels(channels, fmt)
        response.timings.extend(
            pb.StepTiming(filter=name, seconds=seconds) for name, seconds in output.timings
        )
        if fmt is codec.Format.RAW:
            self._check_reply_size(image.nbytes, width, height, fmt, where)
            response.raw.width = width
            response.raw.height = height
            response.raw.channels = channels
            response.raw.pixel_type = (
                image_pb2.PIXEL_TYPE_UINT16 if image.dtype.itemsize == 2 else image_pb2.PIXEL_TYPE_UINT8
            )
            return Delivered(response, codec.raw_samples(image))
        data = await asyncio.to_thread(codec.encode, image, fmt, quality, f"{where}.format")
        if spec.store:
            stored = await self._require_store(f"{where}.store").upload(
                data,
                filename=f"processed.{fmt.value}",
                content_type=codec.CONTENT_TYPES[fmt],
                labels=dict(spec.labels),
            )
            response.image_id = stored.image.id
        else:
            self._check_reply_size(len(data), width, height, fmt, where)
            response.encoded.data = data
            response.encoded.format = FORMAT_ENUMS[fmt]
        return Delivered(response)

    def _check_reply_size(self, size: int, width: int, height: int, fmt: codec.Format, where: str) -> None:
        """PAYLOAD_TOO_LARGE naming ``where`` when an image of ``size`` bytes cannot travel in a reply."""
        limit = self.max_message_bytes - REPLY_HEADROOM_BYTES
        if size <= limit:
            return
        remedies = ["a smaller image (a resize or crop step)"]
        if fmt is codec.Format.RAW:
            remedies.append("an encoded format (PNG, JPEG or WebP)")
        else:
            remedies.append("JPEG or WebP at a lower quality")
        if self.store is not None:
            remedies.append(f"{where}.store (PNG, JPEG or WebP), answered by the stored image's id")
        description = (
            f"the {width}x{height} output is {size} bytes as {fmt.name}, more than the {limit} bytes a reply "
            f"can carry (the {self.max_message_bytes}-byte message limit less room for the rest); ask for "
            + ", or ".join(remedies)
        )
        raise errors.PayloadTooLarge(
            f"{where}: {description}", field_violations=[errors.FieldViolation(where, description)]
        )

    async def process(
        self,
        source: image_pb2.ImageInput,
        steps: Sequence[Step],
        spec: pb.OutputSpec,
        where: str = "input",
        into: pb.ProcessImageResponse | None = None,
        raw_pixels: memoryview | None = None,
        output_where: str = "output",
    ) -> Delivered:
        """Load, run and deliver one image, each stage in a span of its own (``into``: see deliver;
        ``raw_pixels``: see load; ``where`` and ``output_where`` name the input and the spec in errors)."""
        self.check_output(spec, output_where)
        with _tracer.start_as_current_span(
            "image.load", attributes={"image.source": source.WhichOneof("source") or ""}
        ):
            image = await self.load(source, where, raw_pixels)
        attributes = {
            "image.device": self.backend.device.value,
            "image.steps": ",".join(step.filter for step in steps),
            "image.pixels": int(image.shape[0] * image.shape[1]),
        }
        with _tracer.start_as_current_span("image.pipeline", attributes=attributes):
            output = await self.run(image, steps)
        with _tracer.start_as_current_span("image.deliver", attributes={"image.store": spec.store}):
            return await self.deliver(output, spec, output_where, into=into)
