"""The GPU backend on CuPy: RawKernels compiled at start-up, one stream, pinned staging, a bounded pool.

Only this module imports CuPy, and only when the GPU backend is selected. A pipeline uploads the image once
(through a pinned host buffer, in chunks staged by parallel threads), runs every step on the device
(consecutive point-wise steps fused into one lookup-table kernel) and downloads once. Device out-of-memory
becomes ``RESOURCE_EXHAUSTED``; any other CUDA error marks the backend faulted, which turns health
NOT_SERVING.

Filters whose catalogue entry says ``gpu=False`` (Canny, and CLAHE inside ``equalize``) run the CPU code
on a host copy inside the same session; everything else runs in the kernels below or in CuPy/cupyx.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import cupy as cp
import numpy as np
from cupyx.scipy import ndimage as cnd

from mesh.kit import errors
from mesh.kit.logging import get_logger
from mesh.kit.pinned import PinnedBuffer
from mesh.services.image_processing import cpu_filters
from mesh.services.image_processing import filter_math as fm
from mesh.services.image_processing.backend import stop_if_cancelled
from mesh.services.image_processing.filter_math import Image
from mesh.services.image_processing.gpu_kernels import SEPARABLE_RADII, SOURCE, SPIN_SOURCE
from mesh.services.image_processing.registry import FILTERS, Device, Step, runs_on_host, validate_pipeline

log = get_logger(__name__)

BORDER_CODES = {"reflect": 0, "clamp": 1, "wrap": 2, "constant": 3}
GREY_METHOD = {"bt601": 3, "bt709": 0, "luminosity": 0, "average": 1, "lightness": 2}
ROW_TILE, ROW_THREADS, ROW_LINES = 128, 128, 4
COL_W, COL_H, COL_LINES = 32, 64, 8
FUSED_TILES = ((32, 32), (32, 16), (16, 16), (16, 8))
FUSED_THREADS = (32, 8)
SEP_TILE_W, SEP_THREADS, SEP_TILE_HEIGHTS = 32, 256, (64, 32, 16, 8)  # as SF_TP, SF_THREADS in the source
SHARED_LIMIT = 48 * 1024
CONSTANT_CACHE_SIZE = 256
ELEMENT_THREADS = 256
UPLOAD_CHUNKED_FROM, UPLOAD_CHUNKS = 1 << 20, 4
FUSABLE = {"invert", "adjust"}


class Kernels:
    """The compiled kernels for one sample type."""

    NAMES = (
        "lut_apply",
        "grayscale",
        "conv_rows",
        "conv_cols",
        "conv_fused",
        "gradient_out",
        "unsharp",
        "adaptive_compare",
        "resample2",
        "resample_area",
        "warp_affine",
        "rgb_to_hsv",
        "hsv_to_rgb",
        "histogram",
        "otsu_lut",
        *(f"sep_fused_r{r}" for r in SEPARABLE_RADII),
    )

    def __init__(self, dtype: np.dtype[Any]) -> None:
        sample = "unsigned char" if dtype == np.uint8 else "unsigned short"
        top = fm.max_value(dtype)
        self.module = cp.RawModule(
            code=SOURCE, options=("--std=c++14", f"-DSAMPLE={sample}", f"-DSAMPLE_MAX={top}")
        )
        # get_function compiles the module now (start-up), not on the first request.
        self.functions: dict[str, Any] = {name: self.module.get_function(name) for name in self.NAMES}

    def __getitem__(self, name: str) -> Any:
        return self.functions[name]


def _grid(n: int, threads: int = ELEMENT_THREADS) -> tuple[int]:
    # Enough blocks to fill the device; grid-stride loops cover the rest.
    return (max(1, min((n + threads - 1) // threads, 65535)),)


def _resident_grid(n: int, sm_count: int, threads: int = ELEMENT_THREADS) -> tuple[int]:
    # Eight blocks per multiprocessor at most: each thread strides over several vectors, and a block's set-up
    # (the 8-bit lookup table into shared memory) is paid once per block, not once per vector.
    return (max(1, min((n + threads - 1) // threads, 8 * sm_count)),)


class GpuBackend:
    """Runs pipelines on one CUDA device."""

    def __init__(self, *, memory_limit_bytes: int = 0) -> None:
        self._device = cp.cuda.Device()
        self._device.use()
        self.pool = cp.get_default_memory_pool()
        if memory_limit_bytes:
            self.pool.set_limit(size=memory_limit_bytes)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.kernels = {
            np.dtype(np.uint8): Kernels(np.dtype(np.uint8)),
            np.dtype(np.uint16): Kernels(np.dtype(np.uint16)),
        }
        self.hsv_sdiv, self.hsv_hdiv = (cp.asarray(t) for t in fm.hsv_tables())
        self._staging = PinnedBuffer(cp)
        self._copiers = ThreadPoolExecutor(max_workers=UPLOAD_CHUNKS, thread_name_prefix="gpu-staging")
        self._constants: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.faulted: str | None = None
        props = cp.cuda.runtime.getDeviceProperties(self._device.id)
        self.name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        self.sm_count = int(props.get("multiProcessorCount", 1))

    @property
    def device(self) -> Device:
        return Device.GPU

    def check(self) -> str:
        if self.faulted is not None:
            raise RuntimeError(f"GPU faulted: {self.faulted}")
        with self.guard():
            free, total = cp.cuda.runtime.memGetInfo()
        return f"{self.name}: {free} of {total} bytes free, pool {self.pool.used_bytes()} used"

    @contextmanager
    def guard(self) -> Iterator[None]:
        """CUDA errors to mesh errors: out of memory is RESOURCE_EXHAUSTED, anything else a fault."""
        if self.faulted is not None:
            raise errors.Unavailable(f"the GPU is faulted: {self.faulted}")
        try:
            with self._device, self.stream:
                yield
        except cp.cuda.memory.OutOfMemoryError as error:
            self.pool.free_all_blocks()
            raise errors.ResourceExhausted(f"GPU out of memory: {error}", retry_after_seconds=1.0) from None
        except (cp.cuda.runtime.CUDARuntimeError, cp.cuda.driver.CUDADriverError) as error:
            self.faulted = str(error)
            log.error("GPU fault; health goes NOT_SERVING", error=str(error))
            raise errors.Unavailable(f"GPU fault: {error}") from None

    def constant(self, key: tuple[Any, ...], build: Callable[[], tuple[Any, ...]]) -> tuple[Any, ...]:
        """Device copies of host-built tables (kernels, resize tables), built once per key.

        A video stream or a batch of same-sized images then launches kernels without host work or uploads.
        """
        cached = self._constants.get(key)
        if cached is None:
            cached = tuple(cp.asarray(np.ascontiguousarray(t)) for t in build())
            if len(self._constants) >= CONSTANT_CACHE_SIZE:
                self._constants.pop(next(iter(self._constants)))
            self._constants[key] = cached
        return cached

    def upload(self, image: Image) -> Any:
        """``image`` on the device. Large images go through the pinned buffer in chunks that host threads
        copy in parallel, each chunk's DMA queued as soon as it is staged: measured on an H200 host, 4K RGB
        took 1.1 ms this way, 1.7 ms as one pageable copy and 2.4 ms staged by one thread."""
        image = np.ascontiguousarray(image)
        device = cp.empty(image.shape, dtype=image.dtype)
        host = None
        if image.nbytes >= UPLOAD_CHUNKED_FROM:
            # The staging buffer (and one that a larger request replaces) is free once earlier uploads landed.
            self.stream.synchronize()
            host = self._staging.array(image.nbytes)
        if host is None:  # small, or too large to pin
            device.set(image, stream=self.stream)
            return device
        source = image.reshape(-1).view(np.uint8)
        target = device.reshape(-1).view(cp.uint8)
        step = -(-image.nbytes // UPLOAD_CHUNKS)
        chunks = [slice(i, min(i + step, image.nbytes)) for i in range(0, image.nbytes, step)]

        def stage(chunk: slice) -> slice:
            np.copyto(host[chunk], source[chunk])
            return chunk

        for chunk in self._copiers.map(stage, chunks):
            target[chunk].set(host[chunk], stream=self.stream)
        return device

    def start(self, image: Image) -> GpuSession:
        return GpuSession(self, image)

    def warm_up(self) -> None:
        """Run every GPU filter once on small images of both sample types (CuPy's own kernels compile too)."""
        for dtype in (np.uint8, np.uint16):
            for channels in (1, 3, 4):
                image = np.zeros((24, 32, channels), dtype=dtype)
                for name, definition in FILTERS.items():
                    if not definition.gpu or (name == "convert_color" and channels == 1):
                        continue
                    for params in warm_up_params(name):
                        steps = validate_pipeline([(name, params)])
                        session = self.start(image)
                        session.run(steps)
                        session.result()
        log.info("GPU kernels compiled and warmed up", device=self.name)


def warm_up_params(name: str) -> list[dict[str, Any]]:
    """Parameter sets that reach every code path of a filter during warm-up."""
    variants: dict[str, list[dict[str, Any]]] = {
        "resize": [{"scale": 0.5, "interpolation": m} for m in ("nearest", "bilinear", "area")]
        + [{"scale": 2.0, "interpolation": "area"}],
        "threshold": [{"method": m} for m in ("binary", "otsu", "adaptive")],
        "sobel": [{"direction": "x"}, {"direction": "magnitude"}],
        "rotate": [{"angle": 90.0}, {"angle": 30.0}],
        "convert_color": [{"conversion": c} for c in ("rgb_to_hsv", "hsv_to_rgb", "rgb_to_bgr")],
        "median": [{"ksize": 3}, {"ksize": 5}],
        # Every radius of the register-blocked kernel, one for conv_fused (radius 13) and sigma 20, which fits
        # no fused tile: the two-kernel path.
        "gaussian_blur": [{"ksize": 2 * r + 1} for r in (*SEPARABLE_RADII, SEPARABLE_RADII[-1] + 1)]
        + [{"sigma": 20.0}],
    }
    return variants.get(name, [{}])


GpuFilter = Callable[["GpuSession", Any, Step], Any]


@dataclass
class Queued:
    """Step groups queued on the stream, with an event before the first and after each."""

    groups: list[list[Step]]
    events: list[Any]

    def timings(self) -> list[float]:
        """Wait for the last group; each step's device time (a fused group's split evenly)."""
        self.events[-1].synchronize()
        timings: list[float] = []
        for group, start, end in zip(self.groups, self.events[:-1], self.events[1:], strict=True):
            seconds = float(cp.cuda.get_elapsed_time(start, end)) / 1000.0
            timings.extend([seconds / len(group)] * len(group))
        return timings


class GpuSession:
    """One image on the device while a pipeline runs."""

    def __init__(self, backend: GpuBackend, image: Image) -> None:
        self.backend = backend
        self.dtype = np.dtype(image.dtype)
        self.kernels = backend.kernels[self.dtype]
        self.top = fm.max_value(self.dtype)
        with backend.guard():
            self.image = backend.upload(image)

    # --- pipeline -----------------------------------------------------------------------------------
    def apply(self, step: Step) -> float:
        return self.run([step])[0]

    def run(self, steps: Sequence[Step], cancel: threading.Event | None = None) -> list[float]:
        """Run steps; consecutive point-wise steps share one fused kernel whose time they split.

        Every group is queued with an event after it and the host waits once, at the end: steps follow each
        other on the device without a round trip to the host in between.
        """
        with self.backend.guard():
            return self.queue(steps, cancel).timings()

    def queue(self, steps: Sequence[Step], cancel: threading.Event | None = None) -> Queued:
        """Queue the steps on the backend's stream and return at once (the benchmarks time many in a row)."""
        queued = Queued([], [cp.cuda.Event()])
        queued.events[0].record(self.backend.stream)
        index = 0
        while index < len(steps):
            stop_if_cancelled(cancel, steps[index])
            group = [steps[index]]
            # Point-wise steps keep the channel count, so the whole run is decided on the current image.
            channels = int(self.image.shape[2])
            if point_wise(steps[index], channels):
                while index + len(group) < len(steps) and point_wise(steps[index + len(group)], channels):
                    group.append(steps[index + len(group)])
            self._run_group(group)
            queued.events.append(cp.cuda.Event())
            queued.events[-1].record(self.backend.stream)
            queued.groups.append(group)
            index += len(group)
        return queued

    def _run_group(self, group: Sequence[Step]) -> None:
        if len(group) == 1 and not point_wise(group[0], int(self.image.shape[2])):
            step = group[0]
            if not runs_on_host(step):
                self.image = GPU_FILTERS[step.filter](self, self.image, step)
            else:
                self.image = cp.asarray(
                    cpu_filters.apply(cp.asnumpy(self.image, stream=self.backend.stream), step)
                )
            return
        channels = self.image.shape[2]

        def compose() -> tuple[Image]:
            table = np.tile(np.arange(self.top + 1, dtype=np.int64), (channels, 1))
            for step in group:
                lut = point_lut(step, self.dtype).astype(np.int64)
                colour = min(channels, 3)
                table[:colour] = lut[table[:colour]]
            return (table.astype(self.dtype),)

        key = (
            "lut",
            self.dtype.str,
            channels,
            *((step.filter, *sorted(step.params.items())) for step in group),
        )
        (table,) = self.backend.constant(key, compose)
        self.image = self.lut(self.image, table)

    def result(self) -> Image:
        with self.backend.guard():
            image = cp.ascontiguousarray(self.image)
            # Straight into the result array: a pinned buffer would need a host copy after it, which costs
            # more than the driver's own staging of a pageable copy (0.62 against 0.85 ms for 8 MB there).
            out = np.empty(image.shape, dtype=self.dtype)
            image.get(stream=self.backend.stream, out=out)
            self.backend.stream.synchronize()
            return out

    # --- building blocks ------------------------------------------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return cp.empty(shape, dtype=self.dtype if dtype is None else dtype)

    def lut(self, image: Any, table: Any) -> Any:
        """Apply a per-channel table (channels x (max + 1)), given on the host or already on the device."""
        image = aligned(image)
        out = self.empty(image.shape)
        n = image.size
        if isinstance(table, np.ndarray):  # a host table (cupy.ndarray is no numpy subclass)
            table = cp.asarray(np.ascontiguousarray(table))
        per_vector = 16 // self.dtype.itemsize
        self.kernels["lut_apply"](
            _resident_grid(max(1, n // per_vector), self.backend.sm_count),
            (ELEMENT_THREADS,),
            (image, out, table, np.int64(n), np.int32(image.shape[2])),
        )
        return out

    def grey(self, image: Any, method: str = "bt601") -> Any:
        h, w, c = image.shape
        if c == 1:
            return image
        image = aligned(image)
        out = self.empty((h, w, 1))
        wr, wg, wb = fm.BT601_WEIGHTS if method == "bt601" else fm.GRAY_WEIGHTS.get(method, (0, 0, 0))
        self.kernels["grayscale"](
            _resident_grid(max(1, h * w // 4), self.backend.sm_count),
            (ELEMENT_THREADS,),
            (
                image,
                out,
                np.int64(h * w),
                np.int32(c),
                np.int32(wr),
                np.int32(wg),
                np.int32(wb),
                np.int32(GREY_METHOD[method]),
            ),
        )
        return out

    def separable(
        self, image: Any, kx: Any, ky: Any, border: str, *, scale: float = 1.0, raw: bool = False
    ) -> Any:
        """Row pass then column pass through shared-memory tiles; ``raw`` keeps float output.

        Where a tile with its apron fits in shared memory both passes run in one kernel (one read and one
        write of the image); wide kernels on many channels fall back to two kernels and a float buffer.
        """
        h, w, c = image.shape
        rx, ry = (len(kx) - 1) // 2, (len(ky) - 1) // 2
        code = np.int32(BORDER_CODES[border])
        kx_dev, ky_dev = self.backend.constant(
            (
                "taps",
                tuple(np.asarray(kx, dtype=np.float32).tolist()),
                tuple(np.asarray(ky, dtype=np.float32).tolist()),
            ),
            lambda: (np.asarray(kx, dtype=np.float32), np.asarray(ky, dtype=np.float32)),
        )
        out = cp.empty((h, w, c), dtype=cp.float32 if raw else self.dtype)
        # The arguments both fused kernels begin with, and those they end with before their tile sizes.
        shape = (image, out, np.int32(h), np.int32(w), np.int32(c))
        output = (code, np.float64(scale), np.int32(raw))
        blocked = register_blocked_tile(c, rx, ry, self.dtype.itemsize)
        if blocked is not None:
            tile_h, shared = blocked
            self.kernels[f"sep_fused_r{rx}"](
                ((w + SEP_TILE_W - 1) // SEP_TILE_W, (h + tile_h - 1) // tile_h),
                (SEP_THREADS,),
                (*shape, kx_dev, ky_dev, *output, np.int32(tile_h)),
                shared_mem=shared,
            )
            return out
        tile = fused_tile(c, rx, ry)
        if tile is not None:
            tile_w, tile_h, shared = tile
            self.kernels["conv_fused"](
                ((w + tile_w - 1) // tile_w, (h + tile_h - 1) // tile_h),
                FUSED_THREADS,
                (
                    *shape,
                    kx_dev,
                    np.int32(rx),
                    ky_dev,
                    np.int32(ry),
                    *output,
                    np.int32(tile_w),
                    np.int32(tile_h),
                ),
                shared_mem=shared,
            )
            return out
        rows = cp.empty((h, w, c), dtype=cp.float32)
        self.kernels["conv_rows"](
            ((w + ROW_TILE - 1) // ROW_TILE, (h + ROW_LINES - 1) // ROW_LINES),
            (ROW_THREADS, ROW_LINES),
            (image, rows, np.int32(h), np.int32(w), np.int32(c), kx_dev, np.int32(rx), code),
            shared_mem=ROW_LINES * (ROW_TILE + 2 * rx) * c * 4,
        )
        self.kernels["conv_cols"](
            ((w * c + COL_W - 1) // COL_W, (h + COL_H - 1) // COL_H),
            (COL_W, COL_LINES),
            (
                rows,
                out,
                np.int32(h),
                np.int32(w),
                np.int32(c),
                ky_dev,
                np.int32(ry),
                code,
                np.float64(scale),
                np.int32(raw),
            ),
            shared_mem=(COL_H + 2 * ry) * COL_W * 4,
        )
        return out

    def gaussian(self, image: Any, sigma: float, ksize: int, border: str) -> Any:
        kernel = fm.gaussian_kernel(fm.gaussian_ksize(sigma, ksize), sigma)
        return self.separable(image, kernel, kernel, border)


def aligned(image: Any) -> Any:
    """The image in a buffer that 128-bit loads may read (pool allocations are; a view at an offset may not be)."""
    return image if image.data.ptr % 16 == 0 else image.copy()


def register_blocked_tile(channels: int, rx: int, ry: int, itemsize: int) -> tuple[int, int] | None:
    """Tile height and shared bytes of the register-blocked kernel (sep_fused_r*), or None where it has none."""
    if rx != ry or rx not in SEPARABLE_RADII:
        return None
    in_w = (SEP_TILE_W + 2 * rx) * channels
    if in_w > SEP_THREADS:
        return None
    for tile_h in SEP_TILE_HEIGHTS:
        in_h = tile_h + 2 * ry
        shared = in_h * (SEP_TILE_W * channels + 1) * 4 + in_h * in_w * itemsize
        if shared <= SHARED_LIMIT:
            return tile_h, shared
    return None


def fused_tile(channels: int, rx: int, ry: int) -> tuple[int, int, int] | None:
    """The largest output tile whose input (with apron) and row-pass tiles fit in shared memory."""
    for tile_w, tile_h in FUSED_TILES:
        in_h = tile_h + 2 * ry
        floats = in_h * (tile_w + 2 * rx) * channels + in_h * tile_w * channels
        if floats * 4 <= SHARED_LIMIT:
            return tile_w, tile_h, floats * 4
    return None


def point_wise(step: Step, channels: int) -> bool:
    """Whether a step is a lookup table on this image (binary threshold only on grey: colour needs grey first)."""
    if step.filter in FUSABLE:
        return True
    return step.filter == "threshold" and step.as_str("method") == "binary" and channels == 1


def point_lut(step: Step, dtype: np.dtype[Any]) -> Image:
    """The lookup table of a fusable point-wise step."""
    top = fm.max_value(dtype)
    if step.filter == "invert":
        return (top - np.arange(top + 1)).astype(dtype)
    if step.filter == "threshold":
        above = np.arange(top + 1) > step.as_float("value")
        return np.where(above != step.as_bool("invert"), top, 0).astype(dtype)
    return fm.adjust_lut(
        dtype, step.as_float("brightness"), step.as_float("contrast"), step.as_float("gamma")
    )


# --- filters ------------------------------------------------------------------------------------------
def _grayscale(s: GpuSession, image: Any, step: Step) -> Any:
    if image.shape[2] == 1:
        return image.copy()
    return s.grey(image, step.as_str("method"))


def _gaussian_blur(s: GpuSession, image: Any, step: Step) -> Any:
    return s.gaussian(image, step.as_float("sigma"), step.as_int("ksize"), step.as_str("border"))


def _box_blur(s: GpuSession, image: Any, step: Step) -> Any:
    k = step.as_int("ksize")
    ones = np.ones(k, dtype=np.float32)
    # Integer window sums, divided once in double: the same rounding as OpenCV's box filter.
    return s.separable(image, ones, ones, step.as_str("border"), scale=1.0 / (k * k))


def _median(s: GpuSession, image: Any, step: Step) -> Any:
    k = step.as_int("ksize")
    return cnd.median_filter(image, size=(k, k, 1), mode="nearest")


def _unsharp_mask(s: GpuSession, image: Any, step: Step) -> Any:
    blurred = s.gaussian(image, step.as_float("sigma"), 0, "reflect")
    out = s.empty(image.shape)
    n = image.size
    s.kernels["unsharp"](
        _grid(n),
        (ELEMENT_THREADS,),
        (
            image,
            blurred,
            out,
            np.int64(n),
            np.float32(step.as_float("amount")),
            np.int32(step.as_int("threshold")),
        ),
    )
    return out


def _sobel(s: GpuSession, image: Any, step: Step) -> Any:
    import cv2

    ksize = step.as_int("ksize")
    direction = step.as_str("direction")
    n = image.size

    def derivative(dx: int, dy: int) -> Any:
        kx, ky = cv2.getDerivKernels(dx, dy, ksize)
        return s.separable(image, kx.ravel(), ky.ravel(), "reflect", raw=True)

    out = s.empty(image.shape)
    if direction == "magnitude":
        gx, gy = derivative(1, 0), derivative(0, 1)
        s.kernels["gradient_out"](_grid(n), (ELEMENT_THREADS,), (gx, gy, out, np.int64(n), np.int32(1)))
    else:
        g = derivative(1, 0) if direction == "x" else derivative(0, 1)
        s.kernels["gradient_out"](_grid(n), (ELEMENT_THREADS,), (g, g, out, np.int64(n), np.int32(0)))
    return out


def _histogram(channel: Any, top: int) -> Any:
    return cp.asnumpy(cp.bincount(channel.ravel(), minlength=top + 1))


def _threshold(s: GpuSession, image: Any, step: Step) -> Any:
    grey = s.grey(image)
    method = step.as_str("method")
    invert = step.as_bool("invert")
    if method == "adaptive":
        block = step.as_int("block_size")
        ones = np.ones(block, dtype=np.float32)
        mean = s.separable(grey, ones, ones, "clamp", scale=1.0 / (block * block))
        out = s.empty(grey.shape)
        n = grey.size
        s.kernels["adaptive_compare"](
            _grid(n),
            (ELEMENT_THREADS,),
            (grey, mean, out, np.int64(n), np.int32(step.as_int("c")), np.int32(invert)),
        )
        return out
    if method == "otsu":
        # Histogram, threshold and table on the device: the pipeline does not wait for the host here.
        grey = aligned(grey)
        hist = cp.zeros(s.top + 1, dtype=cp.uint64)
        n = grey.size
        s.kernels["histogram"](
            _resident_grid(max(1, n // 16), s.backend.sm_count), (ELEMENT_THREADS,), (grey, hist, np.int64(n))
        )
        table = s.empty((1, s.top + 1))
        s.kernels["otsu_lut"]((1,), (1024,), (hist, table, np.int32(invert)))
        return s.lut(grey, table)
    level = step.as_float("value")
    values = np.arange(s.top + 1)
    above = values > level
    table = np.where(above != invert, s.top, 0).astype(s.dtype)[None, :]
    return s.lut(grey, table)


def _resize(s: GpuSession, image: Any, step: Step) -> Any:
    h, w, c = image.shape
    out_h, out_w = fm.resize_shape(h, w, step)
    mode = step.as_str("interpolation")
    out = s.empty((out_h, out_w, c))
    n = out.size
    if mode == "area" and out_h <= h and out_w <= w:
        ys, yi, yw = s.backend.constant(("area", h, out_h), lambda: fm.area_table(h, out_h))
        xs, xi, xw = s.backend.constant(("area", w, out_w), lambda: fm.area_table(w, out_w))
        s.kernels["resample_area"](
            _grid(n),
            (ELEMENT_THREADS,),
            (image, out, np.int32(w), np.int32(out_h), np.int32(out_w), np.int32(c), ys, yi, yw, xs, xi, xw),
        )
        return out
    yi, yw = s.backend.constant(("two_tap", h, out_h, mode), lambda: fm.two_tap_table(h, out_h, mode))
    xi, xw = s.backend.constant(("two_tap", w, out_w, mode), lambda: fm.two_tap_table(w, out_w, mode))
    s.kernels["resample2"](
        _grid(n),
        (ELEMENT_THREADS,),
        (image, out, np.int32(w), np.int32(out_h), np.int32(out_w), np.int32(c), yi, yw, xi, xw),
    )
    return out


def _crop(s: GpuSession, image: Any, step: Step) -> Any:
    top, bottom, left, right = fm.crop_bounds(image.shape[0], image.shape[1], step)
    return cp.ascontiguousarray(image[top:bottom, left:right])


def _rotate(s: GpuSession, image: Any, step: Step) -> Any:
    import cv2

    angle = step.as_float("angle")
    turns = fm.right_angle_turns(angle, image.shape[0], image.shape[1], step.as_bool("expand"))
    if turns is not None:
        return cp.ascontiguousarray(cp.rot90(image, turns, axes=(0, 1)))
    h, w, c = image.shape
    matrix, out_w, out_h = fm.rotation(h, w, angle, step.as_bool("expand"))
    inverse = cv2.invertAffineTransform(matrix).ravel()
    out = s.empty((out_h, out_w, c))
    s.kernels["warp_affine"](
        _grid(out_h * out_w),
        (ELEMENT_THREADS,),
        (
            image,
            out,
            np.int32(h),
            np.int32(w),
            np.int32(out_h),
            np.int32(out_w),
            np.int32(c),
            *(np.float32(v) for v in inverse),
            np.int32(step.as_str("interpolation") == "bilinear"),
        ),
    )
    return out


def _flip(s: GpuSession, image: Any, step: Step) -> Any:
    axes = {"horizontal": (1,), "vertical": (0,), "both": (0, 1)}[step.as_str("direction")]
    return cp.ascontiguousarray(cp.flip(image, axes))


def _equalize(s: GpuSession, image: Any, step: Step) -> Any:
    channels = image.shape[2]
    table = np.tile(np.arange(s.top + 1, dtype=s.dtype), (channels, 1))
    for c in range(min(channels, 3)):
        table[c] = fm.equalize_lut(_histogram(image[:, :, c], s.top), s.dtype)
    return s.lut(image, table)


def _convert_color(s: GpuSession, image: Any, step: Step) -> Any:
    h, w, c = image.shape
    if c == 1:
        raise step.invalid("conversion", "needs an RGB or RGBA image, got one channel")
    conversion = step.as_str("conversion")
    if conversion == "rgb_to_bgr":
        order = [2, 1, 0, 3][:c]
        return cp.ascontiguousarray(image[:, :, order])
    out = s.empty(image.shape)
    if conversion == "rgb_to_hsv":
        s.kernels["rgb_to_hsv"](
            _grid(h * w),
            (ELEMENT_THREADS,),
            (image, out, np.int64(h * w), np.int32(c), s.backend.hsv_sdiv, s.backend.hsv_hdiv),
        )
    else:
        s.kernels["hsv_to_rgb"](_grid(h * w), (ELEMENT_THREADS,), (image, out, np.int64(h * w), np.int32(c)))
    return out


def _point(s: GpuSession, image: Any, step: Step) -> Any:
    channels = image.shape[2]
    table = np.tile(np.arange(s.top + 1, dtype=s.dtype), (channels, 1))
    table[: min(channels, 3)] = point_lut(step, s.dtype)
    return s.lut(image, table)


GPU_FILTERS: dict[str, GpuFilter] = {
    "grayscale": _grayscale,
    "gaussian_blur": _gaussian_blur,
    "box_blur": _box_blur,
    "median": _median,
    "unsharp_mask": _unsharp_mask,
    "sobel": _sobel,
    "threshold": _threshold,
    "resize": _resize,
    "crop": _crop,
    "rotate": _rotate,
    "flip": _flip,
    "adjust": _point,
    "invert": _point,
    "equalize": _equalize,
    "convert_color": _convert_color,
}


def device_copy_seconds(nbytes: int, repeats: int = 20) -> float:
    """Time of one device-to-device copy of ``nbytes`` (the bandwidth reference of the benchmarks), measured
    as the kernels are (:func:`device_seconds`)."""
    src = cp.empty(nbytes, dtype=cp.uint8)
    dst = cp.empty_like(src)
    stream = cp.cuda.get_current_stream()
    # cudaMemcpyAsync device to device, on the timed stream
    return device_seconds(lambda: dst.data.copy_from_device_async(src.data, nbytes, stream), repeats, stream)


@functools.cache
def _spin_kernel() -> Any:
    return cp.RawKernel(SPIN_SOURCE, "spin")


def device_seconds(work: Callable[[], Any], repeats: int = 20, stream: Any = None) -> float:
    """Mean device time of ``work`` (queued on ``stream``) over ``repeats`` back-to-back runs.

    A spin kernel holds the device while the host queues every run, so the events time the device alone,
    not the host's launch overhead (which, for a 20-microsecond kernel, would be most of the figure). Work that
    waits for the host inside (a filter that runs CPU code) is timed with that wait.
    """
    stream = stream or cp.cuda.get_current_stream()
    with stream:
        work()
        stream.synchronize()
        # 2 ms plus 200 microseconds per run at up to 2.5 GHz: more than the host needs to queue them. (CUDA 13
        # no longer reports the clock rate in the device properties.)
        cycles = int((0.002 + 0.0002 * repeats) * 2.5e9)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        _spin_kernel()((1,), (1,), (np.int64(cycles),))
        start.record()
        for _ in range(repeats):
            work()
        end.record()
        end.synchronize()
    return float(cp.cuda.get_elapsed_time(start, end)) / 1000.0 / repeats
