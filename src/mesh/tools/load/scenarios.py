"""The load scenarios: one per unary and streaming RPC, the same calls as the ghz configs in deploy/load/.

A scenario's ``run`` makes one call (one whole stream for streaming RPCs) and raises on failure:
``grpc.aio.AioRpcError`` for the call's status, :class:`ItemError` for an error carried inside a stream.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.rpc import status_pb2

from mesh.common.v1 import image_pb2, params_pb2
from mesh.file.v1 import file_service_pb2
from mesh.image.v1 import image_processing_service_pb2 as image_pb
from mesh.inference.v1 import inference_service_pb2 as inference_pb
from mesh.queue.v1 import job_pb2, queue_service_pb2
from mesh.services.file.client import upload_messages
from mesh.tools.load import payloads
from mesh.tools.load.mesh import Mesh

WATCH_TIMEOUT_SECONDS = 60.0
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class ItemError(Exception):
    """An error carried in one response of a stream whose call itself succeeded."""

    def __init__(self, status: status_pb2.Status) -> None:
        self.code = CODE_NAMES.get(status.code, "UNKNOWN")
        super().__init__(status.message)


class JobNotSucceeded(Exception):
    """A watched job ended in a state other than SUCCEEDED."""

    def __init__(self, job: job_pb2.Job) -> None:
        self.code = "JOB_" + job_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
        super().__init__(job.error.message or self.code)


@dataclass(frozen=True)
class Scenario:
    """One RPC under load."""

    name: str
    call: str
    """Fully qualified method, as ghz's ``call``."""
    services: frozenset[str]
    run: Callable[[Mesh], Awaitable[None]]


class HttpStatusError(Exception):
    """The gateway answered with a status other than the expected one."""

    def __init__(self, status: int, body: str) -> None:
        self.code = f"HTTP_{status}"
        super().__init__(body[:200])


def _pipeline() -> list[params_pb2.PipelineStep]:
    return [params_pb2.PipelineStep(filter=step["filter"]) for step in payloads.PIPELINE]


def _output() -> image_pb.OutputSpec:
    return image_pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_JPEG, quality=85)


def _encoded(data: bytes) -> image_pb2.ImageInput:
    return image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=data, format=image_pb2.IMAGE_FORMAT_JPEG))


def _predict_request(mesh: Mesh) -> inference_pb.PredictRequest:
    return inference_pb.PredictRequest(
        model_name=payloads.MODEL, input=_encoded(mesh.strip), request_id=str(uuid.uuid4())
    )


async def upload_image(mesh: Mesh) -> None:
    data = payloads.with_comment(mesh.photo, f"load {uuid.uuid4()}")

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(data), payloads.UPLOAD_CHUNK_BYTES):
            yield data[offset : offset + payloads.UPLOAD_CHUNK_BYTES]

    metadata = file_service_pb2.UploadMetadata(filename=payloads.PHOTO_NAME, content_type="image/jpeg")
    response = await mesh.file.UploadImage(upload_messages(metadata, chunks()))
    mesh.uploaded.append(response.image.id)


async def create_image(mesh: Mesh) -> None:
    data = payloads.with_comment(mesh.strip, f"load {uuid.uuid4()}")
    mesh.uploaded.append(await mesh.upload(data, payloads.STRIP_NAME))


async def get_image(mesh: Mesh) -> None:
    await mesh.file.GetImage(file_service_pb2.GetImageRequest(image_id=mesh.ids["photo_image_id"]))


async def list_images(mesh: Mesh) -> None:
    await mesh.file.ListImages(file_service_pb2.ListImagesRequest(page_size=50))


async def download_image(mesh: Mesh) -> None:
    request = file_service_pb2.DownloadImageRequest(
        image_id=mesh.ids["photo_image_id"], variant=file_service_pb2.IMAGE_VARIANT_ORIGINAL
    )
    async for _ in mesh.file.DownloadImage(request):
        pass


async def list_filters(mesh: Mesh) -> None:
    await mesh.image.ListFilters(image_pb.ListFiltersRequest())


async def process_image(mesh: Mesh) -> None:
    await mesh.image.ProcessImage(
        image_pb.ProcessImageRequest(
            input=image_pb2.ImageInput(image_id=mesh.ids["photo_image_id"]),
            pipeline=_pipeline(),
            output=_output(),
        )
    )


async def stream_process(mesh: Mesh) -> None:
    async def requests() -> AsyncIterator[image_pb.StreamProcessRequest]:
        yield image_pb.StreamProcessRequest(
            config=image_pb.StreamConfig(pipeline=_pipeline(), output=_output())
        )
        for sequence in range(payloads.STREAM_FRAMES):
            frame = image_pb.Frame(sequence=sequence, image=_encoded(mesh.strip))
            yield image_pb.StreamProcessRequest(frame=frame)

    received = 0
    async for response in mesh.image.StreamProcess(requests()):
        if response.HasField("error") and response.error.code:
            raise ItemError(response.error)
        received += 1
    if received != payloads.STREAM_FRAMES:
        raise ItemError(
            status_pb2.Status(code=2, message=f"{received} of {payloads.STREAM_FRAMES} frames answered")
        )


async def model_ready(mesh: Mesh) -> None:
    await mesh.inference.ModelReady(inference_pb.ModelReadyRequest(name=payloads.MODEL))


async def predict(mesh: Mesh) -> None:
    await mesh.inference.Predict(_predict_request(mesh))


async def stream_inference(mesh: Mesh) -> None:
    async def requests() -> AsyncIterator[inference_pb.StreamInferenceRequest]:
        for _ in range(payloads.STREAM_FRAMES):
            yield inference_pb.StreamInferenceRequest(request=_predict_request(mesh))

    received = 0
    async for response in mesh.inference.StreamInference(requests()):
        if response.HasField("error") and response.error.code:
            raise ItemError(response.error)
        received += 1
    if received != payloads.STREAM_FRAMES:
        raise ItemError(
            status_pb2.Status(code=2, message=f"{received} of {payloads.STREAM_FRAMES} predictions answered")
        )


async def submit_job(mesh: Mesh) -> None:
    response = await mesh.submit(mesh.ids["strip_image_id"])
    mesh.submitted.append(response.job.id)


async def submit_pipeline_job(mesh: Mesh) -> None:
    response = await mesh.submit(mesh.ids["strip_image_id"], pipeline=True)
    mesh.submitted.append(response.job.id)


async def get_job(mesh: Mesh) -> None:
    await mesh.queue.GetJob(queue_service_pb2.GetJobRequest(job_id=mesh.ids["job_id"]))


async def list_jobs(mesh: Mesh) -> None:
    await mesh.queue.ListJobs(queue_service_pb2.ListJobsRequest(page_size=50))


async def watch_job(mesh: Mesh) -> None:
    """Submit a job and follow WatchJob until it ends: the submit-to-done latency of one job."""
    job = (await mesh.submit(mesh.ids["strip_image_id"])).job
    mesh.submitted.append(job.id)
    last = await mesh.wait_terminal(job.id, timeout=WATCH_TIMEOUT_SECONDS)
    if last.state != job_pb2.JOB_STATE_SUCCEEDED:
        raise JobNotSucceeded(last)


async def gateway_predict(mesh: Mesh) -> None:
    """REST prediction through the gateway on a stored strip photo (the web page's path)."""
    response = await mesh.http.post(
        f"/v1/models/{payloads.MODEL}:predict", json={"image_id": mesh.ids["strip_image_id"]}
    )
    if response.status_code != 200:
        raise HttpStatusError(response.status_code, response.text)


async def gateway_get_image(mesh: Mesh) -> None:
    """REST image metadata through the gateway."""
    response = await mesh.http.get(f"/v1/images/{mesh.ids['photo_image_id']}")
    if response.status_code != 200:
        raise HttpStatusError(response.status_code, response.text)


def _scenario(name: str, call: str, services: set[str], run: Callable[[Mesh], Awaitable[None]]) -> Scenario:
    return Scenario(name, call, frozenset(services), run)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        _scenario("file.upload", "mesh.file.v1.FileService.UploadImage", {"file"}, upload_image),
        _scenario("file.create", "mesh.file.v1.FileService.CreateImage", {"file"}, create_image),
        _scenario("file.get", "mesh.file.v1.FileService.GetImage", {"file"}, get_image),
        _scenario("file.list", "mesh.file.v1.FileService.ListImages", {"file"}, list_images),
        _scenario("file.download", "mesh.file.v1.FileService.DownloadImage", {"file"}, download_image),
        _scenario(
            "image.list_filters", "mesh.image.v1.ImageProcessingService.ListFilters", {"image"}, list_filters
        ),
        _scenario(
            "image.process",
            "mesh.image.v1.ImageProcessingService.ProcessImage",
            {"file", "image"},
            process_image,
        ),
        _scenario(
            "image.stream", "mesh.image.v1.ImageProcessingService.StreamProcess", {"image"}, stream_process
        ),
        _scenario(
            "inference.model_ready",
            "mesh.inference.v1.InferenceService.ModelReady",
            {"inference"},
            model_ready,
        ),
        _scenario("inference.predict", "mesh.inference.v1.InferenceService.Predict", {"inference"}, predict),
        _scenario(
            "inference.stream",
            "mesh.inference.v1.InferenceService.StreamInference",
            {"inference"},
            stream_inference,
        ),
        # Before the submit scenarios: it measures submit-to-done on an idle queue, not behind their backlog.
        _scenario(
            "queue.watch",
            "mesh.queue.v1.QueueService.WatchJob",
            {"file", "queue", "image", "inference"},
            watch_job,
        ),
        _scenario("queue.submit", "mesh.queue.v1.QueueService.SubmitJob", {"file", "queue"}, submit_job),
        _scenario(
            "queue.submit_pipeline",
            "mesh.queue.v1.QueueService.SubmitJob",
            {"file", "queue"},
            submit_pipeline_job,
        ),
        _scenario("queue.get", "mesh.queue.v1.QueueService.GetJob", {"file", "queue"}, get_job),
        _scenario("queue.list", "mesh.queue.v1.QueueService.ListJobs", {"queue"}, list_jobs),
        _scenario(
            "gateway.predict", "POST /v1/models/strip-reader:predict", {"gateway", "file"}, gateway_predict
        ),
        _scenario("gateway.get_image", "GET /v1/images/{id}", {"gateway", "file"}, gateway_get_image),
    )
}
