"""InferenceService over real gRPC (ServiceRuntime on port 0) with the fake model."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from mesh.common.v1 import image_pb2, params_pb2
from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.inference.v1 import inference_service_pb2_grpc as pb_grpc
from mesh.kit import errors
from mesh.kit.runtime import RESTARTING, ServiceRuntime
from mesh.services.inference.checks import models_check
from mesh.services.inference.client import InferenceClient
from mesh.services.inference.images import ImageDecoder
from mesh.services.inference.predictor import REQUEST_ID_KEY, Predictor
from mesh.services.inference.repository import ModelRepository
from mesh.services.inference.servicer import InferenceServicer
from mesh.services.inference.settings import SERVICE_NAME, InferenceSettings
from tests.inference.fakes import POISON, FakeFactory, FakeModel, MemoryFetcher, write_model

STORED = "0b6f1d2e-6c1a-4c55-9d0e-3f2a1b4c5d6e"
"""The id of the one image the fake file service holds."""
MISSING = "0b6f1d2e-6c1a-4c55-9d0e-3f2a1b4c5d6f"
"""An image id it does not know."""


@dataclass
class Served:
    """A running inference server and a stub on it."""

    stub: pb_grpc.InferenceServiceAsyncStub
    channel: grpc.aio.Channel
    runtime: ServiceRuntime
    repository: ModelRepository


def raw(value: int, *, width: int = 8, height: int = 6) -> image_pb2.ImageInput:
    """A uniform RGB image sent as raw pixels."""
    pixels = bytes([value]) * (width * height * 3)
    return image_pb2.ImageInput(raw=image_pb2.RawImage(pixels=pixels, width=width, height=height, channels=3))


def png(value: int) -> bytes:
    """A uniform grey PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 8), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


async def start(
    root: Path, factory: FakeFactory, *, stream_max_in_flight: int = 32, grace_seconds: float = 1
) -> tuple[ServiceRuntime, asyncio.Task[None], ModelRepository]:
    repository = ModelRepository(root, factories={"fake": factory})
    await repository.load()
    predictor = Predictor(repository, ImageDecoder(max_pixels=1_000_000), MemoryFetcher({STORED: png(200)}))
    settings = InferenceSettings(
        grpc_port=0, http_port=0, grace_seconds=grace_seconds, health_interval_seconds=0.05
    )
    runtime = ServiceRuntime(
        "inference", settings, service_names=[SERVICE_NAME], checks=[models_check(repository)]
    )
    pb_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(predictor, stream_max_in_flight=stream_max_in_flight, stopping=runtime.stopping),
        runtime.server,
    )
    task = asyncio.create_task(runtime.run())
    await asyncio.wait_for(runtime.started.wait(), 10)
    return runtime, task, repository


@contextlib.asynccontextmanager
async def serving(root: Path, factory: FakeFactory) -> AsyncIterator[Served]:
    """A server on the models under ``root`` with a stub on it, stopped and its models closed on exit."""
    runtime, task, repository = await start(root, factory)
    channel = grpc.aio.insecure_channel(f"localhost:{runtime.grpc_port}")
    try:
        yield Served(pb_grpc.InferenceServiceStub(channel), channel, runtime, repository)
    finally:
        await channel.close(None)
        runtime.stopping.set()
        await asyncio.wait_for(task, 10)
        await repository.close()


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    root = tmp_path_factory.mktemp("models")
    write_model(root, version=1)
    write_model(root, version=2)
    write_model(root, name="counted", max_queue_delay_ms=0)
    write_model(root, name="broken", options={"fail_warm_up": True})
    write_model(root, name="slow", max_batch_size=1, max_queue_delay_ms=0, options={"delay_seconds": 0.3})
    async with serving(root, FakeFactory()) as served:
        yield served


async def _error(call: object) -> errors.MeshError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return errors.from_rpc_error(info.value)


async def test_list_models_shows_versions_and_readiness(served: Served) -> None:
    """Every model with its versions, default version, readiness and each version's state."""
    response = await served.stub.ListModels(pb.ListModelsRequest())
    models = {m.name: m for m in response.models}
    assert sorted(models) == ["broken", "counted", "fake", "slow"]
    assert list(models["fake"].versions) == ["1", "2"]
    assert models["fake"].default_version == "2"
    assert models["fake"].ready
    assert models["fake"].description == "a fake model for tests"
    broken = models["broken"]
    assert not broken.ready
    assert broken.version_status[0].state == "UNAVAILABLE"
    assert "weights are corrupt" in broken.version_status[0].reason


async def test_metadata_describes_a_version(served: Served) -> None:
    """Inputs, outputs, parameter defaults, batch limits and device of a version."""
    meta = await served.stub.GetModelMetadata(pb.GetModelMetadataRequest(name="fake", version="1"))
    assert meta.version == "1"
    assert list(meta.versions) == ["1", "2"]
    assert [t.name for t in meta.inputs] == ["image"]
    assert list(meta.inputs[0].shape) == [-1, -1, -1]
    assert meta.outputs[0].datatype == "StripReading"
    assert meta.parameters["threshold"].number_value == 128.0
    assert meta.max_batch_size == 4
    assert meta.max_queue_delay_seconds == pytest.approx(0.02)
    assert (meta.instance_count, meta.instance_kind) == (1, "thread")
    assert meta.device == image_pb2.DEVICE_CPU
    assert meta.platform == "python"
    assert meta.status.ready


async def test_metadata_lists_every_versions_state_and_the_default(served: Served) -> None:
    """Metadata of one version also says which version is the default and every version's state, so that the
    REST detail can show them all (it showed the described version's readiness only)."""
    meta = await served.stub.GetModelMetadata(pb.GetModelMetadataRequest(name="fake", version="1"))
    assert (meta.version, meta.default_version) == ("1", "2")
    assert [(s.version, s.state, s.ready) for s in meta.version_status] == [
        ("1", "READY", True),
        ("2", "READY", True),
    ]
    broken = await served.stub.GetModelMetadata(pb.GetModelMetadataRequest(name="broken"))
    [status] = broken.version_status
    assert (broken.default_version, status.state, status.ready) == ("1", "UNAVAILABLE", False)
    assert "weights are corrupt" in status.reason


async def test_unknown_model_and_version_are_not_found(served: Served) -> None:
    """NOT_FOUND lists what exists, for metadata, readiness and prediction alike."""
    error = await _error(served.stub.GetModelMetadata(pb.GetModelMetadataRequest(name="nope")))
    assert isinstance(error, errors.NotFound)
    assert "models: broken, counted, fake, slow" in error.message
    error = await _error(served.stub.ModelReady(pb.ModelReadyRequest(name="fake", version="9")))
    assert isinstance(error, errors.NotFound)
    assert "versions: 1, 2" in error.message
    error = await _error(served.stub.Predict(pb.PredictRequest(model_name="nope", input=raw(1))))
    assert isinstance(error, errors.NotFound)
    assert errors.http_status(error) == 404


async def test_model_ready_per_version(served: Served) -> None:
    """A loaded version is ready; one that failed to load is not, and says why."""
    ready = await served.stub.ModelReady(pb.ModelReadyRequest(name="fake"))
    assert ready.ready
    assert ready.version == "2"
    broken = await served.stub.ModelReady(pb.ModelReadyRequest(name="broken"))
    assert not broken.ready
    assert "weights are corrupt" in broken.reason


async def test_predict_inputs_and_request_ids(served: Served) -> None:
    """Raw, encoded and stored inputs give the model's reading; request ids are echoed or generated."""
    bright = await served.stub.Predict(
        pb.PredictRequest(model_name="fake", model_version="1", input=raw(200), request_id="r-1")
    )
    assert bright.request_id == "r-1"
    assert bright.model_name == "fake"
    assert bright.model_version == "1"
    assert bright.device == image_pb2.DEVICE_CPU
    assert bright.strip_reading.verdict == pb.VERDICT_POSITIVE
    assert bright.compute_seconds > 0
    dark = await served.stub.Predict(pb.PredictRequest(model_name="fake", input=raw(20)))
    assert dark.strip_reading.verdict == pb.VERDICT_NEGATIVE
    assert dark.model_version == "2"
    assert len(dark.request_id) == 32
    encoded = image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=png(200)))
    from_png = await served.stub.Predict(pb.PredictRequest(model_name="fake", input=encoded))
    assert from_png.strip_reading.verdict == pb.VERDICT_POSITIVE
    stored = await served.stub.Predict(
        pb.PredictRequest(model_name="fake", input=image_pb2.ImageInput(image_id=STORED))
    )
    assert stored.strip_reading.verdict == pb.VERDICT_POSITIVE


async def test_parameters_and_precheck(served: Served) -> None:
    """A request's parameters reach the model; precheck_only runs the pre-check."""
    strict = pb.PredictRequest(
        model_name="fake", input=raw(200), parameters={"threshold": params_pb2.ParamValue(number_value=250)}
    )
    assert (await served.stub.Predict(strict)).strip_reading.verdict == pb.VERDICT_NEGATIVE
    precheck = await served.stub.Predict(
        pb.PredictRequest(model_name="fake", input=raw(200), precheck_only=True)
    )
    assert precheck.strip_reading.precheck_only
    assert list(precheck.strip_reading.quality_flags) == [pb.QUALITY_FLAG_BLUR]


async def test_bad_requests_map_to_precise_statuses(served: Served) -> None:
    """Missing input, bad parameter, unsupported bytes, unknown image and an unready model each map clearly."""
    cases: list[tuple[pb.PredictRequest, type[errors.MeshError], str]] = [
        (pb.PredictRequest(model_name="fake"), errors.InvalidArgument, "input"),
        (pb.PredictRequest(input=raw(1)), errors.InvalidArgument, "model_name"),
        (
            pb.PredictRequest(
                model_name="fake", input=raw(1), parameters={"size": params_pb2.ParamValue(int_value=1)}
            ),
            errors.InvalidArgument,
            "parameters[size]",
        ),
        (
            pb.PredictRequest(
                model_name="fake",
                input=image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=b"GIF89a....")),
            ),
            errors.InvalidArgument,
            "input.encoded.data",
        ),
        (
            pb.PredictRequest(model_name="fake", input=image_pb2.ImageInput(image_id=MISSING)),
            errors.NotFound,
            "",
        ),
        (pb.PredictRequest(model_name="broken", input=raw(1)), errors.Unavailable, ""),
    ]
    for request, kind, field in cases:
        error = await _error(served.stub.Predict(request))
        assert isinstance(error, kind), (request, error)
        if request.input.HasField("encoded"):
            assert errors.http_status(error) == 415
        if field:
            assert field in [v.field for v in error.field_violations]


async def test_model_lookups_name_the_fields_of_their_own_request(served: Served) -> None:
    """GetModelMetadata, ModelReady and GetModelStatistics name their fields ``name`` and ``version``, Predict
    its ``model_name`` and ``model_version``: every lookup named Predict's, fields the others do not have."""
    calls: list[tuple[object, type[errors.MeshError], str]] = [
        (served.stub.GetModelMetadata(pb.GetModelMetadataRequest(name="nope")), errors.NotFound, "name"),
        (
            served.stub.GetModelMetadata(pb.GetModelMetadataRequest(name="fake", version="99")),
            errors.NotFound,
            "version",
        ),
        (served.stub.ModelReady(pb.ModelReadyRequest(name="nope")), errors.NotFound, "name"),
        (
            served.stub.ModelReady(pb.ModelReadyRequest(name="fake", version="x" * 65)),
            errors.InvalidArgument,
            "version",
        ),
        (served.stub.GetModelStatistics(pb.GetModelStatisticsRequest(name="nope")), errors.NotFound, "name"),
        (
            served.stub.Predict(pb.PredictRequest(model_name="nope", input=raw(1))),
            errors.NotFound,
            "model_name",
        ),
        (
            served.stub.Predict(pb.PredictRequest(model_name="fake", model_version="99", input=raw(1))),
            errors.NotFound,
            "model_version",
        ),
    ]
    for call, kind, field in calls:
        error = await _error(call)
        assert isinstance(error, kind), (field, error)
        assert [v.field for v in error.field_violations] == [field], error


async def test_an_empty_model_name_is_invalid_argument_naming_the_field(served: Served) -> None:
    """GetModelMetadata and ModelReady without a name were NOT_FOUND "model '' does not exist"; like Predict
    without a model_name they are INVALID_ARGUMENT "name is required", listing the models. GetModelStatistics
    without one still answers for every model."""
    for call, field in (
        (served.stub.GetModelMetadata(pb.GetModelMetadataRequest()), "name"),
        (served.stub.ModelReady(pb.ModelReadyRequest(version="1")), "name"),
        (served.stub.Predict(pb.PredictRequest(input=raw(1))), "model_name"),
    ):
        error = await _error(call)
        assert isinstance(error, errors.InvalidArgument), error
        assert error.message == f"{field} is required; models: broken, counted, fake, slow"
        assert [v.field for v in error.field_violations] == [field]
    everything = await served.stub.GetModelStatistics(pb.GetModelStatisticsRequest())
    assert {s.name for s in everything.statistics} == {"broken", "counted", "fake", "slow"}


async def test_a_malformed_image_id_is_named_as_input_image_id_and_never_fetched(served: Served) -> None:
    """An image id that is no UUID was sent on to the file service, whose answer named its own field
    (``image_id``); it is refused here, naming the request's ``input.image_id``."""
    fetcher = MemoryFetcher({STORED: png(200)})
    predictor = Predictor(served.repository, ImageDecoder(max_pixels=1_000_000), fetcher)
    request = pb.PredictRequest(model_name="fake", input=image_pb2.ImageInput(image_id="abc"))
    with pytest.raises(errors.InvalidArgument) as info:
        await predictor.predict(request)
    assert info.value.message.startswith("input.image_id 'abc' is not an image id; image ids are UUIDs")
    assert [v.field for v in info.value.field_violations] == ["input.image_id"]
    assert fetcher.fetched == []


async def test_a_declared_format_that_the_bytes_contradict_names_input_encoded_format(served: Served) -> None:
    """A declared format the bytes contradict, or that is no format, is 400 naming ``input.encoded.format``, as
    the image processing service answers it (checked before decoding, as there)."""
    for declared, words in (
        (image_pb2.IMAGE_FORMAT_JPEG, "format says JPEG but the bytes are a PNG image"),
        (image_pb2.ImageFormat.ValueType(99), "format 99 is not an image format"),
    ):
        encoded = image_pb2.EncodedImage(data=png(200), format=declared)
        error = await _error(
            served.stub.Predict(
                pb.PredictRequest(model_name="fake", input=image_pb2.ImageInput(encoded=encoded))
            )
        )
        assert isinstance(error, errors.InvalidArgument)
        assert words in error.message
        assert errors.http_status(error) == 400
        assert [v.field for v in error.field_violations] == ["input.encoded.format"]


async def test_an_image_smaller_than_the_model_reads_is_refused_before_any_batch(served: Served) -> None:
    """An image under the model's ``min_image_size`` is INVALID_ARGUMENT (DATA, HTTP 400) that says the least
    size, and never reaches a batch, where its failure would fail the other requests' batch."""
    model = served.repository.get("fake", "1").model
    assert isinstance(model, FakeModel)
    before = len(model.batches)
    error = await _error(
        served.stub.Predict(pb.PredictRequest(model_name="fake", model_version="1", input=raw(200, width=3)))
    )
    assert isinstance(error, errors.InvalidArgument)
    assert error.category == errors.InvalidData.default_category
    assert errors.http_status(error) == 400
    assert "3x6 pixels" in error.message
    assert "at least 4x4" in error.message
    assert [v.field for v in error.field_violations] == ["input"]
    assert len(model.batches) == before
    fits = await served.stub.Predict(
        pb.PredictRequest(model_name="fake", model_version="1", input=raw(200, width=4, height=4))
    )
    assert fits.strip_reading.verdict == pb.VERDICT_POSITIVE


async def test_concurrent_predictions_share_batches(served: Served) -> None:
    """Concurrent requests to one version are computed in batches larger than one."""
    model = served.repository.get("fake", "1").model
    assert isinstance(model, FakeModel)
    before = len(model.batches)
    await asyncio.gather(
        *(
            served.stub.Predict(pb.PredictRequest(model_name="fake", model_version="1", input=raw(i)))
            for i in range(8)
        )
    )
    sizes = [size for _, size in model.batches[before:]]
    assert sum(sizes) == 8
    assert max(sizes) > 1


async def test_client_deadline_drops_a_queued_request(served: Served) -> None:
    """A request whose deadline passes while it waits behind a busy instance is answered DEADLINE_EXCEEDED
    and never computed."""
    model = served.repository.get("slow").model
    assert isinstance(model, FakeModel)
    busy = asyncio.ensure_future(served.stub.Predict(pb.PredictRequest(model_name="slow", input=raw(200))))
    await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.Predict(pb.PredictRequest(model_name="slow", input=raw(100)), timeout=0.1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await busy
    await asyncio.sleep(0.05)
    assert model.batches == [("predict", 1)]
    [stats] = (await served.stub.GetModelStatistics(pb.GetModelStatisticsRequest(name="slow"))).statistics
    assert stats.success_count == 1
    # Our queue deadline and gRPC's own cancellation race at the same instant; a cancellation at the deadline
    # is counted as the deadline (it was counted CANCELLED when gRPC won).
    assert dict(stats.failures_by_reason) == {"DEADLINE_EXCEEDED": 1}


@pytest.mark.parametrize(
    ("allowed", "cancel_after", "reason"),
    [(0.02, 0.1, "DEADLINE_EXCEEDED"), (0.5, 0.42, "DEADLINE_EXCEEDED"), (5.0, 0.1, "CANCELLED")],
    ids=["after-the-deadline", "within-the-slack", "long-before"],
)
async def test_a_call_cancelled_at_or_just_before_its_deadline_counts_as_the_deadline(
    served: Served, allowed: float, cancel_after: float, reason: str
) -> None:
    """gRPC cancels the handler when the client's deadline passes, wherever the request is (here fetching its
    image, before any queue of ours sees the deadline), and the client's cancel at its own deadline reaches the
    server a little before the server's (which started when the call's headers arrived): a cancellation after
    the deadline or with no more than the slack left counts as DEADLINE_EXCEEDED, one long before it as
    CANCELLED. Expired calls were counted CANCELLED, hiding slow calls among clients that gave up."""
    predictor = Predictor(served.repository, ImageDecoder(max_pixels=1_000_000))

    async def slow_fetch(progress: float, stage: str) -> None:
        await asyncio.sleep(10)

    def failures() -> dict[str, int]:
        return dict(served.repository.get("fake", "1").stats.failures_by_reason)

    before = failures()
    request = pb.PredictRequest(model_name="fake", model_version="1", input=raw(9))
    call = asyncio.ensure_future(
        predictor.predict(request, deadline=time.monotonic() + allowed, on_stage=slow_fetch)
    )
    await asyncio.sleep(cancel_after)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    after = failures()
    assert after.get(reason, 0) == before.get(reason, 0) + 1, (reason, after)


async def test_cancelled_stream_drops_its_queued_requests(served: Served) -> None:
    """When a client abandons a stream, its requests still queued are never computed."""
    model = served.repository.get("slow").model
    assert isinstance(model, FakeModel)
    before = len(model.batches)

    async def produce() -> AsyncIterator[pb.StreamInferenceRequest]:
        for i in range(4):
            yield pb.StreamInferenceRequest(request=pb.PredictRequest(model_name="slow", input=raw(200 - i)))
        await asyncio.sleep(10)

    call = served.stub.StreamInference(produce())
    first = await call.read()
    assert isinstance(first, pb.StreamInferenceResponse)
    assert first.HasField("response")
    call.cancel()
    await asyncio.sleep(0.8)
    # The first was answered and at most the one then computing finished; the other two were dropped.
    assert len(model.batches) - before <= 2
    assert (await served.stub.ModelReady(pb.ModelReadyRequest(name="slow"))).ready


async def test_a_stream_cancelled_with_its_window_full_computes_nothing_more(tmp_path: Path) -> None:
    """The request read while the window was full had its task created before it found room: a stream cancelled
    then left that task untracked, computed and counted a success. Now only the request computing at the
    cancellation is computed, and none counts as a success."""
    write_model(tmp_path, name="held", max_batch_size=1, max_queue_delay_ms=0)
    runtime, task, repository = await start(tmp_path, FakeFactory(), stream_max_in_flight=1)
    model = repository.get("held").model
    assert isinstance(model, FakeModel)
    model.release = threading.Event()

    async def produce() -> AsyncIterator[pb.StreamInferenceRequest]:
        for i in range(4):
            yield pb.StreamInferenceRequest(request=pb.PredictRequest(model_name="held", input=raw(200 - i)))
        await asyncio.sleep(10)

    try:
        async with grpc.aio.insecure_channel(f"localhost:{runtime.grpc_port}") as channel:
            call = pb_grpc.InferenceServiceStub(channel).StreamInference(produce())
            started = time.monotonic()
            while not model.batches and time.monotonic() - started < 5:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the server reads on until its window is full
            call.cancel()
            await asyncio.sleep(0.1)
            model.release.set()
            await asyncio.sleep(0.3)
        assert model.batches == [("predict", 1)]
        stats = repository.get("held").stats.to_proto()
        assert stats.success_count == 0
    finally:
        model.release.set()
        runtime.stopping.set()
        await asyncio.wait_for(task, 10)
        await repository.close()


async def test_a_stream_left_open_answers_what_it_read_then_ends_unavailable_and_the_drain_does_not_wait(
    tmp_path: Path,
) -> None:
    """With a 20 s grace: when the service stops, a stream the client keeps open reads no more requests, answers
    the two it has (one still computing), then ends UNAVAILABLE (``RESTARTING``), and the service stops within
    about a second instead of waiting out the grace."""
    write_model(tmp_path, name="held", max_batch_size=1, max_queue_delay_ms=0)
    runtime, task, repository = await start(tmp_path, FakeFactory(), grace_seconds=20)
    model = repository.get("held").model
    assert isinstance(model, FakeModel)
    model.release = threading.Event()
    held_open = asyncio.Event()

    async def produce() -> AsyncIterator[pb.StreamInferenceRequest]:
        for request_id in ("a", "b"):
            request = pb.PredictRequest(model_name="held", input=raw(200), request_id=request_id)
            yield pb.StreamInferenceRequest(request=request)
        await held_open.wait()

    answered: list[str] = []
    try:
        async with grpc.aio.insecure_channel(f"localhost:{runtime.grpc_port}") as channel:
            call = pb_grpc.InferenceServiceStub(channel).StreamInference(produce())
            while not model.batches:
                await asyncio.sleep(0.01)
            started = asyncio.get_running_loop().time()
            runtime.stopping.set()
            await asyncio.sleep(0.1)
            model.release.set()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async with asyncio.timeout(5):
                    async for reply in call:
                        assert reply.HasField("response")
                        answered.append(reply.request_id)
            await asyncio.wait_for(task, 30)
            stopped = asyncio.get_running_loop().time() - started
            held_open.set()  # the client's sending task ends with its call, not with the garbage collector
            await asyncio.sleep(0.05)
    finally:
        held_open.set()
        model.release.set()
        runtime.stopping.set()
        await asyncio.wait_for(task, 30)
        await repository.close()
    assert answered == ["a", "b"]
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAVAILABLE, RESTARTING)
    assert stopped < 5  # it waited out its 20 s grace


async def test_stream_answers_each_request_and_survives_a_bad_one(served: Served) -> None:
    """A bad request in the middle gets its error in its own response; the others, before and after, succeed."""
    requests = [
        pb.PredictRequest(model_name="fake", input=raw(200), request_id="a"),
        pb.PredictRequest(model_name="fake", input=raw(20), request_id="b"),
        pb.PredictRequest(model_name="nope", input=raw(20), request_id="c"),
        pb.PredictRequest(model_name="fake", input=raw(200), request_id="d"),
        pb.PredictRequest(model_name="fake", input=raw(20)),
    ]

    async def produce() -> AsyncIterator[pb.StreamInferenceRequest]:
        for request in requests:
            yield pb.StreamInferenceRequest(request=request)

    responses = [r async for r in served.stub.StreamInference(produce())]
    assert [r.request_id for r in responses[:4]] == ["a", "b", "c", "d"]
    assert len(responses[4].request_id) == 32
    assert responses[0].response.strip_reading.verdict == pb.VERDICT_POSITIVE
    assert responses[1].response.strip_reading.verdict == pb.VERDICT_NEGATIVE
    assert not responses[2].HasField("response")
    error = errors.from_status(responses[2].error)
    assert isinstance(error, errors.NotFound)
    assert "models:" in error.message
    assert responses[3].response.strip_reading.verdict == pb.VERDICT_POSITIVE
    assert responses[4].response.request_id == responses[4].request_id


async def test_a_failed_predict_names_its_request_id_as_a_failed_stream_item_does(served: Served) -> None:
    """A unary Predict that fails carries the request's id (the client's, or the one the server gave it) in its
    ErrorInfo metadata, whatever failed: the model lookup, a parameter, the model itself; and a stream's failed
    item carries it there too. Only the stream's response named it, so a client could not tell which of its
    unary calls a logged failure was."""
    bad_parameter = {"threshold": params_pb2.ParamValue(number_value=-1)}
    failing = [
        pb.PredictRequest(model_name="nope", input=raw(1), request_id="u-1"),
        pb.PredictRequest(model_name="fake", input=raw(1), request_id="u-2", parameters=bad_parameter),
        pb.PredictRequest(model_name="fake", input=raw(POISON), request_id="u-3"),
    ]
    codes = []
    for request in failing:
        error = await _error(served.stub.Predict(request))
        codes.append(error.code)
        assert error.metadata[REQUEST_ID_KEY] == request.request_id, error
    assert codes == [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL]
    generated = await _error(served.stub.Predict(pb.PredictRequest(model_name="nope", input=raw(1))))
    assert len(generated.metadata[REQUEST_ID_KEY]) == 32

    async def produce() -> AsyncIterator[pb.StreamInferenceRequest]:
        for request in failing:
            yield pb.StreamInferenceRequest(request=request)
        yield pb.StreamInferenceRequest(request=pb.PredictRequest(model_name="nope", input=raw(1)))

    answers = [a async for a in served.stub.StreamInference(produce())]
    assert [a.request_id for a in answers[:3]] == ["u-1", "u-2", "u-3"]
    for answer in answers:
        assert errors.from_status(answer.error).metadata[REQUEST_ID_KEY] == answer.request_id


async def test_statistics_count_requests_outcomes_and_batches(served: Served) -> None:
    """Requests, successes, failures by reason, queue and compute time and batch sizes are counted."""
    stub = served.stub
    for value in (50, 150, 250):
        await stub.Predict(pb.PredictRequest(model_name="counted", input=raw(value)))
    bad = pb.PredictRequest(
        model_name="counted", input=raw(1), parameters={"threshold": params_pb2.ParamValue(number_value=-1)}
    )
    await _error(stub.Predict(bad))
    await _error(stub.Predict(pb.PredictRequest(model_name="counted", input=raw(POISON))))
    response = await stub.GetModelStatistics(pb.GetModelStatisticsRequest(name="counted"))
    [stats] = response.statistics
    assert (stats.name, stats.version) == ("counted", "1")
    assert stats.request_count == 5
    assert stats.success_count == 3
    assert dict(stats.failures_by_reason) == {"INVALID_ARGUMENT": 1, "INTERNAL": 1}
    assert dict(stats.batch_size_counts) == {1: 4}
    assert stats.compute_seconds_total > 0
    assert stats.queue_seconds_total >= 0
    everything = await stub.GetModelStatistics(pb.GetModelStatisticsRequest())
    assert {(s.name, s.version) for s in everything.statistics} >= {
        ("fake", "1"),
        ("fake", "2"),
        ("broken", "1"),
    }
    assert isinstance(
        await _error(stub.GetModelStatistics(pb.GetModelStatisticsRequest(name="x"))), errors.NotFound
    )


async def _statistics(served: Served, name: str) -> pb.ModelStatistics:
    [stats] = (await served.stub.GetModelStatistics(pb.GetModelStatisticsRequest(name=name))).statistics
    return stats


async def test_statistics_count_the_queue_time_of_requests_that_got_no_answer(served: Served) -> None:
    """A request that expired or was cancelled while queued counts its wait in queue_seconds_total and in
    queued_count; only answered requests were counted, which made a saturated queue look short. Compute time is
    counted per batch, with batch_count."""
    before = await _statistics(served, "slow")
    busy = asyncio.ensure_future(served.stub.Predict(pb.PredictRequest(model_name="slow", input=raw(200))))
    await asyncio.sleep(0.05)  # computing now, for 0.3 s: the next two wait in the queue
    expired = asyncio.ensure_future(
        served.stub.Predict(pb.PredictRequest(model_name="slow", input=raw(100)), timeout=0.15)
    )
    cancelled = served.stub.Predict(pb.PredictRequest(model_name="slow", input=raw(101)))
    await asyncio.sleep(0.15)
    cancelled.cancel()
    answered = await busy
    assert (await _error(expired)).code == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.05)
    after = await _statistics(served, "slow")
    assert after.queued_count - before.queued_count == 3
    waited = after.queue_seconds_total - before.queue_seconds_total
    assert 0.2 < waited < 0.2 + 0.3, (
        waited
    )  # the two that waited about 0.15 s each, and nothing of the computing
    assert after.batch_count - before.batch_count == 1
    assert answered.batch_size == 1
    assert after.compute_seconds_total - before.compute_seconds_total == pytest.approx(
        answered.compute_seconds
    )


async def test_statistics_sum_compute_time_once_per_batch(served: Served) -> None:
    """compute_seconds_total adds each batch's time once and batch_count counts the batches: a response's
    compute_seconds is its batch's, shared by batch_size requests, so the shares add up to the total."""
    before = await _statistics(served, "counted")
    responses = await asyncio.gather(
        *(served.stub.Predict(pb.PredictRequest(model_name="counted", input=raw(i))) for i in range(6))
    )
    after = await _statistics(served, "counted")
    batches = after.batch_count - before.batch_count
    assert batches == sum(after.batch_size_counts.values()) - sum(before.batch_size_counts.values())
    assert sum(1 / r.batch_size for r in responses) == pytest.approx(batches)
    assert after.compute_seconds_total - before.compute_seconds_total == pytest.approx(
        sum(r.compute_seconds / r.batch_size for r in responses)
    )


async def test_health_is_serving_and_metrics_export_batches(served: Served) -> None:
    """Health is SERVING with a ready model; /metrics carries batch size and latency histograms."""
    health = health_pb2_grpc.HealthStub(served.channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert served.runtime.monitor.results[0].detail.startswith("ready on cpu: counted/1, fake/1")

    async with httpx.AsyncClient(base_url=f"http://localhost:{served.runtime.http_port}") as client:
        metrics = (await client.get("/metrics/")).text
    assert 'mesh_inference_batch_size_count{model="fake",version="1"}' in metrics
    assert "mesh_inference_request_seconds_bucket" in metrics
    assert 'mesh_inference_model_ready{model="broken",version="1"} 0.0' in metrics


async def test_health_is_not_serving_without_a_ready_model(tmp_path: Path) -> None:
    """A server whose every model failed to load reports NOT_SERVING (and why, on /healthz)."""
    write_model(tmp_path, name="broken", options={"fail_warm_up": True})
    runtime, task, repository = await start(tmp_path, FakeFactory())
    try:
        async with grpc.aio.insecure_channel(f"localhost:{runtime.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "no model is ready" in runtime.monitor.results[0].detail
    finally:
        runtime.stopping.set()
        await asyncio.wait_for(task, 10)
        await repository.close()


async def test_client_maps_errors_and_streams(served: Served) -> None:
    """The typed client returns messages and raises MeshErrors; its stream wraps requests for the caller."""
    client = InferenceClient(served.channel)
    assert [m.name for m in await client.list_models()][:2] == ["broken", "counted"]
    assert (await client.metadata("fake", "1")).version == "1"
    assert (await client.ready("fake")).ready
    assert await client.statistics("fake")
    response = await client.predict_image("fake", STORED, version="1", request_id="x")
    assert (response.request_id, response.model_version) == ("x", "1")
    with pytest.raises(errors.NotFound):
        await client.predict_image("fake", MISSING)

    async def requests() -> AsyncIterator[pb.PredictRequest]:
        yield pb.PredictRequest(model_name="fake", input=raw(200), request_id="s1")
        yield pb.PredictRequest(model_name="fake", input=raw(1), precheck_only=True, request_id="s2")

    answers = [r async for r in client.stream(requests())]
    assert [a.request_id for a in answers] == ["s1", "s2"]
    assert answers[1].response.strip_reading.precheck_only


async def test_raw_pixels_are_narrowed_off_the_event_loop(tmp_path: Path) -> None:
    """A 16-bit raw frame is narrowed in a worker thread, as encoded images are decoded: an 80 MB one narrowed
    on the event loop held every other call, stream and health check of the service for half a second."""
    write_model(tmp_path, name="counted", max_queue_delay_ms=0)
    repository = ModelRepository(tmp_path, factories={"fake": FakeFactory()})
    await repository.load()
    threads: list[str] = []

    class RecordingDecoder(ImageDecoder):
        def decode_raw(self, raw: image_pb2.RawImage, *, field: str = "input.raw") -> np.ndarray:
            threads.append(threading.current_thread().name)
            return super().decode_raw(raw, field=field)

    predictor = Predictor(repository, RecordingDecoder(max_pixels=1_000_000), MemoryFetcher({}))
    raw = image_pb2.RawImage(
        pixels=bytes(2 * 6 * 8), width=8, height=6, channels=1, pixel_type=image_pb2.PIXEL_TYPE_UINT16
    )
    try:
        await predictor.predict(pb.PredictRequest(model_name="counted", input=image_pb2.ImageInput(raw=raw)))
    finally:
        await repository.close()
    assert threads
    assert threads != [threading.main_thread().name]
