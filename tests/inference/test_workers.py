"""Model instances in worker processes (``instance_kind: process``): same answers, parallel, crash-proof."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import AsyncIterator
from multiprocessing import reduction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from mesh.common.v1 import errors_pb2, image_pb2
from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.inference.v1 import inference_service_pb2_grpc as pb_grpc
from mesh.kit.channels import open_channel
from mesh.kit.errors import Internal, InvalidArgument, Unavailable
from mesh.kit.runtime import ServiceRuntime
from mesh.kit.settings import CallerSettings
from mesh.services.inference.checks import models_check
from mesh.services.inference.client import InferenceClient
from mesh.services.inference.images import ImageDecoder
from mesh.services.inference.predictor import Predictor
from mesh.services.inference.repository import ModelConfigError, ModelRepository, read_config
from mesh.services.inference.servicer import InferenceServicer
from mesh.services.inference.settings import SERVICE_NAME, InferenceSettings
from mesh.services.inference.workers import (
    REASON_MODEL_CRASHED,
    SharedBuffer,
    WorkerModel,
    _Failed,
    _next_batch,
    _Outputs,
    _portable,
    _receive,
    _serve,
    _WorkerSpec,
)
from tests.inference.fakes import POISON, FakeFactory, write_model

CRASH = 66


def request(model: str, value: int, *, precheck: bool = False) -> pb.PredictRequest:
    """A uniform 8x6 RGB image of ``value`` as raw pixels."""
    raw = image_pb2.RawImage(pixels=bytes([value]) * (8 * 6 * 3), width=8, height=6, channels=3)
    return pb.PredictRequest(model_name=model, input=image_pb2.ImageInput(raw=raw), precheck_only=precheck)


async def loaded(root: Path) -> ModelRepository:
    repository = ModelRepository(root, factories={"fake": FakeFactory()})
    await repository.load()
    return repository


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[Predictor]:
    """Two models: the same fake one in the server's threads ("threads") and in two worker processes ("processes")."""
    write_model(tmp_path / "models", name="threads")
    write_model(
        tmp_path / "models",
        name="processes",
        instance_kind="process",
        instance_count=2,
        options={"exit_on_pixel": CRASH},
    )
    repository = await loaded(tmp_path / "models")
    yield Predictor(repository, ImageDecoder(max_pixels=1_000_000))
    await repository.close()


def _ready_gauge(model: str) -> float | None:
    return REGISTRY.get_sample_value("mesh_inference_model_ready", {"model": model, "version": "1"})


def _worker_processes() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if "-worker-" in (p.name or "")]


async def test_worker_processes_answer_as_the_model_does_in_the_server(workers: Predictor) -> None:
    """Outputs, parameters and the pre-check come back from a worker process exactly as computed in-process."""
    for value, precheck, threshold in (
        (200, False, None),
        (50, False, None),
        (200, True, None),
        (100, False, 40.0),
    ):
        answers = []
        for model in ("threads", "processes"):
            message = request(model, value, precheck=precheck)
            if threshold is not None:
                message.parameters["threshold"].number_value = threshold
            response = await workers.predict(message)
            answers.append(response.strip_reading)
        assert answers[0] == answers[1]
        assert answers[1].verdict != 0
    served, _ = workers.repository.get("processes").require_ready()
    assert served.platform == "python"
    assert workers.repository.computes_here  # "threads" does


async def test_an_error_raised_in_a_worker_reaches_the_caller_with_its_type(workers: Predictor) -> None:
    """A model's exception crosses the process boundary as itself; the server maps it as it would in-process."""
    version = workers.repository.get("processes")
    _, scheduler = version.require_ready()
    image = np.full((6, 8, 3), POISON, dtype=np.uint8)
    with pytest.raises(ValueError, match="poisoned image"):
        await scheduler.submit(("predict", ()), image)
    assert (await workers.predict(request("processes", 200))).strip_reading.verdict != 0


async def test_an_image_that_crashes_its_worker_alone_is_internal_data_and_the_worker_starts_again(
    workers: Predictor,
) -> None:
    """A worker that dies computing one image alone answers INTERNAL, category DATA, reason MODEL_CRASHED: not
    UNAVAILABLE, which gRPC's retry policy and the queue resend (one call crashed the worker four times). The
    next request is served by a new process."""
    before = {p.pid for p in _worker_processes()}
    assert len(before) == 2
    with pytest.raises(Internal, match=r"this image crashed the model.*\(code 17\)") as crashed:
        await workers.predict(request("processes", CRASH))
    assert crashed.value.category == errors_pb2.ERROR_CATEGORY_DATA
    assert crashed.value.reason == REASON_MODEL_CRASHED
    response = await workers.predict(request("processes", 200))
    response_again = await workers.predict(request("processes", 200))
    assert response.strip_reading.verdict == response_again.strip_reading.verdict != 0
    after = {p.pid for p in _worker_processes()}
    assert len(after) == 2
    assert len(after - before) == 1


def test_a_worker_crash_in_a_batch_of_several_stays_unavailable(tmp_path: Path) -> None:
    """A batch of several images cannot tell which one killed the worker: UNAVAILABLE, as before (the batcher
    then computes each image alone)."""
    config = read_config(write_model(tmp_path, options={"exit_on_pixel": CRASH}) / "config.yaml")
    model = WorkerModel(FakeFactory(), config, "cpu", 1)
    try:
        images = [np.full((6, 8, 3), value, dtype=np.uint8) for value in (200, CRASH)]
        with pytest.raises(Unavailable, match=r"exited \(code 17\) while computing this batch"):
            model.run_batch("predict", (), images)
    finally:
        model.close()


async def test_a_crashing_image_in_a_batch_fails_alone_and_its_neighbours_are_served(tmp_path: Path) -> None:
    """The batch with the crashing image fails UNAVAILABLE inside the batcher, which computes each image alone:
    the crashing one gets INTERNAL (DATA), the others their readings."""
    write_model(
        tmp_path,
        name="batched",
        instance_kind="process",
        instance_count=1,
        max_batch_size=4,
        max_queue_delay_ms=200,
        options={"exit_on_pixel": CRASH},
    )
    repository = await loaded(tmp_path)
    try:
        predictor = Predictor(repository, ImageDecoder(max_pixels=1_000_000))
        outcomes = await asyncio.gather(
            *(predictor.predict(request("batched", value)) for value in (200, CRASH, 50)),
            return_exceptions=True,
        )
        assert isinstance(outcomes[1], Internal)
        assert outcomes[1].category == errors_pb2.ERROR_CATEGORY_DATA
        assert [o.strip_reading.verdict for o in (outcomes[0], outcomes[2])] == [  # type: ignore[union-attr]
            pb.VERDICT_POSITIVE,
            pb.VERDICT_NEGATIVE,
        ]
        assert repository.get("batched").stats.batch_size_counts == {3: 1}  # they did share a batch
    finally:
        await repository.close()


async def test_one_call_over_a_mesh_channel_crashes_the_worker_once(tmp_path: Path) -> None:
    """Over a real server and the mesh's own channel (open_channel: gRPC retries UNAVAILABLE, 4 attempts), one
    call with an image that kills the worker reaches the server once and crashes the worker once (it was 4)."""
    write_model(
        tmp_path, name="fragile", instance_kind="process", instance_count=1, options={"exit_on_pixel": CRASH}
    )
    repository = await loaded(tmp_path)
    predictor = Predictor(repository, ImageDecoder(max_pixels=1_000_000))
    settings = InferenceSettings(grpc_port=0, http_port=0, grace_seconds=1, health_interval_seconds=0.05)
    runtime = ServiceRuntime(
        "inference", settings, service_names=[SERVICE_NAME], checks=[models_check(repository)]
    )
    pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(predictor), runtime.server)
    serving = asyncio.create_task(runtime.run())
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        channel = open_channel(f"localhost:{runtime.grpc_port}", CallerSettings(), service=SERVICE_NAME)
        client = InferenceClient(channel)
        with pytest.raises(Internal, match="this image crashed the model") as crashed:
            await client.predict(request("fragile", CRASH))
        assert crashed.value.category == errors_pb2.ERROR_CATEGORY_DATA
        statistics = (await client.statistics("fragile"))[0]
        assert statistics.request_count == 1
        assert dict(statistics.failures_by_reason) == {"INTERNAL": 1}
        await channel.close(None)
    finally:
        runtime.stopping.set()
        await asyncio.wait_for(serving, 10)
        await repository.close()


async def test_process_instances_compute_batches_at_once_outside_the_server(tmp_path: Path) -> None:
    """Two batches compute at the same time in two worker processes (each waits until the other has started)."""
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    write_model(
        tmp_path / "models",
        name="parallel",
        instance_kind="process",
        instance_count=2,
        max_batch_size=1,
        max_queue_delay_ms=0,
        options={"rendezvous_dir": str(meeting), "rendezvous_count": 2},
    )
    repository = await loaded(tmp_path / "models")
    assert not repository.computes_here  # so the server leaves its own (empty) GPU pool out of its metrics
    try:
        predictor = Predictor(repository, ImageDecoder(max_pixels=1_000_000))
        responses = await asyncio.gather(*(predictor.predict(request("parallel", 200)) for _ in range(2)))
        assert all(r.strip_reading.verdict != 0 for r in responses)
        pids = {int(name.name.split("-")[0]) for name in meeting.iterdir()}
        assert len(pids) == 2
        assert os.getpid() not in pids
    finally:
        await repository.close()


async def test_closing_the_repository_stops_its_worker_processes(tmp_path: Path) -> None:
    """No worker process outlives the repository that started it."""
    write_model(tmp_path, name="closing", instance_kind="process", instance_count=2)
    repository = await loaded(tmp_path)
    workers = [p for p in _worker_processes() if p.name and p.name.startswith("closing-")]
    assert len(workers) == 2
    await repository.close()
    assert not any(p.is_alive() for p in workers)


async def test_a_model_that_cannot_load_in_its_worker_leaves_the_version_unavailable(tmp_path: Path) -> None:
    """The worker's load error becomes the version's reason, and its worker processes are gone."""
    write_model(
        tmp_path, name="broken", instance_kind="process", instance_count=2, options={"fail_warm_up": True}
    )
    repository = await loaded(tmp_path)
    version = repository.get("broken")
    assert version.state == "UNAVAILABLE"
    assert "weights are corrupt" in version.reason
    assert not [p for p in _worker_processes() if p.name and p.name.startswith("broken-")]
    await repository.close()


@pytest.mark.parametrize("fail_warm_up", [False, True])
def test_a_worker_whose_server_went_away_while_it_started_exits_quietly(
    tmp_path: Path, fail_warm_up: bool
) -> None:
    """A server that stops while its worker still loads (``make up`` stopping at once) closes the pipe; the
    worker's answer then finds no one, and it exits 0. It died with a BrokenPipeError traceback on the
    terminal, one per worker."""
    options = {"warm_up_seconds": 0.5, "fail_warm_up": fail_warm_up}
    config = read_config(write_model(tmp_path, options=options) / "config.yaml")
    context = multiprocessing.get_context("spawn")
    server_end, worker_end = context.Pipe()
    spec = _WorkerSpec(FakeFactory(), config, "cpu", 1, None)
    process = context.Process(target=_serve, args=(worker_end, spec), daemon=True)
    process.start()
    worker_end.close()
    buffer = SharedBuffer.create()
    reduction.send_handle(server_end, buffer.fileno, process.pid)
    server_end.close()
    process.join(30)
    buffer.close()
    assert process.exitcode == 0


@pytest.mark.parametrize("count", ["many", 0, 65])
def test_instance_count_is_auto_or_a_number_in_range(tmp_path: Path, count: Any) -> None:
    """A bad instance_count names the field and what it may be."""
    config = write_model(tmp_path, instance_count=count) / "config.yaml"
    with pytest.raises(ModelConfigError, match="instance_count"):
        read_config(config)


def test_auto_instance_count_is_the_usable_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` asks the kit how many cores this process may use, and stops at 8."""
    config = read_config(write_model(tmp_path, instance_count="auto") / "config.yaml")
    monkeypatch.setattr("mesh.services.inference.repository.usable_cpus", lambda: 3)
    assert config.instances() == 3
    monkeypatch.setattr("mesh.services.inference.repository.usable_cpus", lambda: 64)
    assert config.instances() == 8  # each worker holds a copy of the model
    assert read_config(write_model(tmp_path, name="two", instance_count=2) / "config.yaml").instances() == 2


class _NeedsTwoArguments(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} {b}")


def test_an_exception_that_cannot_cross_processes_becomes_internal_naming_it() -> None:
    """An exception the server could not unpickle is replaced by one that says what it was."""
    error = InvalidArgument("bad image")
    assert _portable(error) is error
    replaced = _portable(_NeedsTwoArguments("x", "y"))
    assert "_NeedsTwoArguments: x y" in str(replaced)


def test_the_pipe_carries_only_the_protocols_messages() -> None:
    """Each end knows what the other may send: outputs and failures arrive typed, and anything else (the
    tuples of an older worker, a stray object) is refused by name instead of being taken for an answer."""
    server_end, worker_end = multiprocessing.Pipe()
    with server_end, worker_end:
        worker_end.send(_Outputs([b"one", b"two"]))
        assert _receive(server_end, "model-worker-0") == _Outputs([b"one", b"two"])
        worker_end.send(_Failed(InvalidArgument("bad image")))
        failed = _receive(server_end, "model-worker-0")
        assert isinstance(failed, _Failed)
        assert isinstance(failed.error, InvalidArgument)
        worker_end.send(("ok", [b"one"]))
        with pytest.raises(Internal, match="model-worker-0 sent tuple, not a message of the worker protocol"):
            _receive(server_end, "model-worker-0")
        server_end.send(None)
        assert _next_batch(worker_end) is None
        server_end.send("compute")
        with pytest.raises(TypeError, match="the server sent str"):
            _next_batch(worker_end)


def test_a_large_batch_gives_its_buffer_back_and_later_batches_still_read_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over KEEP_BYTES the shared buffer is released after the batch; the next batch maps it afresh."""
    monkeypatch.setattr("mesh.services.inference.workers.KEEP_BYTES", 50)
    config = read_config(write_model(tmp_path) / "config.yaml")
    model = WorkerModel(FakeFactory(), config, "cpu", 1)
    try:
        # Sizes change from batch to batch, so the worker maps the buffer anew each time while the previous
        # batch's images may still be referenced.
        for value, verdict, width in ((200, "POSITIVE", 8), (50, "NEGATIVE", 16), (220, "POSITIVE", 4)):
            outputs = model.run_batch("predict", (), [np.full((6, width, 3), value, dtype=np.uint8)])
            response = pb.PredictResponse()
            model.fill_response(outputs[0], response)
            assert pb.Verdict.Name(response.strip_reading.verdict) == f"VERDICT_{verdict}"
            assert model._workers[0]._buffer.size == 0
    finally:
        model.close()


async def test_a_worker_that_cannot_start_again_makes_the_version_unavailable_until_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Health tells the truth: while no worker process runs, the version is UNAVAILABLE with the reason, health
    fails, requests get UNAVAILABLE; a background thread starts the worker again once its model loads."""
    monkeypatch.setattr("mesh.services.inference.workers.RETRY_FIRST_SECONDS", 0.1)
    broken_weights = tmp_path / "broken-weights"
    write_model(
        tmp_path / "models",
        name="fragile",
        instance_kind="process",
        instance_count=1,
        options={"exit_on_pixel": CRASH, "fail_warm_up_while": str(broken_weights)},
    )
    repository = await loaded(tmp_path / "models")
    try:
        predictor = Predictor(repository, ImageDecoder(max_pixels=1_000_000))
        health = models_check(repository)
        version = repository.get("fragile")
        broken_weights.touch()
        with pytest.raises(Internal, match="crashed the model"):
            await predictor.predict(request("fragile", CRASH))
        with pytest.raises(Unavailable, match="could not be started again"):
            await predictor.predict(request("fragile", 200))
        assert not version.ready
        assert _ready_gauge("fragile") == 0
        state, reason = version.status()
        assert state == "UNAVAILABLE"
        assert "weights unreadable" in reason
        with pytest.raises(RuntimeError, match="no model is ready"):
            await health.probe()
        with pytest.raises(Unavailable, match="no worker process of this model runs"):
            await predictor.predict(request("fragile", 200))

        broken_weights.unlink()
        for _ in range(300):
            if version.ready:
                break
            await asyncio.sleep(0.1)
        assert version.status() == ("READY", "ready")
        assert _ready_gauge("fragile") == 1
        assert (await predictor.predict(request("fragile", 200))).strip_reading.verdict != 0
        await health.probe()
    finally:
        await repository.close()


def test_a_lone_batch_may_use_every_core_for_opencv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers start with their share of the cores; a batch computed while the others idle gets them all."""
    monkeypatch.setattr("mesh.services.inference.workers.usable_cpus", lambda: 6)
    config = read_config(write_model(tmp_path, options={"report_opencv_threads": True}) / "config.yaml")
    model = WorkerModel(FakeFactory(), config, "cpu", 3)
    try:
        outputs = model.run_batch("predict", (), [np.full((6, 8, 3), 200, dtype=np.uint8)])
        response = pb.PredictResponse()
        model.fill_response(outputs[0], response)
        assert response.strip_reading.control_line.center_x == 6
    finally:
        model.close()
