"""A NumPy stand-in for the small part of CuPy the GPU backend uses, with its kernels emulated.

It lets the GPU backend's host code (launch arguments, tables, fusion, staging, error mapping) run on a machine
without CUDA. Each emulated kernel follows the CUDA source in ``gpu_kernels.py`` statement by statement and is
called with the same positional arguments, so a launch with wrong or misordered arguments fails here. The
CUDA source itself is compiled only on a GPU machine (``test_gpu.py``).
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

Array = npt.NDArray[Any]


class FakeArray(np.ndarray):
    """A host array with CuPy's transfer methods."""

    @property
    def data(self) -> types.SimpleNamespace:  # type: ignore[override]
        """CuPy's MemoryPointer, as far as the backend reads it (the address, for alignment checks)."""
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def set(self, array: Array, stream: object = None) -> None:
        self[...] = array

    def get(self, stream: object = None, out: Array | None = None) -> Array:
        if out is None:
            return np.array(self)
        out[...] = self
        return out


def _fake(array: Any) -> FakeArray:
    return np.ascontiguousarray(array).view(FakeArray)


class OutOfMemoryError(Exception):
    """cupy.cuda.memory.OutOfMemoryError."""


class CUDARuntimeError(Exception):
    """cupy.cuda.runtime.CUDARuntimeError."""


class CUDADriverError(Exception):
    """cupy.cuda.driver.CUDADriverError."""


class MemoryPool:
    """Tracks a limit and raises OutOfMemoryError beyond it."""

    def __init__(self) -> None:
        self.limit = 0

    def set_limit(self, size: int) -> None:
        self.limit = size

    def free_all_blocks(self) -> None:
        return None

    def used_bytes(self) -> int:
        return 0


POOL = MemoryPool()


class _Context:
    def __enter__(self) -> _Context:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class Device(_Context):
    id = 0

    def use(self) -> None:
        return None


class Stream(_Context):
    def __init__(self, non_blocking: bool = False) -> None:
        self.non_blocking = non_blocking

    def synchronize(self) -> None:
        return None


class Event:
    def record(self, stream: object = None) -> None:
        return None

    def synchronize(self) -> None:
        return None


def get_elapsed_time(start: Event, end: Event) -> float:
    return 0.001


def empty(shape: Any, dtype: Any = np.uint8) -> FakeArray:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if POOL.limit and size > POOL.limit:
        raise OutOfMemoryError(f"out of memory allocating {size} bytes")
    return np.empty(shape, dtype=dtype).view(FakeArray)


def empty_like(array: Array) -> FakeArray:
    return empty(array.shape, array.dtype)


def asarray(array: Any) -> FakeArray:
    return _fake(np.array(array))


def asnumpy(array: Any, stream: object = None) -> Array:
    return np.array(array)


def _map_index(i: Array, n: int, border: int) -> Array:
    """Vectorised twin of the kernels' map_index."""
    i = i.copy()
    inside = (i >= 0) & (i < n)
    if border == 1:
        return np.clip(i, 0, n - 1)
    if border == 2:
        return np.mod(i, n)
    if border == 3:
        return np.where(inside, i, -1)
    if n == 1:
        return np.zeros_like(i)
    while ((i < 0) | (i >= n)).any():
        i = np.where(i < 0, -i, i)
        i = np.where(i >= n, 2 * n - 2 - i, i)
    return i


def _top(array: Array) -> int:
    return int(np.iinfo(array.dtype).max)


def _saturate(values: Array, dtype: Any) -> Array:
    top = int(np.iinfo(dtype).max)
    return np.clip(np.rint(values), 0, top).astype(dtype)


def _flat(array: Array) -> Array:
    return array.reshape(-1)


def k_lut_apply(src: Array, dst: Array, lut: Array, n: Any, channels: Any) -> None:
    top = _top(src)
    index = (np.arange(int(n)) % int(channels)) * (top + 1) + _flat(src)
    _flat(dst)[:] = _flat(lut)[index]


def k_grayscale(
    src: Array, dst: Array, pixels: Any, channels: Any, wr: Any, wg: Any, wb: Any, method: Any
) -> None:
    px = src.reshape(int(pixels), int(channels)).astype(np.int64)
    r, g, b = px[:, 0], px[:, 1], px[:, 2]
    if method == 0:
        s = r * int(wr) + g * int(wg) + b * int(wb)
        q, rem = s >> 14, s & 16383
        out = q + ((rem > 8192) | ((rem == 8192) & ((q & 1) == 1)))
    elif method == 3:
        out = (r * int(wr) + g * int(wg) + b * int(wb) + 16384) >> 15
    elif method == 1:
        out = (r + g + b + 1) // 3
    else:
        s = np.maximum(r, np.maximum(g, b)) + np.minimum(r, np.minimum(g, b))
        q = s >> 1
        out = q + (((s & 1) == 1) & ((q & 1) == 1))
    _flat(dst)[:] = out.astype(dst.dtype)


def k_conv_rows(src: Array, dst: Array, h: Any, w: Any, c: Any, k: Array, r: Any, border: Any) -> None:
    h, w, c, r = int(h), int(w), int(c), int(r)
    image = src.reshape(h, w, c).astype(np.float32)
    index = _map_index(np.arange(-r, w + r), w, int(border))
    padded = np.where((index >= 0)[None, :, None], image[:, np.maximum(index, 0), :], np.float32(0))
    acc = np.zeros((h, w, c), dtype=np.float32)
    for t in range(2 * r + 1):
        acc = (np.float32(k[t]) * padded[:, t : t + w, :] + acc).astype(np.float32)
    dst.reshape(h, w, c)[...] = acc


def k_conv_cols(
    src: Array, dst: Array, h: Any, w: Any, c: Any, k: Array, r: Any, border: Any, scale: Any, raw_out: Any
) -> None:
    h, w, c, r = int(h), int(w), int(c), int(r)
    image = src.reshape(h, w * c)
    index = _map_index(np.arange(-r, h + r), h, int(border))
    padded = np.where((index >= 0)[:, None], image[np.maximum(index, 0), :], np.float32(0))
    acc = np.zeros((h, w * c), dtype=np.float32)
    for t in range(2 * r + 1):
        acc = (np.float32(k[t]) * padded[t : t + h, :] + acc).astype(np.float32)
    if raw_out:
        dst.reshape(h, w * c)[...] = acc
    else:
        dst.reshape(h, w * c)[...] = _saturate(acc.astype(np.float64) * float(scale), dst.dtype)


def k_conv_fused(
    src: Array,
    dst: Array,
    h: Any,
    w: Any,
    c: Any,
    kx: Array,
    rx: Any,
    ky: Array,
    ry: Any,
    border: Any,
    scale: Any,
    raw_out: Any,
    tile_w: Any,
    tile_h: Any,
) -> None:
    assert int(tile_w) >= 1
    assert int(tile_h) >= 1
    rows = np.empty((int(h), int(w), int(c)), dtype=np.float32)
    k_conv_rows(src, rows, h, w, c, kx, rx, border)
    k_conv_cols(rows, dst, h, w, c, ky, ry, border, scale, raw_out)


def k_sep_fused(
    src: Array,
    dst: Array,
    h: Any,
    w: Any,
    c: Any,
    kx: Array,
    ky: Array,
    border: Any,
    scale: Any,
    raw_out: Any,
    tile_h: Any,
) -> None:
    assert int(tile_h) >= 8
    assert int(tile_h) % 8 == 0  # SF_YB rows per thread in the column pass
    assert kx.size == ky.size
    r = np.int32((kx.size - 1) // 2)
    k_conv_fused(src, dst, h, w, c, kx, r, ky, r, border, scale, raw_out, np.int32(32), tile_h)


def k_histogram(src: Array, hist: Array, n: Any) -> None:
    hist += np.bincount(_flat(src)[: int(n)], minlength=hist.size).astype(hist.dtype)


def k_otsu_lut(hist: Array, lut: Array, invert: Any) -> None:
    from mesh.services.image_processing.filter_math import otsu_threshold

    level = otsu_threshold(np.asarray(hist))
    above = np.arange(hist.size) > level
    _flat(lut)[...] = np.where(above != bool(invert), _top(lut), 0)


def k_gradient_out(dx: Array, dy: Array, dst: Array, n: Any, magnitude: Any) -> None:
    a, b = _flat(dx).astype(np.float32), _flat(dy).astype(np.float32)
    values = np.sqrt(a * a + b * b) if magnitude else np.abs(a)
    _flat(dst)[:] = _saturate(values, dst.dtype)


def k_unsharp(x: Array, blurred: Array, dst: Array, n: Any, amount: Any, threshold: Any) -> None:
    v, b = _flat(x).astype(np.float32), _flat(blurred).astype(np.float32)
    a = np.float32(amount)
    sharp = _saturate(v * (np.float32(1) + a) + b * (-a), dst.dtype)
    small = (int(threshold) > 0) & (np.abs(v - b) < np.float32(threshold))
    _flat(dst)[:] = np.where(small, _flat(x), sharp)


def k_adaptive_compare(x: Array, mean: Array, dst: Array, n: Any, c: Any, invert: Any) -> None:
    above = _flat(x).astype(np.int64) > _flat(mean).astype(np.int64) - int(c)
    _flat(dst)[:] = np.where(above != bool(invert), _top(dst), 0)


def k_resample2(
    src: Array,
    dst: Array,
    in_w: Any,
    out_h: Any,
    out_w: Any,
    c: Any,
    yi: Array,
    yw: Array,
    xi: Array,
    xw: Array,
) -> None:
    image = src.reshape(-1, int(in_w), int(c)).astype(np.float32)
    y0, y1, x0, x1 = yi[0::2], yi[1::2], xi[0::2], xi[1::2]
    wx = xw[None, :, None]
    one = np.float32(1)
    top = image[y0][:, x0] * (one - wx) + image[y0][:, x1] * wx
    bottom = image[y1][:, x0] * (one - wx) + image[y1][:, x1] * wx
    dst[...] = _saturate(top * (one - yw[:, None, None]) + bottom * yw[:, None, None], dst.dtype).reshape(
        dst.shape
    )


def k_resample_area(
    src: Array,
    dst: Array,
    in_w: Any,
    out_h: Any,
    out_w: Any,
    c: Any,
    ystart: Array,
    yidx: Array,
    yw: Array,
    xstart: Array,
    xidx: Array,
    xw: Array,
) -> None:
    image = src.reshape(-1, int(in_w), int(c)).astype(np.float64)
    rows = np.zeros((int(out_h), image.shape[0]))
    cols = np.zeros((int(out_w), image.shape[1]))
    for j in range(int(out_h)):
        rows[j, yidx[ystart[j] : ystart[j + 1]]] += yw[ystart[j] : ystart[j + 1]]
    for j in range(int(out_w)):
        cols[j, xidx[xstart[j] : xstart[j + 1]]] += xw[xstart[j] : xstart[j + 1]]
    mixed = np.einsum("ay,yxc,bx->abc", rows, image, cols, optimize=True)
    dst[...] = _saturate(mixed, dst.dtype).reshape(dst.shape)


def k_warp_affine(
    src: Array, dst: Array, in_h: Any, in_w: Any, out_h: Any, out_w: Any, c: Any, *rest: Any
) -> None:
    m0, m1, m2, m3, m4, m5, bilinear = rest
    in_h, in_w, out_h, out_w, c = int(in_h), int(in_w), int(out_h), int(out_w), int(c)
    image = src.reshape(in_h, in_w, c).astype(np.float32)
    y, x = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
    sx = (np.float32(m0) * x + np.float32(m1) * y) + np.float32(m2)
    sy = (np.float32(m3) * x + np.float32(m4) * y) + np.float32(m5)

    def tap(yy: Array, xx: Array) -> Array:
        inside = (xx >= 0) & (yy >= 0) & (xx < in_w) & (yy < in_h)
        values = np.zeros((out_h, out_w, c), dtype=np.float32)
        values[inside] = image[yy[inside], xx[inside]]
        return values

    if not bilinear:
        dst.reshape(out_h, out_w, c)[...] = tap(np.rint(sy).astype(np.int64), np.rint(sx).astype(np.int64))
        return
    ix, iy = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - ix)[..., None], (sy - iy)[..., None]
    top = tap(iy, ix) * (1 - fx) + tap(iy, ix + 1) * fx
    bottom = tap(iy + 1, ix) * (1 - fx) + tap(iy + 1, ix + 1) * fx
    dst.reshape(out_h, out_w, c)[...] = _saturate(top * (1 - fy) + bottom * fy, dst.dtype)


def k_rgb_to_hsv(src: Array, dst: Array, pixels: Any, channels: Any, sdiv: Array, hdiv: Array) -> None:
    px = src.reshape(int(pixels), int(channels))
    out = dst.reshape(int(pixels), int(channels))
    r: Array
    g: Array
    b: Array
    v: Array
    diff: Array
    s: Array
    h: Array
    if src.dtype == np.uint8:
        r, g, b = (px[:, i].astype(np.int64) for i in range(3))
        v = np.maximum(r, np.maximum(g, b))
        diff = v - np.minimum(r, np.minimum(g, b))
        vr, vg = np.where(v == r, -1, 0), np.where(v == g, -1, 0)
        s = (diff * sdiv[v] + (1 << 11)) >> 12
        h = (vr & (g - b)) + (~vr & ((vg & (b - r + 2 * diff)) + (~vg & (r - g + 4 * diff))))
        h = (h * hdiv[diff] + (1 << 11)) >> 12
        h = np.clip(h + np.where(h < 0, 256, 0), 0, 255)
        hsv = np.stack([h, s, v], axis=1)
    else:
        scale = np.float32(1.0 / 65535.0)
        r, g, b = (px[:, i].astype(np.float32) * scale for i in range(3))
        v = np.maximum(r, np.maximum(g, b))
        diff = v - np.minimum(r, np.minimum(g, b))
        eps = np.float32(1.19209290e-7)
        s = diff / (np.abs(v) + eps)
        d = np.float32(60) / (diff + eps)
        h = np.where(v == r, (g - b) * d, np.where(v == g, (b - r) * d + 120, (r - g) * d + 240)).astype(
            np.float32
        )
        h = np.where(h < 0, h + 360, h)
        hsv = np.stack([h * np.float32(65535 / 360), s * 65535, v * 65535], axis=1)
    out[:, :3] = _saturate(hsv, dst.dtype)
    if int(channels) == 4:
        out[:, 3] = px[:, 3]


def k_hsv_to_rgb(src: Array, dst: Array, pixels: Any, channels: Any) -> None:
    px = src.reshape(int(pixels), int(channels)).astype(np.float32)
    out = dst.reshape(int(pixels), int(channels))
    top = np.float32(_top(src))
    if src.dtype == np.uint8:
        h = px[:, 0] * np.float32(6.0 / 255.0)
    else:
        h = px[:, 0] * np.float32(360.0 / 65535.0) * np.float32(6.0 / 360.0)
    s, v = px[:, 1] / top, px[:, 2] / top
    h = np.where(h >= 6, h - 6, h)
    sector = np.floor(h).astype(np.int64)
    h = h - sector
    bad = (sector < 0) | (sector >= 6)
    sector = np.where(bad, 0, sector)
    h = np.where(bad, 0, h)
    tab = np.stack([v, v * (1 - s), v * (1 - s * h), v * (1 - s * (1 - h))], axis=1)
    sectors = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])
    pick = sectors[sector]
    rows = np.arange(len(h))
    bb, gg, rr = tab[rows, pick[:, 0]], tab[rows, pick[:, 1]], tab[rows, pick[:, 2]]
    grey = s == 0
    rgb = np.stack([np.where(grey, v, rr), np.where(grey, v, gg), np.where(grey, v, bb)], axis=1)
    out[:, :3] = _saturate(rgb * top, dst.dtype)
    if int(channels) == 4:
        out[:, 3] = px[:, 3].astype(dst.dtype)


EMULATED: dict[str, Callable[..., None]] = {
    name.removeprefix("k_"): function for name, function in globals().items() if name.startswith("k_")
}
# One emulation for every radius of the register-blocked kernel.
EMULATED.update({f"sep_fused_r{r}": k_sep_fused for r in range(1, 33)})


SCALARS = {"int": np.int32, "long long": np.int64, "float": np.float32, "double": np.float64}


def parse_signature(code: str, name: str, sample: Any) -> list[Any]:
    """Each parameter of a kernel as the numpy type its argument must have ('ptr:<dtype>' for pointers)."""
    match = re.search(
        rf'extern "C" __global__ void (?:__launch_bounds__\(\w+\) )?{name}\((.*?)\)\s*\{{', code, re.DOTALL
    )
    assert match is not None, name
    kinds: list[Any] = []
    for raw in match.group(1).split(","):
        words = raw.replace("__restrict__", "").replace("const", "").replace("*", " * ").split()
        base = " ".join(w for w in words[:-1] if w != "*")
        if "*" in words:
            pointee = {"sample_t": np.dtype(sample), "float": np.dtype(np.float32), "int": np.dtype(np.int32)}
            kinds.append(("ptr", pointee.get(base)))
        else:
            kinds.append(SCALARS[base])
    return kinds


class RawKernel:
    """An emulated kernel: checks the launch shape and argument types, then runs the NumPy twin."""

    def __init__(self, name: str, signature: list[Any]) -> None:
        self.name = name
        self.signature = signature
        self.launches = 0

    def __call__(
        self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], shared_mem: int = 0
    ) -> None:
        assert all(isinstance(g, int) and g >= 1 for g in grid), (self.name, grid)
        assert int(np.prod(block)) <= 1024, (self.name, block)
        assert shared_mem <= 48 * 1024, (self.name, shared_mem)
        assert len(args) == len(self.signature), (self.name, len(args), len(self.signature))
        for position, (arg, kind) in enumerate(zip(args, self.signature, strict=True)):
            where = (self.name, position)
            if isinstance(kind, tuple):
                # Host arrays cannot be kernel arguments: every array must have come through the fake device.
                assert isinstance(arg, FakeArray), (*where, "needs a device array")
                assert kind[1] is None or arg.dtype == kind[1], (*where, arg.dtype, kind[1])
                assert arg.flags.c_contiguous, (*where, "needs a contiguous array")
            else:
                assert type(arg) is kind, (*where, type(arg), kind)
        self.launches += 1
        EMULATED[self.name](*args)


class RawModule:
    """Hands out emulated kernels by name."""

    def __init__(self, code: str, options: tuple[str, ...] = ()) -> None:
        assert "--std=c++14" in options
        self.code = code
        self.sample = np.uint8 if "-DSAMPLE=unsigned char" in options else np.uint16
        assert "-DSAMPLE=unsigned char" in options or "-DSAMPLE=unsigned short" in options

    def get_function(self, name: str) -> RawKernel:
        return RawKernel(name, parse_signature(self.code, name, self.sample))


def _median_filter(image: Array, size: Any, mode: str) -> FakeArray:
    return _fake(ndimage.median_filter(np.asarray(image), size=size, mode=mode))


def build() -> dict[str, types.ModuleType]:
    """Fresh ``cupy``, ``cupyx``, ``cupyx.scipy`` and ``cupyx.scipy.ndimage`` modules, by module name."""
    cupy = types.ModuleType("cupy")
    cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(
            getDeviceCount=lambda: 1,
            getDeviceProperties=lambda i: {"name": b"Emulated GPU"},
            memGetInfo=lambda: (1 << 30, 1 << 31),
            CUDARuntimeError=CUDARuntimeError,
        ),
        driver=types.SimpleNamespace(CUDADriverError=CUDADriverError),
        memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
        Device=Device,
        Stream=Stream,
        Event=Event,
        get_elapsed_time=get_elapsed_time,
        alloc_pinned_memory=lambda size: bytearray(size),
    )
    for name, value in {
        "cuda": cuda,
        "RawModule": RawModule,
        "get_default_memory_pool": lambda: POOL,
        "empty": empty,
        "empty_like": empty_like,
        "asarray": asarray,
        "asnumpy": asnumpy,
        "ascontiguousarray": _fake,
        "rot90": np.rot90,
        "flip": np.flip,
        "bincount": lambda a, minlength=0: _fake(np.bincount(np.asarray(a), minlength=minlength)),
        "zeros": lambda shape, dtype=np.float64: _fake(np.zeros(shape, dtype=dtype)),
        "float32": np.float32,
        "uint8": np.uint8,
        "uint64": np.uint64,
    }.items():
        setattr(cupy, name, value)
    cupyx = types.ModuleType("cupyx")
    scipy_module = types.ModuleType("cupyx.scipy")
    ndimage_module = types.ModuleType("cupyx.scipy.ndimage")
    ndimage_module.median_filter = _median_filter  # type: ignore[attr-defined]
    scipy_module.ndimage = ndimage_module  # type: ignore[attr-defined]
    cupyx.scipy = scipy_module  # type: ignore[attr-defined]
    return {"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": scipy_module, "cupyx.scipy.ndimage": ndimage_module}
