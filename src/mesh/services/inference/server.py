"""Wiring of the inference service: model repository, file channel, predictor, job worker, servicer and the
kit's runtime."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mesh.inference.v1 import inference_service_pb2_grpc as pb_grpc
from mesh.kit.devices import resolve_device
from mesh.kit.errors import StartupError
from mesh.kit.gpu_metrics import cupy_pool_bytes, register_gpu_metrics
from mesh.kit.jobs import INFERENCE_JOBS_QUEUE
from mesh.kit.logging import get_logger
from mesh.kit.runtime import ServiceRuntime
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


@contextlib.asynccontextmanager
async def inference_service(settings: InferenceSettings) -> AsyncIterator[ServiceRuntime]:
    """A ready-to-run inference service: every model loaded, servicer and job worker registered.

    MESH_DEVICE=gpu without a GPU, or a model repository that cannot be read, raises
    :class:`~mesh.kit.errors.StartupError` before anything loads. The models (with their batching and worker
    processes) and the file channel are closed on exit, in reverse order, also when loading fails half way."""
    device = resolve_device(settings.device)
    try:
        repository = ModelRepository(settings.resolved_model_dir(), device=device)
    except ModelConfigError as error:
        raise StartupError(str(error)) from None
    async with contextlib.AsyncExitStack() as resources:
        resources.push_async_callback(repository.close)
        log.info("loading models", directory=str(repository.directory), device=device)
        await repository.load()
        # Worker processes hold their own pools; this process's would read zero, which is not the GPU's state.
        register_gpu_metrics(cupy_pool_bytes if device == "gpu" and repository.computes_here else None)
        file_client = await resources.enter_async_context(FileClient.connect(settings))
        predictor = Predictor(
            repository,
            ImageDecoder(max_pixels=settings.max_image_pixels),
            FileServiceFetcher(file_client, timeout=settings.rpc_timeout_seconds),
        )
        runtime = ServiceRuntime(
            "inference", settings, service_names=[SERVICE_NAME], checks=[models_check(repository)]
        )
        handler = InferenceJobHandler(predictor)
        await attach_worker(
            runtime, settings, resources, queue=INFERENCE_JOBS_QUEUE, handler=handler, name="inference"
        )
        pb_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(
                predictor, stream_max_in_flight=settings.stream_max_in_flight, stopping=runtime.stopping
            ),
            runtime.server,
        )
        yield runtime
