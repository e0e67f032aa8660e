"""Clients of a running mesh for the load and soak tools: channels, stubs, the health pre-check and seeding."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from dataclasses import dataclass, field

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.common.v1 import params_pb2
from mesh.file.v1 import file_service_pb2, file_service_pb2_grpc
from mesh.image.v1 import image_processing_service_pb2_grpc
from mesh.inference.v1 import inference_service_pb2_grpc
from mesh.kit.channels import open_channel
from mesh.kit.settings import MeshSettings
from mesh.queue.v1 import job_pb2, queue_service_pb2, queue_service_pb2_grpc
from mesh.services.file import settings as file_settings
from mesh.services.image_processing import settings as image_settings
from mesh.services.inference import settings as inference_settings
from mesh.services.queue import settings as queue_settings
from mesh.tools.load import payloads

SERVICES = {
    "file": file_settings.SERVICE_NAME,
    "image": image_settings.SERVICE_NAME,
    "inference": inference_settings.SERVICE_NAME,
    "queue": queue_settings.SERVICE_NAME,
}
STREAMING_METHODS = {
    "file": ("UploadImage", "DownloadImage"),
    "image": ("StreamProcess",),
    "inference": ("StreamInference",),
    "queue": ("WatchJob",),
}
TERMINAL_STATES = frozenset(
    {
        job_pb2.JOB_STATE_SUCCEEDED,
        job_pb2.JOB_STATE_FAILED,
        job_pb2.JOB_STATE_DEAD,
        job_pb2.JOB_STATE_CANCELLED,
    }
)


SEED_JOB_TIMEOUT_SECONDS = 30.0


class MeshNotUp(Exception):
    """A service the run needs does not answer SERVING; the message names each one and why."""


def address_of(settings: MeshSettings, service: str) -> str:
    return {
        "file": settings.file_service_address,
        "image": settings.image_service_address,
        "inference": settings.inference_service_address,
        "queue": settings.queue_service_address,
    }[service]


def url_address(url: str) -> str:
    """host:port of an http(s) URL."""
    parsed = httpx.URL(url)
    return f"{parsed.host}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"


def is_loopback(address: str) -> bool:
    """Whether host:port names this machine (localhost, 127.0.0.0/8, ::1)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


DEFAULT_GATEWAY_URL = "http://127.0.0.1:8080"


@dataclass
class Mesh:
    """Channels and stubs to every service, an HTTP client of the gateway, and the ids of seeded objects."""

    settings: MeshSettings
    gateway_url: str = DEFAULT_GATEWAY_URL
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)
    photo: bytes = b""
    strip: bytes = b""
    ids: dict[str, str] = field(default_factory=dict)
    uploaded: list[str] = field(default_factory=list)
    """Images created by the run, deleted at its end."""
    submitted: list[str] = field(default_factory=list)
    """Jobs submitted by the run."""
    warnings: list[str] = field(default_factory=list)
    """Things the seeding noticed that will make some scenarios fail."""

    def __post_init__(self) -> None:
        for service, name in SERVICES.items():
            self.channels[service] = open_channel(
                address_of(self.settings, service),
                self.settings,
                service=name,
                streaming_methods=STREAMING_METHODS[service],
            )
        self.file = file_service_pb2_grpc.FileServiceStub(self.channels["file"])
        self.image = image_processing_service_pb2_grpc.ImageProcessingServiceStub(self.channels["image"])
        self.inference = inference_service_pb2_grpc.InferenceServiceStub(self.channels["inference"])
        self.queue = queue_service_pb2_grpc.QueueServiceStub(self.channels["queue"])
        self.http = httpx.AsyncClient(base_url=self.gateway_url, timeout=self.settings.rpc_timeout_seconds)

    async def close(self) -> None:
        await asyncio.gather(*(channel.close(None) for channel in self.channels.values()), self.http.aclose())

    async def check_up(self, services: set[str], timeout: float = 3.0) -> None:
        """Raise :class:`MeshNotUp` unless every one of ``services`` answers SERVING on its health name."""
        problems = []
        if "gateway" in services:
            try:
                ready = await self.http.get("/readyz", timeout=timeout)
                if ready.status_code != 200:
                    problems.append(f"gateway at {self.gateway_url}: /readyz answered {ready.status_code}")
            except httpx.HTTPError as error:
                problems.append(f"gateway at {self.gateway_url}: {type(error).__name__} ({error})")
        for service in sorted(services - {"gateway"}):
            address = address_of(self.settings, service)
            stub = health_pb2_grpc.HealthStub(self.channels[service])
            try:
                response = await stub.Check(
                    health_pb2.HealthCheckRequest(service=SERVICES[service]), timeout=timeout
                )
            except grpc.aio.AioRpcError as error:
                problems.append(f"{service} service at {address}: {error.code().name} ({error.details()})")
                continue
            if response.status != health_pb2.HealthCheckResponse.SERVING:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                problems.append(f"{service} service at {address}: {status}")
        if problems:
            raise MeshNotUp("the mesh is not up:\n  " + "\n  ".join(problems) + "\nstart it with `make up`")

    async def delete_uploaded(self) -> int:
        """Delete the images this run created (best effort); returns how many went."""
        deleted = 0
        for image_id in self.uploaded:
            try:
                await self.file.DeleteImage(
                    file_service_pb2.DeleteImageRequest(image_id=image_id), timeout=10
                )
                deleted += 1
            except grpc.aio.AioRpcError:
                continue
        self.uploaded.clear()
        return deleted

    async def upload(self, data: bytes, filename: str) -> str:
        """CreateImage; returns the new image's id (the bytes are stored once, but each upload is an image)."""
        response = await self.file.CreateImage(
            file_service_pb2.CreateImageRequest(
                metadata=file_service_pb2.UploadMetadata(filename=filename, content_type="image/jpeg"),
                data=data,
            )
        )
        return str(response.image.id)

    async def submit(
        self, image_id: str, key: str | None = None, *, pipeline: bool = False
    ) -> queue_service_pb2.SubmitJobResponse:
        """SubmitJob of the strip reader on ``image_id``; with ``pipeline``, the image pipeline runs first
        (the job goes to the image-processing workers, then the model)."""
        steps = (
            [params_pb2.PipelineStep(filter=step["filter"]) for step in payloads.PIPELINE] if pipeline else []
        )
        return await self.queue.SubmitJob(
            queue_service_pb2.SubmitJobRequest(
                image_id=image_id,
                pipeline=steps,
                model=payloads.MODEL,
                idempotency_key=key or f"load-{uuid.uuid4()}",
            )
        )

    async def wait_terminal(self, job_id: str, timeout: float) -> job_pb2.Job:
        """Follow WatchJob until the job ends; returns its last state."""
        last = job_pb2.Job(id=job_id)
        call = self.queue.WatchJob(queue_service_pb2.WatchJobRequest(job_id=job_id), timeout=timeout)
        async for update in call:
            last = update.job
            if last.state in TERMINAL_STATES:
                call.cancel()
                break
        return last

    async def seed(self, services: set[str]) -> None:
        """Upload the payload images and (if the queue is used) run one job, keeping their ids."""
        self.photo, self.strip = payloads.photo_1080p(), payloads.strip_photo()
        if "file" not in services:
            return
        self.ids["photo_image_id"] = await self.upload(self.photo, payloads.PHOTO_NAME)
        self.ids["strip_image_id"] = await self.upload(self.strip, payloads.STRIP_NAME)
        if "queue" in services:
            # A key per image: each run uploads a new image, and a used key asking for another job is 409.
            strip_id = self.ids["strip_image_id"]
            job = (await self.submit(strip_id, key=f"load-seed-job-{strip_id}")).job
            self.ids["job_id"] = job.id
            try:
                last = await self.wait_terminal(job.id, timeout=SEED_JOB_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                last = (await self.queue.GetJob(queue_service_pb2.GetJobRequest(job_id=job.id))).job
            if last.state == job_pb2.JOB_STATE_QUEUED and last.queue_position > 1:
                self.warnings.append(
                    f"seed job {job.id} is still queued after {SEED_JOB_TIMEOUT_SECONDS:g}s, at position "
                    f"{last.queue_position}: the workers have a backlog to go through first (an earlier run's "
                    "queue.submit jobs?); the scenarios run meanwhile"
                )
            elif last.state != job_pb2.JOB_STATE_SUCCEEDED:
                state = job_pb2.JobState.Name(last.state)
                self.warnings.append(
                    f"seed job {job.id} is {state} after {SEED_JOB_TIMEOUT_SECONDS:g}s: are the job workers "
                    "(image-processing and inference services) consuming?"
                )
