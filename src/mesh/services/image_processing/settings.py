"""Settings of the image processing service (environment ``MESH_*``)."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from mesh.image.v1 import image_processing_service_pb2
from mesh.kit.settings import DeviceSettings, FileServiceAddress, InferenceServiceAddress, WorkerSettings

SERVICE_NAME = image_processing_service_pb2.DESCRIPTOR.services_by_name["ImageProcessingService"].full_name
"""The image processing service's gRPC (and health) name, from the .proto so that it cannot drift."""


class ImageSettings(DeviceSettings, FileServiceAddress, InferenceServiceAddress, WorkerSettings):
    """The image processing service's settings: a job's image comes from the file service, and its
    predictions from inference."""

    grpc_port: int = Field(default=50052, ge=0, le=65535)
    """gRPC port."""

    http_port: int = Field(default=9102, ge=0, le=65535)
    """HTTP port for /metrics and /healthz."""

    # The file and inference services' name for their pixel limit, so that one variable sets all three; the
    # name this service used to read is still accepted, with a deprecation warning at start.
    max_image_pixels: int = Field(
        default=50_000_000,
        gt=0,
        validation_alias=AliasChoices("MESH_MAX_IMAGE_PIXELS", "MESH_IMAGE_MAX_PIXELS"),
    )
    """Largest width x height of an input or output image; the same variable sets the file and inference
    services' limits."""

    image_max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    """Largest encoded or raw input image in bytes."""

    cpu_workers: int = Field(default=2, ge=1, le=64)
    """Pipelines run at once on the CPU backend (OpenCV also threads inside each)."""

    gpu_memory_limit_bytes: int = Field(default=8 * 1024**3, ge=0)
    """Bound of CuPy's device memory pool; 0 leaves it unbounded."""

    max_pending_pipelines: int = Field(default=32, ge=1, le=10_000)
    """Requests that may wait for or hold the backend (and the memory budget) at once; more are refused with
    RESOURCE_EXHAUSTED and a retry delay."""

    image_memory_budget_bytes: int = Field(default=1024**3, gt=0)
    """Bytes the requests in progress may hold together, each counted by the most it will hold at once (known
    before decoding, from the header and the steps' parameters): the codec's copies, each step's input, output
    and working memory (a sobel's float copies, a wrap border's padded ones) beside the decoded input, the
    encoded file. A request waits, within its deadline, for its share; one larger than the whole budget is
    refused. The process peaks at about this, plus the inputs of the requests waiting for it (at most half of
    it: more are shed), plus gRPC's messages still arriving, plus ~150 MB: 1 GiB suits the 4 GiB pod; raise
    both together."""

    stream_queue_frames: int = Field(default=2, ge=1, le=64)
    """Frames of a StreamProcess call read ahead of the one being processed (backpressure beyond)."""
