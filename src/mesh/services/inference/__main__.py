"""``python -m mesh.services.inference``: load the model repository, then serve InferenceService."""

from __future__ import annotations

import asyncio

from mesh.inference.v1 import inference_service_pb2_grpc as pb_grpc
from mesh.kit.devices import resolve_device
from mesh.kit.errors import StartupError, exit_on_startup_error
from mesh.kit.gpu_metrics import cupy_pool_bytes, register_gpu_metrics
from mesh.kit.jobs import INFERENCE_JOBS_QUEUE
from mesh.kit.logging import get_logger
from mesh.kit.runtime import ServiceRuntime, start_service
from mesh.services.file.client import FileClient
from mesh.services.inference.checks import models_check
from mesh.services.inference.images import FileServiceFetcher, ImageDecoder
from mesh.services.inference.jobs import InferenceJobHandler
from mesh.services.inference.predictor import Predictor
from mesh.services.inference.repository import ModelConfigError, ModelRepository
from mesh.services.inference.servicer import InferenceServicer
from mesh.services.inference.settings import SERVICE_NAME, InferenceSettings
from mesh.services.queue.worker import attach_worker

log = get_logger(__name__)


async def serve(settings: InferenceSettings) -> None:
    """Load every model, then serve until SIGTERM."""
    device = resolve_device(settings.device)  # MESH_DEVICE=gpu without a GPU: StartupError
    try:
        repository = ModelRepository(settings.resolved_model_dir(), device=device)
    except ModelConfigError as error:
        raise StartupError(str(error)) from None
    log.info("loading models", directory=str(repository.directory), device=device)
    await repository.load()
    # Worker processes hold their own pools; this process's would read zero, which is not the GPU's state.
    register_gpu_metrics(cupy_pool_bytes if device == "gpu" and repository.computes_here else None)
    file_client = FileClient.connect(settings)
    predictor = Predictor(
        repository,
        ImageDecoder(max_pixels=settings.max_image_pixels),
        FileServiceFetcher(file_client, timeout=settings.rpc_timeout_seconds),
    )
    runtime = ServiceRuntime(
        "inference", settings, service_names=[SERVICE_NAME], checks=[models_check(repository)]
    )
    handler = InferenceJobHandler(predictor)
    await attach_worker(runtime, settings, queue=INFERENCE_JOBS_QUEUE, handler=handler, name="inference")
    pb_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(
            predictor, stream_max_in_flight=settings.stream_max_in_flight, stopping=runtime.stopping
        ),
        runtime.server,
    )
    try:
        await runtime.run()
    finally:
        await repository.close()
        await file_client.close()


def main() -> None:
    # Requests carry frames of many megabytes: keep those buffers in the heap instead of fresh mmap pages.
    settings = start_service("inference", InferenceSettings, large_messages=True)
    with exit_on_startup_error("inference"):
        asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
