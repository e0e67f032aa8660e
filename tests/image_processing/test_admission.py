"""Admission and the threads behind it: abandoned pipelines stop, memory is budgeted before decoding, the
health check and the codec stay out of asyncio's default pool, and file service calls have a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import numpy as np
import pytest

from mesh.common.v1 import image_pb2, params_pb2
from mesh.file.v1 import file_service_pb2, file_service_pb2_grpc
from mesh.image.v1 import image_processing_service_pb2 as pb
from mesh.image.v1 import image_processing_service_pb2_grpc as pb_grpc
from mesh.kit import errors
from mesh.kit.devices import gpu_available
from mesh.kit.settings import FileServiceAddress
from mesh.kit.wire import serialize_reply
from mesh.services.file.client import FileClient
from mesh.services.image_processing import codec
from mesh.services.image_processing.admission import Admission
from mesh.services.image_processing.backend import health_check
from mesh.services.image_processing.cpu_backend import CpuBackend, CpuSession
from mesh.services.image_processing.filter_math import Image, output_shapes
from mesh.services.image_processing.processor import Processor
from mesh.services.image_processing.registry import Device, Step, validate_pipeline
from mesh.services.image_processing.servicer import RAW_INPUT, ImageProcessingServicer, add_to_server
from tests.image_processing.fakes import CallContext, MemoryStore
from tests.image_processing.gpu_cases import CASES
from tests.image_processing.images import noise, smooth

LIMITS = codec.Limits(max_pixels=1_000_000, max_bytes=8 * 1024 * 1024)
MiB = 1024 * 1024


class GatedBackend(CpuBackend):
    """The CPU backend whose every step waits at a gate, counting the steps that ran and the sessions."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.applied = 0
        self.started = 0

    def start(self, image: Image) -> CpuSession:
        self.started += 1
        return GatedSession(self, image)


class GatedSession(CpuSession):
    def __init__(self, backend: GatedBackend, image: Image) -> None:
        super().__init__(image)
        self.backend = backend

    def apply(self, step: Step) -> float:
        self.backend.entered.set()
        self.backend.gate.wait(10)
        self.backend.applied += 1
        return super().apply(step)


async def _until(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def _default_pool_blocked() -> Iterator[None]:
    """Every thread of asyncio's default pool busy until the block ends (as under a load of large images)."""
    loop = asyncio.get_running_loop()
    release = threading.Event()
    busy = [loop.run_in_executor(None, release.wait, 30) for _ in range(64)]
    try:
        yield
    finally:
        release.set()
        for future in busy:
            future.cancel()


def _png_input(image: Image) -> image_pb2.ImageInput:
    return image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=codec.encode(image, codec.Format.PNG)))


# --- an abandoned pipeline (finding 1) -----------------------------------------------------------------
async def test_a_cancelled_caller_stops_its_pipeline_and_keeps_its_slot_until_the_thread_is_free() -> None:
    """A caller that gives up (deadline, cancel) while its pipeline runs: the running step finishes, no further
    step starts, and admission counts the request until then, not just until the caller left. The pipeline
    used to run all its steps for nobody while admission counted the backend idle."""
    backend = GatedBackend()
    processor = Processor(backend, store=None, limits=LIMITS, workers=1)
    steps = validate_pipeline([("invert", {})] * 5)
    try:
        task = asyncio.create_task(processor.run(noise(20, 20, 3), steps))
        await asyncio.to_thread(backend.entered.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert processor.admission.pending == 1  # the thread still runs its step
        backend.gate.set()
        await _until(lambda: processor.admission.pending == 0)
        assert backend.applied == 1
        assert processor.admission.free_bytes == processor.admission.memory_budget_bytes
    finally:
        backend.gate.set()
        processor.close()


async def test_abandoned_heavy_pipelines_free_the_backend_for_the_next_call() -> None:
    """The reviewer's scenario in small: two heavy requests whose callers give up, then a light one. With a
    worker each, the light one is answered once the heavy ones' current steps end, not their whole
    pipelines (the reviewer's 32 Gaussian blurs held a 2-worker backend ~100 s)."""
    backend = GatedBackend()
    processor = Processor(backend, store=None, limits=LIMITS, workers=2)
    heavy = validate_pipeline([("gaussian_blur", {"sigma": 3.0})] * 32)
    try:
        tasks = [asyncio.create_task(processor.run(noise(64, 64, 3), heavy)) for _ in range(2)]
        await asyncio.to_thread(backend.entered.wait, 10)
        await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        backend.gate.set()
        light = await asyncio.wait_for(processor.run(noise(8, 8, 3), validate_pipeline([("invert", {})])), 10)
        assert light.image.shape == (8, 8, 3)
        await _until(lambda: processor.admission.pending == 0)
        assert backend.applied <= 2 + 1  # the heavy ones' running steps and the light one's
    finally:
        backend.gate.set()
        processor.close()


async def test_a_grpc_deadline_stops_the_pipeline_between_steps() -> None:
    """Over gRPC: when the client's deadline passes, the handler is cancelled, the step in progress ends and
    no other starts; the call stays admitted until the thread is free."""
    backend = GatedBackend()
    processor = Processor(backend, store=None, limits=LIMITS, workers=1)
    server = grpc.aio.server()
    add_to_server(ImageProcessingServicer(processor), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    image = noise(16, 16, 3)
    request = pb.ProcessImageRequest(
        input=image_pb2.ImageInput(
            raw=image_pb2.RawImage(pixels=image.tobytes(), width=16, height=16, channels=3)
        ),
        pipeline=[params_pb2.PipelineStep(filter="invert")] * 5,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ImageProcessingServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ProcessImage(request, timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert backend.entered.is_set()
        await asyncio.sleep(0.5)  # the server's side of the deadline: the handler is cancelled
        assert processor.admission.pending == 1
        backend.gate.set()
        await _until(lambda: processor.admission.pending == 0)
        assert backend.applied == 1
    finally:
        backend.gate.set()
        await server.stop(None)
        processor.close()


# --- memory admission (finding 3) --------------------------------------------------------------------
async def test_a_request_larger_than_the_budget_is_refused_before_decoding_naming_the_sizes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The budget is checked from the header, before a pixel is decoded, and applies to an empty pipeline
    too (it skipped admission): RESOURCE_EXHAUSTED (413, retrying will not help) naming what it needs and
    the budget."""
    processor = Processor(CpuBackend(), store=None, limits=LIMITS, memory_budget_bytes=2 * MiB)
    raw = pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_RAW)
    image = noise(300, 400, 4, np.uint16)  # 960,000 bytes decoded
    decoded: list[bytes] = []

    def decode(data: bytes, limits: codec.Limits, where: str, header: codec.Header) -> Image:
        decoded.append(data)
        return np.zeros((header.height, header.width, header.channels), np.uint16)

    monkeypatch.setattr(codec, "decode", decode)
    try:
        (await processor.process(_png_input(image[:, :200]), [], raw)).release()
        assert len(decoded) == 1  # 480,000 bytes decoded fit, with their file and the reply's copy
        decoded.clear()
        with pytest.raises(errors.PayloadTooLarge) as caught:
            await processor.process(_png_input(image), validate_pipeline([("resize", {"scale": 1.5})]), raw)
        with pytest.raises(errors.PayloadTooLarge, match=r"the 500x300 input .* needs \d+ bytes"):
            await processor.process(_png_input(noise(300, 500, 4, np.uint16)), [], raw)
    finally:
        processor.close()
    assert not decoded
    assert errors.http_status(caught.value) == 413
    message = caught.value.message
    assert "the 400x300 input (4 channels of 16 bits) when its 600x450x4 result is delivered," in message
    assert (
        f"needs 6244124 bytes of memory, more than this server's whole budget of {2 * MiB} bytes" in message
    )
    assert processor.admission.pending == 0


async def test_a_request_waiting_past_its_deadline_is_told_the_bytes_and_the_free_memory() -> None:
    """Admission's own wording of the budget's deadline (the mechanics are mesh.kit.memory_budget's): it names
    the bytes waited for and what is free; the request no longer counts as pending, and the next one waits."""
    admission = Admission(device="cpu", max_pending=8, memory_budget_bytes=100)
    first = await admission.admit(60, "first")
    with pytest.raises(
        errors.DeadlineExceeded,
        match=r"waited 0\.\d s for 70 bytes of the image memory budget \(40 of 100 free\); the deadline passed",
    ):
        await admission.admit(70, "late", deadline=time.monotonic() + 0.05)
    assert admission.pending == 1
    second = asyncio.create_task(admission.admit(60, "second"))
    await asyncio.sleep(0.01)
    assert (admission.pending, second.done()) == (2, False)
    first.release()
    (await asyncio.wait_for(second, 1)).release()
    assert (admission.pending, admission.free_bytes) == (0, 100)


async def test_waiting_requests_count_against_max_pending() -> None:
    """Requests waiting for memory count as queued: beyond max_pending the next is shed at once with a retry
    delay, as before, and counted in the shedding metric."""
    from prometheus_client import REGISTRY

    admission = Admission(device="cpu", max_pending=2, memory_budget_bytes=100)
    held = await admission.admit(100, "first")
    waiting = asyncio.create_task(admission.admit(100, "second"))
    await asyncio.sleep(0.01)
    before = REGISTRY.get_sample_value("mesh_image_pipelines_rejected_total", {"device": "cpu"}) or 0.0
    with pytest.raises(errors.ResourceExhausted) as caught:
        await admission.admit(1, "third")
    assert caught.value.retry_after_seconds
    assert REGISTRY.get_sample_value("mesh_image_pipelines_rejected_total", {"device": "cpu"}) == before + 1
    held.release()
    (await waiting).release()
    assert (admission.pending, admission.free_bytes) == (0, 100)


async def test_work_left_running_keeps_its_share_until_it_ends() -> None:
    """A ticket given back while work started for it still runs in a thread frees its share only when that
    work ends; the cancel flag tells the work to stop."""
    admission = Admission(device="cpu", max_pending=8, memory_budget_bytes=100)
    ticket = await admission.admit(80, "one")
    work: Future[None] = Future()
    ticket.track(work)
    ticket.release()
    assert ticket.cancel.is_set()
    assert admission.free_bytes == 20
    work.set_result(None)
    await _until(lambda: admission.free_bytes == 100)
    assert admission.pending == 0


async def test_a_pipeline_whose_output_is_over_the_pixel_limit_is_refused_before_it_runs() -> None:
    """A rotation whose result would be refused is refused up front, from the parameters: nothing is decoded
    or computed (it used to compute a 1 GB image to refuse it)."""
    backend = GatedBackend()
    backend.gate.set()
    processor = Processor(backend, store=None, limits=codec.Limits(max_pixels=10_000))
    try:
        with pytest.raises(
            errors.PayloadTooLarge, match=r"pipeline\[0\] \(rotate\) output is 141x141 = 19881 pixels"
        ):
            await processor.process(
                _png_input(smooth(100, 100, 3)),
                validate_pipeline([("rotate", {"angle": 45.0})]),
                pb.OutputSpec(),
            )
        with pytest.raises(errors.InvalidArgument, match=r"pipeline\[1\].params.x must be < image width 50"):
            await processor.process(
                _png_input(smooth(100, 100, 3)),
                validate_pipeline([("resize", {"scale": 0.5}), ("crop", {"x": 60})]),
                pb.OutputSpec(),
            )
    finally:
        processor.close()
    assert backend.started == 0
    assert processor.admission.pending == 0


@pytest.mark.parametrize(("name", "params"), CASES)
@pytest.mark.parametrize("shape", [(37, 53, 3), (40, 30, 1), (24, 26, 4)])
def test_planned_output_shapes_are_what_the_steps_make(
    name: str, params: dict[str, Any], shape: tuple[int, int, int]
) -> None:
    """The shape worked out from the parameters is the one the CPU backend produces, for every filter."""
    if name == "convert_color" and shape[2] == 1:
        pytest.skip("colour conversion needs colour")
    steps = validate_pipeline([(name, params), ("rotate", {"angle": 90.0}), ("resize", {"width": 17})])
    image = noise(*shape)
    session = CpuBackend().start(image)
    made = []
    for step in steps:
        session.apply(step)
        made.append(session.result().shape)
    assert output_shapes(*shape, steps) == made


async def test_a_raw_reply_keeps_its_admission_until_it_is_serialised() -> None:
    """A RAW reply views the result's memory, so the admission of a ProcessImage call is given back once the
    reply is serialised (which gRPC does as the handler returns), not when the handler returns; the reply is
    whole. A done callback of the call did it before, at 0.5 ms a call."""
    processor = Processor(CpuBackend(), store=None, limits=LIMITS)
    servicer = ImageProcessingServicer(processor)
    image = noise(30, 20, 3)
    request = pb.ProcessImageRequest(
        input=image_pb2.ImageInput(
            raw=image_pb2.RawImage(pixels=image.tobytes(), width=20, height=30, channels=3)
        ),
        pipeline=[params_pb2.PipelineStep(filter="invert")],
        output=pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_RAW),
    )
    try:
        reply = await servicer.ProcessImage(RAW_INPUT.parse(request.SerializeToString()), CallContext())  # type: ignore[arg-type]
        assert processor.admission.pending == 1
        # The request's samples, the result, and the result's copy in the serialised reply.
        assert processor.admission.free_bytes == processor.admission.memory_budget_bytes - 3 * image.nbytes
        parsed = pb.ProcessImageResponse.FromString(serialize_reply(reply))
        assert parsed.raw.pixels == (255 - image).tobytes()
        assert processor.admission.pending == 0
        assert processor.admission.free_bytes == processor.admission.memory_budget_bytes
    finally:
        processor.close()


# --- threads of their own (finding 2) ------------------------------------------------------------------
async def test_the_cpu_health_check_answers_while_every_default_pool_thread_is_busy() -> None:
    """The compute check does not queue behind work in asyncio's default pool: under load it answered after
    the health timeout, and the service went NOT_SERVING while it worked."""
    check = health_check(CpuBackend())
    with _default_pool_blocked():
        assert "cpu backend" in await asyncio.wait_for(check.check(), 1)


class _Gpu:
    device = Device.GPU

    def check(self) -> str:
        return threading.current_thread().name


async def test_the_gpu_health_check_runs_in_a_thread_of_its_own() -> None:
    """The GPU's check asks the device, so it leaves the loop, but for a thread no request uses."""
    check = health_check(_Gpu())  # type: ignore[arg-type]
    with _default_pool_blocked():
        assert (await asyncio.wait_for(check.check(), 1)).startswith("gpu-health")


async def test_decoding_and_encoding_do_not_use_the_default_pool() -> None:
    """PNG in, PNG out while asyncio's default pool is full: decoding and encoding have a bounded pool of their
    own, so large images neither starve nor are starved by the rest of the process."""
    processor = Processor(CpuBackend(), store=None, limits=LIMITS)
    try:
        with _default_pool_blocked():
            delivered = await asyncio.wait_for(
                processor.process(_png_input(smooth(20, 30, 3)), [], pb.OutputSpec()), 5
            )
        delivered.release()
    finally:
        processor.close()
    assert codec.decode(delivered.response.encoded.data, LIMITS).shape == (20, 30, 3)


# --- file service calls (finding 5) --------------------------------------------------------------------
class _Silent(file_service_pb2_grpc.FileServiceServicer):
    """A file service that accepts calls and never answers them."""

    async def DownloadImage(  # noqa: N802 (gRPC method name)
        self, request: file_service_pb2.DownloadImageRequest, context: Any
    ) -> AsyncIterator[file_service_pb2.DownloadImageResponse]:
        await asyncio.sleep(3600)
        yield file_service_pb2.DownloadImageResponse()

    async def UploadImage(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[file_service_pb2.UploadImageRequest], context: Any
    ) -> file_service_pb2.UploadImageResponse:
        await asyncio.sleep(3600)
        return file_service_pb2.UploadImageResponse()


@pytest.fixture
async def silent_files() -> AsyncIterator[FileClient]:
    server = grpc.aio.server()
    # Only the two streaming methods are called; the others stay abstract.
    file_service_pb2_grpc.add_FileServiceServicer_to_server(_Silent(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = FileClient.connect(FileServiceAddress(file_service_address=f"127.0.0.1:{port}"))
    yield client
    await client.close()
    await server.stop(None)


async def test_a_file_service_that_never_answers_is_deadline_exceeded_not_a_hang(
    silent_files: FileClient,
) -> None:
    """By reference and with output.store, a file service that accepts calls but never answers ends the call
    after rpc_timeout_seconds when the caller has no deadline, and after the caller's own deadline when it
    is sooner. Both streaming calls had no timeout and waited for ever."""
    processor = Processor(CpuBackend(), store=silent_files, limits=LIMITS, rpc_timeout_seconds=0.3)
    by_reference = image_pb2.ImageInput(image_id="00000000-0000-0000-0000-000000000000")
    stored = pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_PNG, store=True)
    try:
        for source, spec in ((by_reference, pb.OutputSpec()), (_png_input(smooth(8, 8, 3)), stored)):
            started = time.monotonic()
            with pytest.raises(errors.DeadlineExceeded):
                await asyncio.wait_for(processor.process(source, [], spec), 10)
            assert time.monotonic() - started < 5
        processor.rpc_timeout_seconds = 30.0
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            await asyncio.wait_for(
                processor.process(by_reference, [], pb.OutputSpec(), deadline=started + 0.3), 10
            )
        assert time.monotonic() - started < 5
    finally:
        processor.close()


async def test_file_service_calls_get_the_lesser_of_the_rpc_timeout_and_the_callers_time() -> None:
    """Download and upload are given min(rpc_timeout_seconds, the caller's remaining time)."""
    store = MemoryStore()
    processor = Processor(CpuBackend(), store=store, limits=LIMITS, rpc_timeout_seconds=20.0)
    image_id = store.put(codec.encode(smooth(8, 8, 3), codec.Format.PNG))
    stored = pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_PNG, store=True)
    try:
        (await processor.process(image_pb2.ImageInput(image_id=image_id), [], stored)).release()
        deadline = time.monotonic() + 5
        (
            await processor.process(image_pb2.ImageInput(image_id=image_id), [], stored, deadline=deadline)
        ).release()
    finally:
        processor.close()
    assert store.timeouts[:2] == [20.0, 20.0]
    assert all(timeout is not None and 4 < timeout <= 5 for timeout in store.timeouts[2:])
    assert len(store.timeouts) == 4


async def test_requests_waiting_for_memory_hold_at_most_half_the_budget_in_their_inputs() -> None:
    """A request that waits for memory holds its input (a raw frame here, an encoded file otherwise) outside
    the budget: once the waiters' inputs reach half the budget, one more that would wait is shed with a retry
    delay and counted, while a smaller one still waits. 24 waiting 60 MB requests took a service with a
    100 MB budget to 1.8 GB."""
    from prometheus_client import REGISTRY

    backend = GatedBackend()
    processor = Processor(backend, store=None, limits=LIMITS, workers=1, memory_budget_bytes=40_000)
    steps = validate_pipeline([("invert", {})])
    try:
        # 38 400 of 40 000 bytes: its input and its output.
        running = asyncio.create_task(processor.run(noise(80, 80, 3), steps))
        await asyncio.to_thread(backend.entered.wait, 10)
        waiting = asyncio.create_task(processor.run(noise(60, 60, 3), steps))  # carries 10 800 bytes
        await _until(lambda: processor.admission.memory.carried == 10_800)
        before = REGISTRY.get_sample_value("mesh_image_pipelines_rejected_total", {"device": "cpu"}) or 0.0
        with pytest.raises(errors.ResourceExhausted, match=r"hold 10\.5 KiB of input already") as shed:
            await processor.run(noise(60, 80, 3), steps)  # 14 400 more: past 20 000
        assert shed.value.retry_after_seconds
        assert (
            REGISTRY.get_sample_value("mesh_image_pipelines_rejected_total", {"device": "cpu"}) == before + 1
        )
        small = asyncio.create_task(processor.run(noise(50, 50, 3), steps))  # 7 500 more: it may wait
        await _until(lambda: processor.admission.memory.carried == 18_300)
        backend.gate.set()
        for task in (running, waiting, small):
            await asyncio.wait_for(task, 10)
        assert processor.admission.memory.carried == 0
    finally:
        backend.gate.set()
        processor.close()


def test_a_gpu_asked_for_where_there_is_none_stops_the_start_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """MESH_DEVICE=gpu on a machine without a GPU (or CuPy) ends the process with exit status 2 and one line that
    names the setting and the way out, as the inference service does; it was a RuntimeError's traceback."""
    from mesh.services.image_processing import backend as backend_module

    if gpu_available()[0]:
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exited, errors.exit_on_startup_error("image-processing"):
        backend_module.select_backend("gpu")
    assert exited.value.code == 2
    line = capsys.readouterr().err
    assert line.startswith("image-processing: cannot start: MESH_DEVICE=gpu but ")
    assert line.endswith("set MESH_DEVICE=cpu or auto to run on the CPU\n")
