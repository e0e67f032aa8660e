"""In-process fakes of the four services, just real enough for the gateway's tests and benchmark.

They are served by the kit's real ``ServiceRuntime`` (port 0), so the gateway talks real gRPC with real
health, error details and trace propagation; only the services' insides are fake.
"""

# The servicer methods carry the gRPC method names.
# ruff: noqa: N802
from __future__ import annotations

import asyncio
import hashlib
import io
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from PIL import Image as PILImage
from PIL import ImageDraw, ImageOps

from mesh.common.v1 import errors_pb2, image_pb2, params_pb2
from mesh.file.v1 import file_service_pb2 as file_pb
from mesh.file.v1 import file_service_pb2_grpc as file_grpc
from mesh.image.v1 import image_processing_service_pb2 as image_pb
from mesh.image.v1 import image_processing_service_pb2_grpc as image_grpc
from mesh.inference.v1 import inference_service_pb2 as inference_pb
from mesh.inference.v1 import inference_service_pb2_grpc as inference_grpc
from mesh.kit import errors
from mesh.kit.image_bytes import sniff_format
from mesh.queue.v1 import job_pb2
from mesh.queue.v1 import queue_service_pb2 as queue_pb
from mesh.queue.v1 import queue_service_pb2_grpc as queue_grpc

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAMES = (
    "mesh.file.v1.FileService",
    "mesh.image.v1.ImageProcessingService",
    "mesh.inference.v1.InferenceService",
    "mesh.queue.v1.QueueService",
)
_SNIFFED = {
    "PNG": ("image/png", image_pb2.IMAGE_FORMAT_PNG),
    "JPEG": ("image/jpeg", image_pb2.IMAGE_FORMAT_JPEG),
    "WEBP": ("image/webp", image_pb2.IMAGE_FORMAT_WEBP),
}
_PIL_FORMATS = {
    image_pb2.IMAGE_FORMAT_PNG: "PNG",
    image_pb2.IMAGE_FORMAT_JPEG: "JPEG",
    image_pb2.IMAGE_FORMAT_WEBP: "WEBP",
    image_pb2.IMAGE_FORMAT_UNSPECIFIED: "PNG",
}
# ProcessImage with a filter named "raise:<CODE>" fails with that code (for the status mapping tests).
RAISES: dict[str, type[errors.MeshError]] = {
    "INVALID_ARGUMENT": errors.InvalidArgument,
    "NOT_FOUND": errors.NotFound,
    "ALREADY_EXISTS": errors.AlreadyExists,
    "FAILED_PRECONDITION": errors.FailedPrecondition,
    "ABORTED": errors.Aborted,
    "RESOURCE_EXHAUSTED": errors.ResourceExhausted,
    "PAYLOAD_TOO_LARGE": errors.PayloadTooLarge,
    "UNSUPPORTED_MEDIA_TYPE": errors.UnsupportedMediaType,
    "UNAUTHENTICATED": errors.Unauthenticated,
    "PERMISSION_DENIED": errors.PermissionDenied,
    "UNIMPLEMENTED": errors.Unimplemented,
    "UNAVAILABLE": errors.Unavailable,
    "DEADLINE_EXCEEDED": errors.DeadlineExceeded,
    "INTERNAL": errors.Internal,
}
TERMINAL = {
    job_pb2.JOB_STATE_SUCCEEDED,
    job_pb2.JOB_STATE_FAILED,
    job_pb2.JOB_STATE_DEAD,
    job_pb2.JOB_STATE_CANCELLED,
}


def strip_png(width: int = 320, height: int = 80) -> bytes:
    """A synthetic lateral-flow strip with a T line (left) and a C line (right), as PNG bytes."""
    image = PILImage.new("RGB", (width, height), (236, 232, 226))
    draw = ImageDraw.Draw(image)
    for x in (int(width * 0.4), int(width * 0.7)):
        draw.rectangle((x - 3, 10, x + 3, height - 10), fill=(170, 40, 90))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def sniff(data: bytes) -> tuple[str, image_pb2.ImageFormat.ValueType]:
    """The content type and format of PNG, JPEG or WebP bytes, or UnsupportedMediaType."""
    found = sniff_format(data)
    if found is None:
        raise errors.UnsupportedMediaType("the bytes are not a PNG, JPEG or WebP image")
    return _SNIFFED[found]


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


@dataclass
class Stored:
    """One image in the fake file service."""

    image: file_pb.Image
    data: bytes


class FakeFileService(file_grpc.FileServiceServicer):
    """Images in a dict; pagination by offset; downloads in small chunks to exercise streaming."""

    def __init__(self) -> None:
        self.images: dict[str, Stored] = {}
        self.order: list[str] = []
        self.upload_metadata: list[file_pb.UploadMetadata] = []

    def store(self, data: bytes, filename: str = "image.png", content_type: str = "") -> file_pb.Image:
        """Validate like the real service (roughly) and keep the image."""
        real_type, fmt = sniff(data)
        if content_type and content_type != real_type:
            raise errors.UnsupportedMediaType(f"declared {content_type} but the bytes are {real_type}")
        try:
            with PILImage.open(io.BytesIO(data)) as decoded:
                decoded.load()
                width, height, bands = decoded.width, decoded.height, len(decoded.getbands())
        except OSError as error:
            raise errors.InvalidData(f"the image is truncated or corrupt: {error}") from None
        image = file_pb.Image(
            id=str(uuid.uuid4()),
            filename=filename,
            content_type=real_type,
            format=fmt,
            width=width,
            height=height,
            channels=bands,
            bit_depth=8,
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            create_time=_now(),
            has_thumbnail=True,
        )
        self.images[image.id] = Stored(image, data)
        self.order.insert(0, image.id)
        return image

    def _get(self, image_id: str) -> Stored:
        stored = self.images.get(image_id)
        if stored is None:
            raise errors.NotFound(f"no image {image_id}")
        return stored

    async def UploadImage(
        self, request_iterator: AsyncIterator[file_pb.UploadImageRequest], context: Context
    ) -> file_pb.UploadImageResponse:
        metadata = file_pb.UploadMetadata()
        chunks: list[bytes] = []
        ended = False
        async for part in request_iterator:
            if part.HasField("metadata"):
                metadata = part.metadata
            elif part.HasField("end"):
                ended = True
            else:
                chunks.append(part.chunk)
        if not ended:
            # As the real service: a stream without `end` may be a cancelled client's, cut short.
            raise errors.InvalidArgument("the upload stream stopped without `end`")
        self.upload_metadata.append(metadata)
        data = b"".join(chunks)
        sha = hashlib.sha256(data).hexdigest()
        existing = [s for s in self.images.values() if s.image.sha256 == sha]
        image = self.store(data, metadata.filename, metadata.content_type)
        return file_pb.UploadImageResponse(image=image, deduplicated=bool(existing))

    async def CreateImage(
        self, request: file_pb.CreateImageRequest, context: Context
    ) -> file_pb.CreateImageResponse:
        image = self.store(request.data, request.metadata.filename, request.metadata.content_type)
        return file_pb.CreateImageResponse(image=image)

    async def DownloadImage(
        self, request: file_pb.DownloadImageRequest, context: Context
    ) -> AsyncIterator[file_pb.DownloadImageResponse]:
        stored = self._get(request.image_id)
        data, content_type = stored.data, stored.image.content_type
        if request.variant == file_pb.IMAGE_VARIANT_THUMBNAIL:
            # As the real service's: a PNG when the image has alpha, else a JPEG.
            with PILImage.open(io.BytesIO(stored.data)) as decoded:
                alpha = decoded.has_transparency_data
                thumb = ImageOps.contain(decoded.convert("RGBA" if alpha else "RGB"), (256, 256))
            buffer = io.BytesIO()
            thumb.save(buffer, "PNG" if alpha else "JPEG")
            data, content_type = buffer.getvalue(), "image/png" if alpha else "image/jpeg"
        yield file_pb.DownloadImageResponse(image=stored.image, content_type=content_type)
        for start in range(0, len(data), 64 * 1024):
            yield file_pb.DownloadImageResponse(chunk=data[start : start + 64 * 1024])

    async def GetImage(self, request: file_pb.GetImageRequest, context: Context) -> file_pb.GetImageResponse:
        return file_pb.GetImageResponse(image=self._get(request.image_id).image)

    async def ListImages(
        self, request: file_pb.ListImagesRequest, context: Context
    ) -> file_pb.ListImagesResponse:
        size = request.page_size or 50
        if size > 500:
            raise errors.InvalidArgument("page_size must be at most 500")
        try:
            offset = int(request.page_token or "0")
        except ValueError:
            raise errors.InvalidArgument("page_token is not valid") from None
        ids = self.order[offset : offset + size]
        more = offset + size < len(self.order)
        return file_pb.ListImagesResponse(
            images=[self.images[i].image for i in ids], next_page_token=str(offset + size) if more else ""
        )

    async def DeleteImage(
        self, request: file_pb.DeleteImageRequest, context: Context
    ) -> file_pb.DeleteImageResponse:
        stored = self._get(request.image_id)
        del self.images[request.image_id]
        self.order.remove(request.image_id)
        others = any(s.image.sha256 == stored.image.sha256 for s in self.images.values())
        return file_pb.DeleteImageResponse(blob_removed=not others)


class FakeImageService(image_grpc.ImageProcessingServiceServicer):
    """Three filters (grayscale, gaussian_blur, resize) done with Pillow."""

    def __init__(self, files: FakeFileService) -> None:
        self.files = files
        self.device = image_pb2.DEVICE_CPU
        self.last_request: image_pb.ProcessImageRequest | None = None
        self.last_metadata: dict[str, Any] = {}
        self.cancelled = 0  # calls cancelled while a "sleep:<seconds>" step waited

    async def ListFilters(
        self, request: image_pb.ListFiltersRequest, context: Context
    ) -> image_pb.ListFiltersResponse:
        return image_pb.ListFiltersResponse(
            filters=[
                image_pb.FilterSpec(
                    name="grayscale",
                    description="Luma from RGB.",
                    devices=[image_pb2.DEVICE_CPU, image_pb2.DEVICE_GPU],
                    output_channels="1",
                ),
                image_pb.FilterSpec(
                    name="gaussian_blur",
                    description="Gaussian blur.",
                    params=[
                        image_pb.ParamSpec(
                            name="sigma",
                            type=image_pb.PARAM_TYPE_FLOAT,
                            description="Standard deviation in pixels.",
                            default_value=params_pb2.ParamValue(number_value=1.0),
                            min=0.1,
                            max=10.0,
                        ),
                        image_pb.ParamSpec(
                            name="border",
                            type=image_pb.PARAM_TYPE_ENUM,
                            description="Border handling.",
                            default_value=params_pb2.ParamValue(string_value="reflect"),
                            options=["reflect", "constant"],
                        ),
                    ],
                    devices=[image_pb2.DEVICE_CPU],
                    output_channels="same",
                ),
                image_pb.FilterSpec(
                    name="resize",
                    description="Scales the image.",
                    params=[
                        image_pb.ParamSpec(
                            name="scale",
                            type=image_pb.PARAM_TYPE_FLOAT,
                            description="Factor for both sides.",
                            default_value=params_pb2.ParamValue(number_value=1.0),
                            min=0.01,
                            max=16.0,
                        )
                    ],
                    devices=[image_pb2.DEVICE_CPU],
                    output_channels="same",
                ),
            ],
            device=self.device,
        )

    async def ProcessImage(
        self, request: image_pb.ProcessImageRequest, context: Context
    ) -> image_pb.ProcessImageResponse:
        self.last_request = request
        self.last_metadata = dict(context.invocation_metadata() or ())
        for step in request.pipeline:
            if step.filter.startswith("sleep:"):
                try:
                    await asyncio.sleep(float(step.filter.removeprefix("sleep:")))
                except asyncio.CancelledError:
                    self.cancelled += 1
                    raise
            if step.filter.startswith("raise:"):
                code = step.filter.removeprefix("raise:")
                raise RAISES[code](
                    f"fake failure {code}", field_violations=[errors.FieldViolation("pipeline", code)]
                )
        source = request.input.WhichOneof("source")
        if source == "image_id":
            data = self.files._get(request.input.image_id).data
        elif source == "encoded":
            data = request.input.encoded.data
            sniff(data)
        else:
            raise errors.InvalidArgument("input is required")
        _, input_format = sniff(data)
        wanted = request.output.format or image_pb2.IMAGE_FORMAT_PNG
        if not request.pipeline and wanted == input_format:
            # Nothing to do: hand the bytes back (keeps the fake cheap in the gateway benchmark).
            with PILImage.open(io.BytesIO(data)) as header:
                width, height, bands = header.width, header.height, len(header.getbands())
            return image_pb.ProcessImageResponse(
                encoded=image_pb2.EncodedImage(data=data, format=wanted),
                device=self.device,
                width=width,
                height=height,
                channels=bands,
            )
        with PILImage.open(io.BytesIO(data)) as decoded:
            image = _run_steps(decoded.convert("RGB"), request.pipeline)
        buffer = io.BytesIO()
        image.save(buffer, _PIL_FORMATS[request.output.format])
        fmt = request.output.format or image_pb2.IMAGE_FORMAT_PNG
        return image_pb.ProcessImageResponse(
            encoded=image_pb2.EncodedImage(data=buffer.getvalue(), format=fmt),
            timings=[image_pb.StepTiming(filter=s.filter, seconds=0.001) for s in request.pipeline],
            device=self.device,
            width=image.width,
            height=image.height,
            channels=len(image.getbands()),
        )

    async def StreamProcess(
        self, request_iterator: AsyncIterator[image_pb.StreamProcessRequest], context: Context
    ) -> AsyncIterator[image_pb.StreamProcessResponse]:
        config = image_pb.StreamConfig()
        async for part in request_iterator:
            if part.HasField("config"):
                config = part.config
                continue
            single = image_pb.ProcessImageRequest(
                input=part.frame.image, pipeline=config.pipeline, output=config.output
            )
            try:
                result = await self.ProcessImage(single, context)
            except errors.MeshError as error:
                yield image_pb.StreamProcessResponse(sequence=part.frame.sequence, error=error.to_status())
                continue
            yield image_pb.StreamProcessResponse(sequence=part.frame.sequence, result=result)


def _run_steps(image: PILImage.Image, pipeline: Sequence[params_pb2.PipelineStep]) -> PILImage.Image:
    """The fake filters with Pillow: grayscale, resize by ``scale``; gaussian_blur leaves the image as it is."""
    for step in pipeline:
        if step.filter == "grayscale":
            image = image.convert("L")
        elif step.filter == "resize":
            factor = step.params["scale"].number_value if "scale" in step.params else 1.0
            image = image.resize((round(image.width * factor), round(image.height * factor)))
        elif step.filter != "gaussian_blur":
            raise errors.InvalidArgument(
                f"unknown filter {step.filter!r}",
                field_violations=[errors.FieldViolation("pipeline.filter", "not a known filter")],
            )
    return image


def _filtered(data: bytes, pipeline: Sequence[params_pb2.PipelineStep]) -> bytes:
    """A job's filters applied to ``data``, as a PNG."""
    with PILImage.open(io.BytesIO(data)) as image:
        picture = _run_steps(image.convert("RGB"), pipeline)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def strip_reading(width: float, height: float) -> inference_pb.StripReading:
    """A POSITIVE reading with T at 40 % and C at 70 % of the width (where strip_png draws them)."""
    return inference_pb.StripReading(
        verdict=inference_pb.VERDICT_POSITIVE,
        control_line=inference_pb.LineReading(
            present=True,
            position_px=width * 0.7,
            position=0.7,
            intensity=0.6,
            center_x=width * 0.7,
            center_y=height / 2,
        ),
        test_line=inference_pb.LineReading(
            present=True,
            position_px=width * 0.4,
            position=0.4,
            intensity=0.3,
            center_x=width * 0.4,
            center_y=height / 2,
        ),
        t_to_c_ratio=0.5,
        confidence=0.93,
        window=inference_pb.StripGeometry(
            center_x=width / 2, center_y=height / 2, length=width, width=height
        ),
    )


VERSION_STATUS = [
    inference_pb.ModelVersionStatus(version="1", ready=True, state="READY", reason="ready"),
    inference_pb.ModelVersionStatus(
        version="2", ready=False, state="UNAVAILABLE", reason="load failed: RuntimeError: weights are corrupt"
    ),
]
"""The fake model's versions: 1 (the default) serves, 2 failed to load."""


class FakeInferenceService(inference_grpc.InferenceServiceServicer):
    """One model, ``strip-reader``, that always reads POSITIVE (version 1; its version 2 failed to load)."""

    def __init__(self, files: FakeFileService) -> None:
        self.files = files
        self.last_request: inference_pb.PredictRequest | None = None

    def _check(self, name: str) -> None:
        if name != "strip-reader":
            raise errors.NotFound(f"no model {name!r}")

    async def ListModels(
        self, request: inference_pb.ListModelsRequest, context: Context
    ) -> inference_pb.ListModelsResponse:
        return inference_pb.ListModelsResponse(
            models=[
                inference_pb.ModelSummary(
                    name="strip-reader",
                    versions=["1", "2"],
                    default_version="1",
                    ready=True,
                    description="Reads lateral-flow tests.",
                    version_status=VERSION_STATUS,
                )
            ]
        )

    async def GetModelMetadata(
        self, request: inference_pb.GetModelMetadataRequest, context: Context
    ) -> inference_pb.GetModelMetadataResponse:
        self._check(request.name)
        return inference_pb.GetModelMetadataResponse(
            name=request.name,
            versions=["1", "2"],
            version="1",
            platform="python",
            inputs=[inference_pb.TensorSpec(name="image", datatype="image", shape=[-1, -1, 3])],
            outputs=[inference_pb.TensorSpec(name="reading", datatype="StripReading", shape=[1])],
            parameters={"min_confidence": params_pb2.ParamValue(number_value=0.5)},
            max_batch_size=8,
            device=image_pb2.DEVICE_CPU,
            status=VERSION_STATUS[0],
            default_version="1",
            version_status=VERSION_STATUS,
        )

    async def ModelReady(
        self, request: inference_pb.ModelReadyRequest, context: Context
    ) -> inference_pb.ModelReadyResponse:
        self._check(request.name)
        return inference_pb.ModelReadyResponse(ready=True)

    async def Predict(
        self, request: inference_pb.PredictRequest, context: Context
    ) -> inference_pb.PredictResponse:
        self._check(request.model_name)
        self.last_request = request
        source = request.input.WhichOneof("source")
        if source == "image_id":
            image = self.files._get(request.input.image_id).image
            width, height = image.width, image.height
        elif source == "encoded":
            sniff(request.input.encoded.data)
            with PILImage.open(io.BytesIO(request.input.encoded.data)) as decoded:
                width, height = decoded.size
        else:
            raise errors.InvalidArgument("input is required")
        return inference_pb.PredictResponse(
            model_name=request.model_name,
            model_version="1",
            request_id=request.request_id,
            strip_reading=strip_reading(width, height),
            device=image_pb2.DEVICE_CPU,
            compute_seconds=0.002,
            batch_size=1,
        )

    async def StreamInference(
        self, request_iterator: AsyncIterator[inference_pb.StreamInferenceRequest], context: Context
    ) -> AsyncIterator[inference_pb.StreamInferenceResponse]:
        async for item in request_iterator:
            try:
                response = await self.Predict(item.request, context)
            except errors.MeshError as error:
                yield inference_pb.StreamInferenceResponse(
                    error=error.to_status(), request_id=item.request.request_id
                )
                continue
            yield inference_pb.StreamInferenceResponse(response=response, request_id=item.request.request_id)

    async def GetModelStatistics(
        self, request: inference_pb.GetModelStatisticsRequest, context: Context
    ) -> inference_pb.GetModelStatisticsResponse:
        return inference_pb.GetModelStatisticsResponse(
            statistics=[inference_pb.ModelStatistics(name="strip-reader", version="1")]
        )


@dataclass
class FakeJob:
    """A job and its change log."""

    job: job_pb2.Job
    events: list[queue_pb.WatchJobResponse] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None


class FakeQueueService(queue_grpc.QueueServiceServicer):
    """Jobs that move QUEUED -> RUNNING -> SUCCEEDED on their own, every ``step_seconds``.

    ``hold`` keeps new jobs QUEUED (to cancel them); ``fail_next`` makes the next job FAILED with a DATA error.
    """

    def __init__(self, files: FakeFileService, step_seconds: float = 0.05) -> None:
        self.files = files
        self.step_seconds = step_seconds
        self.jobs: dict[str, FakeJob] = {}
        self.order: list[str] = []
        self.hold = False
        self.fail_next = False
        self.released = asyncio.Event()
        self.watch_requests = 0
        self.watch_drops = 0
        """WatchJob streams still to end ``watch_drop_code`` after their first change (a restart, an aged
        connection)."""
        self.watch_drop_code = grpc.StatusCode.UNAVAILABLE
        self.open_watches = 0
        """WatchJob streams open now."""
        self.stats_calls = 0
        self.lose_answers = 0
        """SubmitJobs still to queue their job and then answer UNAVAILABLE (a commit whose answer was lost)."""
        self._cut = asyncio.Event()

    def _change(self, entry: FakeJob, **fields: Any) -> None:
        before = entry.job.state
        for name, value in fields.items():
            if isinstance(value, job_pb2.JobResult | job_pb2.JobError):
                getattr(entry.job, name).CopyFrom(value)
            else:
                setattr(entry.job, name, value)
        entry.job.update_time.CopyFrom(_now())
        if entry.job.state != before:
            entry.job.history.append(
                job_pb2.JobTransition(
                    from_state=before, to_state=entry.job.state, attempt=entry.job.attempt, time=_now()
                )
            )
        entry.events.append(queue_pb.WatchJobResponse(job=entry.job, sequence=len(entry.events) + 1))
        entry.changed.set()
        entry.changed = asyncio.Event()

    async def _run(self, entry: FakeJob) -> None:
        await asyncio.sleep(self.step_seconds)
        while self.hold:
            await self.released.wait()
        if entry.job.state != job_pb2.JOB_STATE_QUEUED:
            return
        fail = self.fail_next
        self.fail_next = False
        self._change(entry, state=job_pb2.JOB_STATE_RUNNING, queue_position=0, stage="pipeline", progress=0.0)
        for progress in (0.25, 0.5, 0.75):
            await asyncio.sleep(self.step_seconds)
            if entry.job.state != job_pb2.JOB_STATE_RUNNING:
                return
            self._change(entry, progress=progress)
        if fail:
            self._change(
                entry,
                state=job_pb2.JOB_STATE_FAILED,
                error=job_pb2.JobError(
                    category=errors_pb2.ERROR_CATEGORY_DATA,
                    message="the image is unreadable",
                    code="INVALID_ARGUMENT",
                ),
            )
            return
        stored = self.files.images.get(entry.job.image_id)
        if stored is None:
            fail_error = job_pb2.JobError(
                category=errors_pb2.ERROR_CATEGORY_DATA, message="the image was deleted", code="NOT_FOUND"
            )
            self._change(entry, state=job_pb2.JOB_STATE_FAILED, error=fail_error)
            return
        if entry.job.pipeline:
            # As the image service does: the filters' output is a new image, which the model then reads.
            stored = self.files.images[self.files.store(_filtered(stored.data, entry.job.pipeline)).id]
        prediction = inference_pb.PredictResponse(
            model_name=entry.job.model or "strip-reader",
            model_version="1",
            strip_reading=strip_reading(stored.image.width, stored.image.height),
        )
        result = job_pb2.JobResult(output_image_id=stored.image.id)
        if entry.job.model:
            result.prediction.CopyFrom(prediction)
        self._change(entry, state=job_pb2.JOB_STATE_SUCCEEDED, progress=1.0, stage="", result=result)

    def beat(self, job_id: str, progress: float) -> None:
        """A progress change of a job, as a worker's progress beat makes (whatever its state here)."""
        self._change(self.jobs[job_id], progress=progress)

    def release(self) -> None:
        """Let held jobs run."""
        self.hold = False
        self.released.set()
        self.released = asyncio.Event()

    def _get(self, job_id: str) -> FakeJob:
        entry = self.jobs.get(job_id)
        if entry is None:
            raise errors.NotFound(f"no job {job_id}")
        return entry

    def _start(self, entry: FakeJob) -> None:
        entry.runner = asyncio.create_task(self._run(entry))

    async def SubmitJob(
        self, request: queue_pb.SubmitJobRequest, context: Context
    ) -> queue_pb.SubmitJobResponse:
        response = await self._submit(request)
        if self.lose_answers:
            self.lose_answers -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset after the commit")
        return response

    async def _submit(self, request: queue_pb.SubmitJobRequest) -> queue_pb.SubmitJobResponse:
        for entry in self.jobs.values():
            if request.idempotency_key and entry.job.idempotency_key == request.idempotency_key:
                return queue_pb.SubmitJobResponse(job=entry.job, existing=True)
        self.files._get(request.image_id)
        queued = sum(1 for e in self.jobs.values() if e.job.state == job_pb2.JOB_STATE_QUEUED)
        job = job_pb2.Job(
            id=str(uuid.uuid4()),
            state=job_pb2.JOB_STATE_QUEUED,
            image_id=request.image_id,
            pipeline=request.pipeline,
            model=request.model,
            priority=request.priority,
            idempotency_key=request.idempotency_key,
            attempt=1,
            run_attempt=1,
            max_attempts=request.max_attempts or 3,
            queue_position=queued + 1,
            create_time=_now(),
        )
        entry = FakeJob(job)
        self.jobs[job.id] = entry
        self.order.insert(0, job.id)
        self._change(entry)
        self._start(entry)
        return queue_pb.SubmitJobResponse(job=job)

    async def GetJob(self, request: queue_pb.GetJobRequest, context: Context) -> queue_pb.GetJobResponse:
        return queue_pb.GetJobResponse(job=self._get(request.job_id).job)

    async def ListJobs(
        self, request: queue_pb.ListJobsRequest, context: Context
    ) -> queue_pb.ListJobsResponse:
        ids = [i for i in self.order if not request.state or self.jobs[i].job.state == request.state]
        token = request.page_token or "0"
        if not (token.isascii() and token.isdigit()):  # isdigit() alone passes '²', which int() refuses
            raise errors.InvalidArgument("page_token is not valid")
        offset = int(token)
        size = request.page_size or 50
        more = offset + size < len(ids)
        return queue_pb.ListJobsResponse(
            jobs=[self.jobs[i].job for i in ids[offset : offset + size]],
            next_page_token=str(offset + size) if more else "",
        )

    async def CancelJob(
        self, request: queue_pb.CancelJobRequest, context: Context
    ) -> queue_pb.CancelJobResponse:
        entry = self._get(request.job_id)
        if entry.job.state in TERMINAL:
            raise errors.FailedPrecondition(f"job is {job_pb2.JobState.Name(entry.job.state)}")
        self._change(entry, state=job_pb2.JOB_STATE_CANCELLED, queue_position=0)
        return queue_pb.CancelJobResponse(job=entry.job)

    async def RetryJob(
        self, request: queue_pb.RetryJobRequest, context: Context
    ) -> queue_pb.RetryJobResponse:
        entry = self._get(request.job_id)
        if entry.job.state not in (
            job_pb2.JOB_STATE_FAILED,
            job_pb2.JOB_STATE_DEAD,
            job_pb2.JOB_STATE_CANCELLED,
        ):
            raise errors.FailedPrecondition("only failed, dead or cancelled jobs can be retried")
        entry.job.ClearField("error")
        self._change(
            entry,
            state=job_pb2.JOB_STATE_QUEUED,
            attempt=entry.job.attempt + 1,
            run_attempt=1,
            progress=0.0,
            queue_position=1,
        )
        self._start(entry)
        return queue_pb.RetryJobResponse(job=entry.job)

    async def WatchJob(
        self, request: queue_pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[queue_pb.WatchJobResponse]:
        self.watch_requests += 1
        entry = self._get(request.job_id)
        sent = 0
        self.open_watches += 1
        try:
            while True:
                while sent < len(entry.events):
                    yield entry.events[sent]
                    sent += 1
                    if self.watch_drops:
                        self.watch_drops -= 1
                        await context.abort(self.watch_drop_code, "the queue service is restarting")
                if entry.job.state in TERMINAL:
                    return
                cut = self._cut
                waits = [asyncio.ensure_future(entry.changed.wait()), asyncio.ensure_future(cut.wait())]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for wait in waits:
                        wait.cancel()
                if cut.is_set():
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the connection is closed for its age")
        finally:
            self.open_watches -= 1

    def cut_watches(self) -> None:
        """End every open WatchJob stream UNAVAILABLE, as a server closing aged connections does."""
        self._cut.set()
        self._cut = asyncio.Event()

    async def GetQueueStats(
        self, request: queue_pb.GetQueueStatsRequest, context: Context
    ) -> queue_pb.GetQueueStatsResponse:
        self.stats_calls += 1
        counts: dict[str, int] = {}
        for entry in self.jobs.values():
            name = job_pb2.JobState.Name(entry.job.state)
            counts[name] = counts.get(name, 0) + 1
        return queue_pb.GetQueueStatsResponse(
            jobs_by_state=counts,
            queues=[queue_pb.QueueDepth(queue="jobs", jobs_by_state=counts, broker_ready=0)],
        )

    async def stop(self) -> None:
        """Cancel every running job task."""
        runners = [entry.runner for entry in self.jobs.values() if entry.runner is not None]
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)


@dataclass
class Fakes:
    """The four fakes, sharing one image store."""

    files: FakeFileService
    image: FakeImageService
    inference: FakeInferenceService
    queue: FakeQueueService

    @classmethod
    def create(cls, step_seconds: float = 0.05) -> Fakes:
        files = FakeFileService()
        return cls(
            files, FakeImageService(files), FakeInferenceService(files), FakeQueueService(files, step_seconds)
        )

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register every fake on ``server``."""
        file_grpc.add_FileServiceServicer_to_server(self.files, server)
        image_grpc.add_ImageProcessingServiceServicer_to_server(self.image, server)
        inference_grpc.add_InferenceServiceServicer_to_server(self.inference, server)
        queue_grpc.add_QueueServiceServicer_to_server(self.queue, server)
