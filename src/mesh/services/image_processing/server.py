"""Wiring of the image-processing service: compute backend, file and inference channels, processor, job
worker, servicer and the kit's runtime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from mesh.kit.gpu_metrics import cupy_pool_bytes, register_gpu_metrics
from mesh.kit.jobs import IMAGE_JOBS_QUEUE
from mesh.kit.logging import get_logger
from mesh.kit.runtime import ServiceRuntime
from mesh.services.file.client import FileClient
from mesh.services.image_processing.backend import health_check, select_backend
from mesh.services.image_processing.codec import Limits
from mesh.services.image_processing.jobs import ImageJobHandler, StubPredictor
from mesh.services.image_processing.processor import Processor
from mesh.services.image_processing.servicer import ImageProcessingServicer, add_to_server
from mesh.services.image_processing.settings import SERVICE_NAME, ImageSettings
from mesh.services.queue.worker import attach_worker

log = get_logger("mesh.services.image_processing")


@contextlib.asynccontextmanager
async def image_processing_service(settings: ImageSettings) -> AsyncIterator[ServiceRuntime]:
    """A ready-to-run image-processing service: backend warmed up, servicer and job worker registered.

    MESH_DEVICE=gpu without a GPU raises :class:`~mesh.kit.errors.StartupError` before anything opens. The
    channels and the processor's threads are closed on exit, in reverse order."""
    backend = select_backend(settings.device, gpu_memory_limit_bytes=settings.gpu_memory_limit_bytes)
    # Kernels compile here, before the port opens, so no request pays for compilation.
    await asyncio.to_thread(backend.warm_up)
    log.info("compute backend ready", device=backend.device.value, detail=backend.check())
    register_gpu_metrics(cupy_pool_bytes if backend.device.value == "gpu" else None)
    async with contextlib.AsyncExitStack() as resources:
        files = await resources.enter_async_context(FileClient.connect(settings))
        processor = Processor(
            backend,
            store=files,
            limits=Limits(max_pixels=settings.max_image_pixels, max_bytes=settings.image_max_bytes),
            workers=settings.cpu_workers,
            max_pending=settings.max_pending_pipelines,
            max_message_bytes=settings.max_message_bytes,
            memory_budget_bytes=settings.image_memory_budget_bytes,
            rpc_timeout_seconds=settings.rpc_timeout_seconds,
        )
        resources.callback(processor.close)
        # Jobs with a pipeline come here; the handler calls the inference service for the model, if any.
        predictor, inference_channel = StubPredictor.connect(settings)
        resources.push_async_callback(inference_channel.close, None)
        runtime = ServiceRuntime(
            "image-processing", settings, service_names=[SERVICE_NAME], checks=[health_check(backend)]
        )
        handler = ImageJobHandler(files, processor, predictor)
        await attach_worker(
            runtime, settings, resources, queue=IMAGE_JOBS_QUEUE, handler=handler, name="image-processing"
        )
        add_to_server(
            ImageProcessingServicer(
                processor, stream_queue_frames=settings.stream_queue_frames, stopping=runtime.stopping
            ),
            runtime.server,
        )
        yield runtime
