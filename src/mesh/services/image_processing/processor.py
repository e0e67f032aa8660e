"""The service core behind ProcessImage, StreamProcess and jobs: load, run on the backend, deliver.

It speaks the protobuf messages of the contract but no gRPC: the file service is reached through the small
:class:`ImageStore` port (the real one is :class:`mesh.services.file.client.FileClient`), each call within the
settings' ``rpc_timeout_seconds`` and the caller's deadline.

A request's input is read to its header, the sizes of every step's output are worked out from the
parameters (each bounded by the pixel limit), and only then is it admitted (:mod:`.admission`, by the most
memory it will hold at once: :func:`weigh`) and decoded.
Decoding and encoding run in a bounded thread pool of their own, pipelines in the backend's: asyncio's
default pool stays free for the rest of the process (the health checks, above all).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, Protocol, TypeVar

from prometheus_client import Counter, Histogram

from mesh.common.v1 import image_pb2
from mesh.file.v1 import file_service_pb2
from mesh.image.v1 import image_processing_service_pb2 as pb
from mesh.kit import errors, tracing
from mesh.kit.deadlines import call_timeout
from mesh.kit.image_bytes import check_declared_format
from mesh.kit.image_limits import check_pixels
from mesh.kit.labels import label_violations
from mesh.kit.param_values import to_param_value
from mesh.kit.raw_pixels import read_raw
from mesh.kit.settings import MAX_MESSAGE_BYTES
from mesh.services.file.ids import parse_image_id
from mesh.services.image_processing import codec
from mesh.services.image_processing.admission import Admission, Ticket
from mesh.services.image_processing.backend import Backend, PipelineOutput, run_pipeline
from mesh.services.image_processing.filter_math import Image, PlannedStep, plan_steps
from mesh.services.image_processing.params import ParamType
from mesh.services.image_processing.registry import FILTERS, Device, Step, runs_on_host

STEP_SECONDS = Histogram(
    "mesh_image_step_seconds",
    "Time of one pipeline step (device time on the GPU).",
    ["filter", "device"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PIXELS = Counter("mesh_image_pixels_total", "Input pixels processed by pipelines.", ["device"])
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
DEFAULT_MEMORY_BUDGET_BYTES = 1024**3
"""``settings.image_memory_budget_bytes``'s default (see there)."""

P = ParamSpec("P")
T = TypeVar("T")


def nothing_to_release() -> None:
    """The release of a reply that holds no admission (a stream frame's error)."""


@dataclass(frozen=True)
class Delivered:
    """A finished pipeline's response. A RAW output's samples stay beside it, a view of the result's own
    memory, for the servicer to append when the reply is serialised (``mesh.kit.wire``): copied into the
    message they would be copied three more times on the way out."""

    response: pb.ProcessImageResponse
    pixels: memoryview | None = None
    release: Callable[[], None] = nothing_to_release
    """Gives the request's admission back: call it once the reply is serialised (or will not be)."""


@dataclass(frozen=True)
class Input:
    """An input image whose size is known (from its header, or a raw image's message) but that is not
    decoded yet: what admission weighs."""

    height: int
    width: int
    channels: int
    itemsize: int
    where: str
    encoded: bytes = b""
    header: codec.Header | None = None
    pixels: Image | None = None
    """A raw input's samples, ready as they are."""
    inline: bool = False
    """Whether the encoded file came in the request's message, which keeps a copy of its own (reading the
    field copies it) until the call ends."""

    @property
    def nbytes(self) -> int:
        """Bytes of its decoded pixels."""
        return self.height * self.width * self.channels * self.itemsize

    @property
    def encoded_bytes(self) -> int:
        """Bytes of the encoded file, held until the request ends: twice when it came inline (0 for a raw input,
        whose samples are the decoded pixels)."""
        if self.pixels is not None:
            return 0
        return len(self.encoded) * (2 if self.inline else 1)

    @property
    def carried(self) -> int:
        """Bytes it holds as received, while it waits for admission: the encoded file or the raw samples."""
        return len(self.encoded) if self.pixels is None else self.pixels.nbytes

    @classmethod
    def of_image(cls, image: Image, where: str = "input") -> Input:
        height, width, channels = image.shape
        return cls(height, width, channels, image.dtype.itemsize, where, pixels=image)

    @classmethod
    def of_encoded(cls, data: bytes, limits: codec.Limits, where: str, *, inline: bool = False) -> Input:
        header = codec.probe(data, limits, where)
        return cls(
            header.height, header.width, header.channels, header.itemsize, where, data, header, inline=inline
        )


class ImageStore(Protocol):
    """The part of the file service the processor uses."""

    async def download(
        self, image_id: str, *, timeout: float | None = None
    ) -> tuple[file_service_pb2.Image, str, bytes]:
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
        timeout: float | None = None,
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
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        rpc_timeout_seconds: float = 30.0,
    ) -> None:
        """``max_message_bytes``: the server's gRPC send limit (``settings.max_message_bytes``, whose default
        this is); a reply whose image would not fit is refused here with a message that says what to ask
        for, where gRPC would fail the call without one. ``workers``: pipelines at once on the CPU backend,
        and images decoded or encoded at once on either. ``rpc_timeout_seconds``: the longest wait for the
        file service (``settings.rpc_timeout_seconds``, whose default this is)."""
        self.backend = backend
        self.store = store
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        self.rpc_timeout_seconds = rpc_timeout_seconds
        self.admission = Admission(
            device=backend.device.value, max_pending=max_pending, memory_budget_bytes=memory_budget_bytes
        )
        # The GPU backend owns one stream and its staging buffers: one pipeline at a time keeps them safe.
        size = 1 if backend.device is Device.GPU else workers
        self._executor = ThreadPoolExecutor(
            max_workers=size, thread_name_prefix=f"{backend.device.value}-pipeline"
        )
        self._codec = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-codec")

    @property
    def device_enum(self) -> image_pb2.Device.ValueType:
        return DEVICES[self.backend.device]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._codec.shutdown(wait=False, cancel_futures=True)

    def store_timeout(self, deadline: float | None = None) -> float:
        """The timeout of a file service call made for a caller whose deadline is ``deadline``."""
        return call_timeout(self.rpc_timeout_seconds, deadline)

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

    async def open_input(
        self,
        source: image_pb2.ImageInput,
        where: str = "input",
        raw_pixels: memoryview | None = None,
        deadline: float | None = None,
    ) -> Input:
        """The input, by reference or by value, read as far as its size (``raw_pixels``: a raw input's
        samples, received beside the message rather than in it; see ``mesh.kit.wire.Parted``)."""
        kind = source.WhichOneof("source")
        if kind == "image_id":
            field = f"{where}.image_id"
            # Checked here, so that a malformed id is named as this request's field and never sent on.
            parse_image_id(source.image_id, field)
            store = self._require_store(field)
            _, _, data = await store.download(source.image_id, timeout=self.store_timeout(deadline))
            return Input.of_encoded(data, self.limits, field)
        if kind == "encoded":
            check_declared_format(source.encoded.format, source.encoded.data, f"{where}.encoded")
            return Input.of_encoded(source.encoded.data, self.limits, f"{where}.encoded.data", inline=True)
        if kind == "raw":
            pixels = read_raw(
                source.raw,
                pixels=raw_pixels,
                max_pixels=self.limits.max_pixels,
                max_bytes=self.limits.max_bytes,
                field=f"{where}.raw",
            )
            return Input.of_image(pixels, f"{where}.raw")
        raise errors.InvalidArgument(
            f"no input image: set one of {where}.image_id, {where}.encoded or {where}.raw",
            field_violations=[errors.FieldViolation(where, "set image_id, encoded or raw")],
        )

    async def admit(
        self,
        source: Input,
        steps: Sequence[Step],
        deadline: float | None = None,
        output: codec.Format | None = None,
    ) -> Ticket:
        """Admission for ``source`` through ``steps``, delivered as ``output`` (None: as pixels), before
        anything is decoded or run: a pipeline with a step whose output would be over the pixel limit is
        refused here, and the request waits (within ``deadline``) for the most memory it will hold at once
        (:func:`weigh`)."""
        shape = (source.height, source.width, source.channels)
        planned = plan_steps(shape, source.itemsize, steps, self.limits.max_pixels)
        weight = weigh(source, planned, self.backend.device, output)
        return await self.admission.admit(weight.nbytes, weight.what, deadline, carried=source.carried)

    async def _offload(
        self,
        executor: ThreadPoolExecutor,
        ticket: Ticket,
        fn: Callable[P, T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``fn`` in ``executor``; the ticket's share stays taken until it has really ended, even when the
        caller stops waiting for it (a thread cannot be stopped: a pipeline sees ``ticket.cancel``)."""
        future = executor.submit(fn, *args, **kwargs)
        ticket.track(future)
        return await asyncio.wrap_future(future)

    async def _decode(self, source: Input, ticket: Ticket) -> Image:
        if source.pixels is not None:
            return source.pixels
        return await self._offload(
            self._codec, ticket, codec.decode, source.encoded, self.limits, source.where, source.header
        )

    async def run(self, image: Image, steps: Sequence[Step], deadline: float | None = None) -> PipelineOutput:
        """Admit and run a pipeline on an image already in memory."""
        ticket = await self.admit(Input.of_image(image), steps, deadline)
        try:
            return await self._run(image, steps, ticket)
        finally:
            ticket.release()

    async def _run(self, image: Image, steps: Sequence[Step], ticket: Ticket) -> PipelineOutput:
        """Run a pipeline on the backend in its worker thread (no hop at all for an empty pipeline)."""
        if not steps:
            return PipelineOutput(image, (), 0.0)
        output = await self._offload(
            self._executor, ticket, run_pipeline, self.backend, image, steps, ticket.cancel
        )
        device = self.backend.device.value
        PIXELS.labels(device).inc(image.shape[0] * image.shape[1])
        for name, seconds in output.timings:
            STEP_SECONDS.labels(name, device).observe(seconds)
        return output

    async def transform(
        self,
        data: bytes,
        steps: Sequence[Step],
        on_step: Callable[[int, Step, float], Awaitable[None]],
        *,
        where: str = "job.image_id",
        fmt: codec.Format = codec.Format.PNG,
    ) -> bytes:
        """Encoded bytes through a pipeline step by step (the image stays on the device), awaiting
        ``on_step`` after each, and encoded again: a job's work, admitted as a request's is."""
        source = Input.of_encoded(data, self.limits, where)
        ticket = await self.admit(source, steps, output=fmt)
        try:
            image = await self._decode(source, ticket)
            session = await self._offload(self._executor, ticket, self.backend.start, image)
            device = self.backend.device.value
            PIXELS.labels(device).inc(image.shape[0] * image.shape[1])
            for index, step in enumerate(steps):
                seconds = await self._offload(self._executor, ticket, session.apply, step)
                STEP_SECONDS.labels(step.filter, device).observe(seconds)
                await on_step(index, step, seconds)
            output = await self._offload(self._executor, ticket, session.result)
            return await self._offload(self._codec, ticket, codec.encode, output, fmt)
        finally:
            ticket.release()

    async def _deliver(
        self,
        output: PipelineOutput,
        spec: pb.OutputSpec,
        where: str,
        into: pb.ProcessImageResponse | None,
        ticket: Ticket,
        deadline: float | None,
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
            return Delivered(response, codec.raw_samples(image), ticket.release)
        data = await self._offload(self._codec, ticket, codec.encode, image, fmt, quality, f"{where}.format")
        if spec.store:
            stored = await self._require_store(f"{where}.store").upload(
                data,
                filename=f"processed.{fmt.value}",
                content_type=codec.CONTENT_TYPES[fmt],
                labels=dict(spec.labels),
                timeout=self.store_timeout(deadline),
            )
            response.image_id = stored.image.id
        else:
            self._check_reply_size(len(data), width, height, fmt, where)
            response.encoded.data = data
            response.encoded.format = FORMAT_ENUMS[fmt]
        return Delivered(response, release=ticket.release)

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
        deadline: float | None = None,
    ) -> Delivered:
        """Load, run and deliver one image, each stage in a span of its own (``into``: see deliver;
        ``raw_pixels``: see open_input; ``where`` and ``output_where`` name the input and the spec in errors;
        ``deadline``: the caller's, a ``time.monotonic()`` instant). The caller calls ``release`` on what
        it gets once the reply is serialised."""
        fmt = self.check_output(spec, output_where)
        with tracing.internal_span(
            _tracer, "image.load", attributes={"image.source": source.WhichOneof("source") or ""}
        ):
            opened = await self.open_input(source, where, raw_pixels, deadline)
            ticket = await self.admit(opened, steps, deadline, fmt)
            try:
                image = await self._decode(opened, ticket)
            except BaseException:
                ticket.release()
                raise
        attributes = {
            "image.device": self.backend.device.value,
            "image.steps": ",".join(step.filter for step in steps),
            "image.pixels": int(image.shape[0] * image.shape[1]),
        }
        try:
            with tracing.internal_span(_tracer, "image.pipeline", attributes=attributes):
                output = await self._run(image, steps, ticket)
            with tracing.internal_span(_tracer, "image.deliver", attributes={"image.store": spec.store}):
                return await self._deliver(output, spec, output_where, into, ticket, deadline)
        except BaseException:
            ticket.release()
            raise


@dataclass(frozen=True)
class Weight:
    """The most host memory a request will hold at once, and what holds it then (for a refusal's message)."""

    nbytes: int
    what: str


def weigh(
    source: Input, planned: Sequence[PlannedStep], device: Device, output: codec.Format | None = None
) -> Weight:
    """Admission's weight of ``source`` through the ``planned`` steps on ``device``, delivered as ``output``
    (None: handed to the caller as pixels): its heaviest stage, plus the encoded file it came in, which is
    held throughout.

    Decoding holds the codec's copies (:func:`decoding_bytes`). The decoded input is kept until the reply is
    made (the caller holds it), so every later stage holds it besides its own images. On the CPU a step holds
    its input, its output and its filter's working memory (``PlannedStep.nbytes``). On the GPU a step that runs
    on the device holds no host memory (the device's pool has a bound of its own, ``gpu_memory_limit_bytes``),
    and one whose CPU code runs on a host copy (:func:`runs_on_host`) what it holds on the CPU; the pinned
    staging buffer is the backend's, not a request's. Last, the result is delivered beside the input
    (:func:`delivery_bytes`).
    """
    described = (
        f"the {source.width}x{source.height} input ({source.channels} channels of {source.itemsize * 8} bits)"
    )
    heaviest = Weight(source.nbytes, described)
    if source.pixels is None:
        heaviest = Weight(decoding_bytes(source), f"{described} while it is decoded")
    for position, planned_step in enumerate(planned):
        if device is Device.GPU and not runs_on_host(planned_step.step):
            continue
        kept = source.nbytes if position or device is Device.GPU else 0
        if kept + planned_step.nbytes > heaviest.nbytes:
            heaviest = Weight(kept + planned_step.nbytes, f"{described} at {_holding(planned_step, kept)}")
    result = planned[-1].images.after if planned else (source.height, source.width, source.channels)
    delivered = delivery_bytes(source, result, output, copied=bool(planned))
    if delivered > heaviest.nbytes:
        height, width, channels = result
        heaviest = Weight(delivered, f"{described} when its {width}x{height}x{channels} result is delivered")
    if source.encoded_bytes:
        return Weight(
            heaviest.nbytes + source.encoded_bytes,
            f"{heaviest.what}, with {source.encoded_bytes} bytes of the file it came in,",
        )
    return heaviest


def _holding(planned: PlannedStep, kept: int) -> str:
    """What a step holds, in a refusal's words."""
    images = planned.images
    before = "x".join(str(side) for side in (images.before[1], images.before[0], images.before[2]))
    after = "x".join(str(side) for side in (images.after[1], images.after[0], images.after[2]))
    text = (
        f"pipeline[{planned.step.index}] ({planned.step.filter}: its {before} input, {after} output and "
        f"{planned.working_bytes} bytes of working memory"
    )
    return text + ", besides the decoded input)" if kept else text + ")"


def decoding_bytes(source: Input) -> int:
    """What :func:`codec.decode` holds at once: libjpeg-turbo decodes a YCbCr or grey JPEG straight into its
    pixels, OpenCV decodes the rest as BGR(A) and converts them to RGB(A) (two images of the decoded size),
    and an EXIF orientation turns a copy."""
    header = source.header
    direct = header is not None and header.kind == "JPEG" and header.channels in (1, 3)
    turned = header is not None and header.orientation not in (0, 1)
    return source.nbytes * ((1 if direct else 2) + (1 if turned else 0))


PNG_OVERHEAD = 1.01
"""Stored (incompressible) PNG data is at most this many times its samples, plus a few kilobytes of headers."""
LOSSY_BYTES_PER_PIXEL = 3
"""JPEG and WebP of noise at quality 100 take about 2 bytes a pixel (WebP with alpha 2.1): a bound on either."""


def delivery_bytes(
    source: Input, result: tuple[int, int, int], output: codec.Format | None, *, copied: bool
) -> int:
    """What delivering a result of shape ``result`` as ``output`` holds besides the encoded input: the decoded
    input, kept until the reply is made, and the result (the input itself when no step ``copied`` it). RAW
    samples are joined to the serialised reply once the handler has returned (a decoded file is gone by then,
    a raw input's samples are the request's); an encoded reply holds :func:`codec.encode`'s converted copy and
    the encoded bytes twice (the encoder's buffer and its bytes, then those and the reply's copy), whose size
    is not known before: it is bounded by incompressible data."""
    height, width, channels = result
    itemsize = source.itemsize
    result_bytes = height * width * channels * itemsize
    held = source.nbytes + (result_bytes if copied else 0)
    if output is None:
        return held
    if output is codec.Format.RAW:
        request = source.nbytes if source.pixels is not None else 0
        return max(held, request + (result_bytes if copied else 0) + result_bytes)
    if output is codec.Format.PNG:
        converted = result_bytes if channels > 1 else 0
        conversion = converted
        encoded = int(result_bytes * PNG_OVERHEAD) + REPLY_HEADROOM_BYTES
    else:
        # 16-bit samples are shifted (a 16-bit copy) and narrowed before the colour order is swapped.
        converted = height * width * channels
        conversion = result_bytes + converted if itemsize == 2 else converted
        encoded = height * width * LOSSY_BYTES_PER_PIXEL
    return held + max(conversion, converted + 2 * encoded)
