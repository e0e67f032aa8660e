"""The real strip reader served over gRPC from the shipped model repository."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from mesh.common.v1 import image_pb2
from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.inference.v1 import inference_service_pb2_grpc as pb_grpc
from mesh.kit.devices import gpu_available
from mesh.kit.runtime import ServiceRuntime
from mesh.services.inference.checks import models_check
from mesh.services.inference.convert import strip_reading_to_proto
from mesh.services.inference.images import ImageDecoder
from mesh.services.inference.predictor import Predictor
from mesh.services.inference.repository import ModelRepository
from mesh.services.inference.servicer import InferenceServicer
from mesh.services.inference.settings import SERVICE_NAME, InferenceSettings

reader_module = pytest.importorskip("mesh.services.inference.strip.reader")
generator = pytest.importorskip("mesh.services.inference.strip.generator")

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def stub() -> AsyncIterator[pb_grpc.InferenceServiceAsyncStub]:
    repository = ModelRepository(REPO_ROOT / "models", device="cpu")
    await repository.load()
    assert repository.get("strip-reader").ready, repository.get("strip-reader").reason
    predictor = Predictor(repository, ImageDecoder(max_pixels=40_000_000))
    settings = InferenceSettings(grpc_port=0, http_port=0, grace_seconds=1)
    runtime = ServiceRuntime(
        "inference", settings, service_names=[SERVICE_NAME], checks=[models_check(repository)]
    )
    pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(predictor), runtime.server)
    task = asyncio.create_task(runtime.run())
    await asyncio.wait_for(runtime.started.wait(), 30)
    channel = grpc.aio.insecure_channel(f"localhost:{runtime.grpc_port}")
    yield pb_grpc.InferenceServiceStub(channel)
    await channel.close(None)
    runtime.stopping.set()
    await asyncio.wait_for(task, 10)
    await repository.close()


def _raw(pixels: npt.NDArray[np.uint8]) -> image_pb2.ImageInput:
    array = np.ascontiguousarray(pixels, dtype=np.uint8)
    channels = 1 if array.ndim == 2 else array.shape[2]
    return image_pb2.ImageInput(
        raw=image_pb2.RawImage(
            pixels=array.tobytes(), width=array.shape[1], height=array.shape[0], channels=channels
        )
    )


async def test_served_reading_equals_the_readers_own(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    """Over gRPC, raw pixels give exactly what StripReader.read gives for them, for each class."""
    reader = reader_module.StripReader(device="cpu")
    for kind in ("positive", "negative", "invalid", "none"):
        sample = generator.generate_with(11, generator.Overrides(cls=kind))
        expected = strip_reading_to_proto(reader.read(sample.image))
        response = await stub.Predict(pb.PredictRequest(model_name="strip-reader", input=_raw(sample.image)))
        assert response.strip_reading == expected, kind
        assert response.model_version == "1"


async def test_no_strip_is_never_a_verdict(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    """An encoded photo without a strip reads INVALID with STRIP_NOT_FOUND, in the full read and the pre-check."""
    sample = generator.generate_with(3, generator.Overrides(cls="none"))
    encoded = image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=sample.encoded))
    for precheck in (False, True):
        response = await stub.Predict(
            pb.PredictRequest(model_name="strip-reader", input=encoded, precheck_only=precheck)
        )
        reading = response.strip_reading
        assert reading.verdict == pb.VERDICT_INVALID
        assert pb.QUALITY_FLAG_STRIP_NOT_FOUND in reading.quality_flags
        assert reading.precheck_only == precheck


async def test_a_photo_under_the_readers_least_size_is_invalid_argument(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    """A 15-pixel-high photo is refused with the reader's least size (the worker process's own limit, which it
    reports when it starts), not an internal error; 16x16 is read."""
    side = reader_module.MIN_IMAGE_SIDE
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Predict(
            pb.PredictRequest(
                model_name="strip-reader", input=_raw(np.full((side - 1, 400, 3), 200, np.uint8))
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at least {side}x{side} pixels" in str(info.value.details())
    response = await stub.Predict(
        pb.PredictRequest(model_name="strip-reader", input=_raw(np.full((side, side, 3), 200, np.uint8)))
    )
    assert response.strip_reading.verdict == pb.VERDICT_INVALID


async def test_stream_of_real_photos(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    """A stream of photos is answered in order, one response each."""
    samples = [generator.generate_with(seed, generator.Overrides(cls="negative")) for seed in range(20, 24)]

    async def produce() -> AsyncIterator[pb.StreamInferenceRequest]:
        for i, sample in enumerate(samples):
            request = pb.PredictRequest(
                model_name="strip-reader", input=_raw(sample.image), request_id=str(i)
            )
            yield pb.StreamInferenceRequest(request=request)

    responses = [r async for r in stub.StreamInference(produce())]
    assert [r.request_id for r in responses] == ["0", "1", "2", "3"]
    assert all(r.HasField("response") for r in responses)


@pytest.mark.gpu
async def test_gpu_and_cpu_models_give_the_same_verdicts() -> None:
    """With CuPy and a CUDA device, the GPU-loaded model answers the CPU model's verdicts."""
    if not gpu_available()[0]:
        pytest.skip("CuPy with a CUDA device is not available")
    readings = {}
    for device in ("cpu", "gpu"):
        repository = ModelRepository(REPO_ROOT / "models", device=device)
        await repository.load()
        predictor = Predictor(repository, ImageDecoder(max_pixels=40_000_000))
        responses = [
            await predictor.predict(
                pb.PredictRequest(model_name="strip-reader", input=_raw(generator.generate(seed).image))
            )
            for seed in range(1_000_000, 1_000_020)
        ]
        assert all(
            r.device == (image_pb2.DEVICE_GPU if device == "gpu" else image_pb2.DEVICE_CPU) for r in responses
        )
        readings[device] = [r.strip_reading.verdict for r in responses]
        await repository.close()
    assert readings["gpu"] == readings["cpu"]
