"""Model instances in worker processes, for a model whose work holds the GIL.

The strip reader spends most of a reading in Python between small NumPy and OpenCV calls, so two threads do
not read two photos at once, on the CPU or on the GPU (whose path is bound by the same Python). With
``instance_kind: process``, each of a model's instances is a worker process holding its own copy of the model
(and on a GPU its own CUDA context), as Triton runs its Python backend's instances. The batcher does not
change: it computes at most ``instance_count`` batches at once, each from one of its executor threads, and that
thread hands its batch to a free worker and waits for the outputs without holding the GIL.

Pixels travel through a buffer that the server and the worker both map: the server copies a batch's images
into it, and the worker reads them where they lie. It is a memfd (an unlinked temporary file where there is
none), handed to the worker over its pipe, because a container's /dev/shm holds 64 MiB unless the deployment
enlarges it, less than one batch of 12-megapixel photos. The outputs come back written into a serialised
``PredictResponse``, so the server process never loads the model itself.

A worker that dies is started again for the next batch. The batch it held fails with UNAVAILABLE when it had
several images (the batcher then computes each alone), and with INTERNAL, category DATA, when it had one: that
image crashed the model, and a retry (gRPC's own, on UNAVAILABLE, or the queue's) would only crash it again.
One that cannot be started again (its model no longer loads: a GPU gone bad, memory short) leaves the rotation,
and a background thread tries again with a growing pause; while no worker runs, :meth:`WorkerModel.fault` says
why, so that the version reads not ready and the service's health says so.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import pickle
import queue
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import TYPE_CHECKING, Any, Final, cast

import cv2
import numpy as np
import numpy.typing as npt

from mesh.common.v1 import errors_pb2
from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.kit.cpus import usable_cpus
from mesh.kit.errors import Internal, MeshError, Unavailable
from mesh.kit.logging import LoggingSetup, current_logging, get_logger
from mesh.kit.memory import tune_allocator
from mesh.services.inference.models import DeviceName, ModelFactory, Operation
from mesh.services.inference.parameters import ResolvedParameters

if TYPE_CHECKING:
    from mesh.services.inference.images import Pixels
    from mesh.services.inference.repository import ModelConfig

log = get_logger(__name__)

# A worker loads and warms up its model within this many seconds (a first CUDA start compiles kernels).
START_TIMEOUT_SECONDS = 300.0
# A worker asked to stop exits within this many seconds, or it is terminated.
STOP_TIMEOUT_SECONDS = 10.0
# Pauses between attempts to start a worker again after a failed start: the first, and the longest.
RETRY_FIRST_SECONDS = 2.0
RETRY_MAX_SECONDS = 60.0
# ErrorInfo reason of an image that killed its worker (see crashed_by_image).
REASON_MODEL_CRASHED = "MODEL_CRASHED"
# What a worker's send raises once the server has gone away.
_SERVER_GONE = (BrokenPipeError, ConnectionResetError)
# Between batches a worker's buffer keeps at most this much memory: one large batch (16 photos of 12
# megapixels take 576 MiB) must not hold its memory for good, in every worker.
KEEP_BYTES = 128 * 2**20


# The pipe carries these messages and nothing else. Server to worker: a _Batch, or _STOP. Worker to server:
# _Ready once, or _Failed if its model could not be built; then one _Outputs or _Failed per batch.


@dataclass(frozen=True)
class _Ready:
    """A worker's first message: its model loaded and warmed up."""

    platform: str
    device: DeviceName
    operations: frozenset[Operation]
    min_image_size: tuple[int, int]


@dataclass(frozen=True)
class _Batch:
    """A batch: its images lie one after another in the shared buffer, from offset 0."""

    operation: Operation
    parameters: ResolvedParameters
    images: tuple[tuple[tuple[int, ...], str], ...]
    """Each image's shape and NumPy dtype."""

    buffer_size: int
    """The shared buffer's size when the batch was written."""

    opencv_threads: int
    """Threads OpenCV may use for this batch: the cores shared among the batches computing now."""


@dataclass(frozen=True)
class _Outputs:
    """A batch's outputs, one serialised ``PredictResponse`` per image, in order."""

    responses: list[bytes]


@dataclass(frozen=True)
class _Failed:
    """What the model raised: while it was built (instead of _Ready), or for a batch (instead of _Outputs)."""

    error: BaseException


_STOP: Final = None
"""The server's last message: the worker exits."""

_Reply = _Ready | _Outputs | _Failed


def _receive(conn: Connection, worker: str) -> _Reply:
    """The worker's next message; Internal for anything the protocol does not know (a bug, not a model error)."""
    message = conn.recv()
    if not isinstance(message, _Ready | _Outputs | _Failed):
        raise Internal(f"{worker} sent {type(message).__name__}, not a message of the worker protocol")
    return message


def _next_batch(conn: Connection) -> _Batch | None:
    """The server's next message to a worker: a batch, or _STOP."""
    message = conn.recv()
    if message is not _STOP and not isinstance(message, _Batch):
        raise TypeError(f"the server sent {type(message).__name__}, not a message of the worker protocol")
    return message


@dataclass(frozen=True)
class _WorkerSpec:
    """What a worker process needs to build its model."""

    factory: ModelFactory
    config: ModelConfig
    device: DeviceName
    opencv_threads: int
    logging: LoggingSetup | None


class WorkerModel:
    """The model port over ``count`` worker processes, each with its own instance of ``factory``'s model.

    The workers start (load and warm up) in parallel; the constructor returns when all are ready and raises
    when one fails, with that worker's error.
    """

    def __init__(self, factory: ModelFactory, config: ModelConfig, device: DeviceName, count: int) -> None:
        # A worker starts with its share of the cores for OpenCV, which would otherwise start a thread per core in
        # every worker; each batch then says how many it may use (see run_batch).
        self._cores = usable_cpus()
        spec = _WorkerSpec(factory, config, device, max(1, self._cores // count), current_logging())
        context = multiprocessing.get_context("spawn")  # a forked child would inherit CUDA and locks mid-use
        self._workers = [_Worker(context, spec, f"{config.name}-worker-{i}") for i in range(count)]
        self._broken: dict[str, _Worker] = {}  # by name; out of the rotation until started again
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._restarter: threading.Thread | None = None
        try:
            for worker in self._workers:
                worker.start()
            ready = [worker.wait_ready() for worker in self._workers]
        except BaseException:
            self.close()
            raise
        self.platform = ready[0].platform
        self.device: DeviceName = ready[0].device
        self.operations: frozenset[Operation] = ready[0].operations
        self.min_image_size = ready[0].min_image_size
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in self._workers:
            self._idle.put(worker)

    def warm_up(self) -> None:
        """Nothing more to do: every worker warmed its copy up before it said it was ready."""

    def run_batch(
        self, operation: Operation, parameters: ResolvedParameters, images: Sequence[Pixels]
    ) -> Sequence[object]:
        worker = self._take()
        # A lone batch may use every core; while all workers compute, each gets its share.
        busy = max(1, len(self._workers) - self._idle.qsize())
        try:
            return worker.run(operation, parameters, images, max(1, self._cores // busy))
        finally:
            self._give_back(worker)

    def fill_response(self, output: object, response: pb.PredictResponse) -> None:
        response.MergeFromString(cast(bytes, output))

    def fault(self) -> str | None:
        """Why no worker can compute (each failed to start again), or None while at least one runs."""
        with self._lock:
            if len(self._broken) < len(self._workers):
                return None
            return "; ".join(worker.failure or "" for worker in self._broken.values())

    def close(self) -> None:
        """Stop every worker (after its current batch, or by force after STOP_TIMEOUT_SECONDS)."""
        self._closing.set()
        restarter = self._restarter
        if restarter is not None:
            restarter.join()
        for worker in self._workers:
            worker.stop()

    def _take(self) -> _Worker:
        # The batcher computes at most as many batches at once as there are workers, so a worker is free or
        # about to be, unless some are out of the rotation: then wait, and give up while none runs at all.
        while True:
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                problem = self.fault()
                if problem is not None:
                    raise Unavailable(
                        f"no worker process of this model runs: {problem}", retry_after_seconds=5.0
                    ) from None

    def _give_back(self, worker: _Worker) -> None:
        if worker.failure is None:
            self._idle.put(worker)
            return
        with self._lock:
            self._broken[worker.name] = worker
            if self._restarter is None:
                self._restarter = threading.Thread(
                    target=self._restart_broken, name=f"{worker.name}-restarter", daemon=True
                )
                self._restarter.start()

    def _restart_broken(self) -> None:
        """Start the broken workers again, pausing longer after each round that leaves one broken."""
        pause = RETRY_FIRST_SECONDS
        while not self._closing.wait(pause):
            with self._lock:
                broken = list(self._broken.values())
            for worker in broken:
                if worker.try_restart():
                    with self._lock:
                        del self._broken[worker.name]
                    self._idle.put(worker)
            with self._lock:
                if not self._broken:
                    self._restarter = None  # under the lock: a worker that breaks now starts a new thread
                    return
            pause = min(RETRY_MAX_SECONDS, 2 * pause)


class _Worker:
    """One worker process and the server's end of its pipe; one batch thread uses it at a time."""

    def __init__(self, context: SpawnContext, spec: _WorkerSpec, name: str) -> None:
        self._context = context
        self._spec = spec
        self.name = name
        self.failure: str | None = None
        """Why the last attempt to start it again failed; None while it runs (or will start with its batch)."""
        self._process: SpawnProcess | None = None
        self._conn: Connection | None = None
        self._buffer = SharedBuffer.closed()

    def start(self) -> None:
        """Start the process; it loads its model meanwhile (see :meth:`wait_ready`)."""
        server_end, worker_end = self._context.Pipe()
        process = self._context.Process(
            target=_serve, args=(worker_end, self._spec), name=self.name, daemon=True
        )
        process.start()
        worker_end.close()
        self._process, self._conn = process, server_end
        self._buffer.close()
        self._buffer = SharedBuffer.create()
        reduction.send_handle(server_end, self._buffer.fileno, process.pid)

    def wait_ready(self) -> _Ready:
        """Wait until the model is loaded and warmed up; raises the worker's error when it could not be."""
        conn = self._connection()
        try:
            if not conn.poll(START_TIMEOUT_SECONDS):
                raise RuntimeError(f"{self.name} did not load its model within {START_TIMEOUT_SECONDS:.0f} s")
            reply = _receive(conn, self.name)
        except EOFError:
            raise RuntimeError(f"{self.name} exited (code {self._reap()}) while loading its model") from None
        except BaseException:
            self.stop()
            raise
        if isinstance(reply, _Ready):
            return reply
        self.stop()
        if isinstance(reply, _Failed):
            raise reply.error
        raise Internal(f"{self.name} answered outputs before it said it was ready")

    def run(
        self, operation: Operation, parameters: ResolvedParameters, images: Sequence[Pixels], threads: int
    ) -> list[bytes]:
        """One batch's serialised responses; raises what the model raised for it."""
        if self._process is None or not self._process.is_alive():
            self._restart()
        conn = self._connection()
        self._buffer.reserve(sum(image.nbytes for image in images))
        layouts = []
        offset = 0
        for image in images:
            np.copyto(self._buffer.view(offset, image.shape, image.dtype), image)
            layouts.append((image.shape, image.dtype.str))
            offset += image.nbytes
        try:
            conn.send(_Batch(operation, parameters, tuple(layouts), self._buffer.size, threads))
            reply = _receive(conn, self.name)
        except (EOFError, OSError):
            code = self._reap()
            if len(images) == 1:
                raise crashed_by_image(code) from None
            # The batcher computes each of its images again alone, which tells which one did it.
            raise Unavailable(
                f"the model's worker process exited (code {code}) while computing this batch; "
                "it is started again for the next one",
                retry_after_seconds=1.0,
            ) from None
        finally:
            self._buffer.shrink(KEEP_BYTES)
        if isinstance(reply, _Outputs):
            return reply.responses
        if isinstance(reply, _Failed):
            raise reply.error
        raise Internal(f"{self.name} said it was ready again instead of answering a batch")

    def stop(self) -> None:
        """Ask the worker to exit; terminate it if it does not."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        self._buffer.close()
        if conn is not None:
            with contextlib.suppress(OSError):  # already gone
                conn.send(_STOP)
            conn.close()
        if process is not None:
            process.join(STOP_TIMEOUT_SECONDS)
            if process.is_alive():
                process.terminate()
                process.join(STOP_TIMEOUT_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()

    def _restart(self) -> None:
        code = self._reap()
        log.warning("model worker restarting", worker=self.name, exit_code=code)
        if not self.try_restart():
            raise Unavailable(
                f"{self.name} could not be started again: {self.failure}", retry_after_seconds=5.0
            )

    def try_restart(self) -> bool:
        """Start the worker (again); False, with the reason in ``failure``, when its model does not load."""
        self._reap()
        try:
            self.start()
            self.wait_ready()
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("model worker could not be started", worker=self.name, error=self.failure)
            return False
        if self.failure is not None:
            log.info("model worker running again", worker=self.name)
        self.failure = None
        return True

    def _reap(self) -> int | None:
        """The dead worker's exit code; its pipe closed."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        process.join(STOP_TIMEOUT_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()
        return process.exitcode

    def _connection(self) -> Connection:
        if self._conn is None:
            raise Unavailable(f"{self.name} is not running", retry_after_seconds=1.0)
        return self._conn


def _serve(conn: Connection, spec: _WorkerSpec) -> None:
    """A worker process's main loop: build the model, then compute batches until told to stop."""
    # Ctrl-C in a terminal reaches the whole process group; the server stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.logging is not None:
        spec.logging.apply()
    cv2.setNumThreads(spec.opencv_threads)
    # Large buffers stay in the heap, as in the server (mesh.kit.memory): the worker now holds the frames and
    # their float copies.
    tune_allocator()
    buffer = SharedBuffer.attach(reduction.recv_handle(conn))
    try:
        model = spec.factory(spec.config, spec.device)
        model.warm_up()
    except Exception as exc:
        with contextlib.suppress(*_SERVER_GONE):
            conn.send(_Failed(_portable(exc)))
        return
    try:
        conn.send(_Ready(model.platform, model.device, frozenset(model.operations), model.min_image_size))
        while True:
            try:
                batch = _next_batch(conn)
            except EOFError:  # the server is gone
                return
            if batch is _STOP:
                return
            buffer.follow(batch.buffer_size)
            if batch.opencv_threads != cv2.getNumThreads():
                cv2.setNumThreads(batch.opencv_threads)
            images = buffer.images(batch.images)
            try:
                outputs = model.run_batch(batch.operation, batch.parameters, images)
                conn.send(_Outputs([_serialised(model.fill_response, output) for output in outputs]))
            except _SERVER_GONE:
                raise
            except Exception as exc:
                if not isinstance(exc, MeshError):
                    log.warning(
                        "model batch failed", worker=multiprocessing.current_process().name, exc_info=True
                    )
                conn.send(_Failed(_portable(exc)))
    except _SERVER_GONE:
        return  # the server stopped (even while this worker was starting): there is no one to answer
    finally:
        model.close()
        buffer.close()


class SharedBuffer:
    """Memory that a server and its worker both map, through one file descriptor; it only grows."""

    def __init__(self, fd: int, size: int) -> None:
        self.fileno = fd
        self.size = 0
        self._map: mmap.mmap | None = None
        self.follow(size)

    @classmethod
    def create(cls) -> SharedBuffer:
        """A new, empty buffer: a memfd where the system has them, else an unlinked temporary file."""
        if hasattr(os, "memfd_create"):
            return cls(os.memfd_create("mesh-model-batch", os.MFD_CLOEXEC), 0)
        fd, path = tempfile.mkstemp(prefix="mesh-model-batch-")
        os.unlink(path)
        return cls(fd, 0)

    @classmethod
    def attach(cls, fd: int) -> SharedBuffer:
        """The worker's side of a buffer received over its pipe (mapped when the first batch says its size)."""
        return cls(fd, 0)

    @classmethod
    def closed(cls) -> SharedBuffer:
        """A placeholder before the first worker starts."""
        return cls(-1, 0)

    def reserve(self, size: int) -> None:
        """Grow (the server's side) to hold at least ``size`` bytes; doubling keeps remaps rare."""
        if size > self.size:
            os.ftruncate(self.fileno, max(size, 2 * self.size))
            self.follow(os.fstat(self.fileno).st_size)

    def shrink(self, keep: int) -> None:
        """Give the memory back (the server's side, between batches) when it holds more than ``keep`` bytes."""
        if self.size > keep and self.fileno >= 0:
            os.ftruncate(self.fileno, 0)
            self.follow(0)

    def follow(self, size: int) -> None:
        """Map ``size`` bytes, as the server grew the file to."""
        if size == self.size:
            return
        # The old map is dropped, not closed: arrays over it (the last batch's images) keep it mapped until they
        # go, where closing it would leave them pointing at unmapped memory.
        self._map = mmap.mmap(self.fileno, size) if size else None
        self.size = size

    def view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        """An array over the buffer's bytes from ``offset``."""
        if self._map is None:
            raise Internal("a model batch buffer was used before it was sized")
        return np.ndarray(shape, dtype=dtype, buffer=self._map, offset=offset)

    def images(self, layouts: Sequence[tuple[tuple[int, ...], str]]) -> list[Pixels]:
        """A batch's images, one after another from offset 0 (views: valid until the next batch)."""
        images: list[Pixels] = []
        offset = 0
        for shape, dtype in layouts:
            image = self.view(offset, shape, np.dtype(dtype))
            images.append(image)
            offset += image.nbytes
        return images

    def close(self) -> None:
        self._map = None  # unmapped when the last array over it goes (see follow)
        if self.fileno >= 0:
            os.close(self.fileno)
            self.fileno = -1
        self.size = 0


def crashed_by_image(exit_code: int | None) -> Internal:
    """The answer for an image that killed its worker alone (a batch of one, or the batcher's retry of one item).

    Not UNAVAILABLE: every mesh channel resends that by itself and the queue retries it as TRANSIENT, so one call
    crashed the worker (and reloaded its model) four times, and a job more. The category DATA fails a job at once.
    """
    return Internal(
        f"this image crashed the model: its worker process exited (code {exit_code}) while computing it alone; "
        "sending it again would crash it again",
        reason=REASON_MODEL_CRASHED,
        category=errors_pb2.ERROR_CATEGORY_DATA,
    )


def _serialised(fill: Callable[[object, pb.PredictResponse], None], output: object) -> bytes:
    response = pb.PredictResponse()
    fill(output, response)
    return response.SerializeToString()


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives the trip to the server process, else an Internal error that names it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return Internal(f"the model failed: {type(exc).__name__}: {exc}")
    return exc
