"""The GPU-vs-CPU cases shared by the real GPU tests and the emulated ones."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from mesh.services.image_processing.registry import FILTERS

# Every filter with parameter sets that cover its code paths.
CASES: list[tuple[str, dict[str, Any]]] = [
    *[("grayscale", {"method": m}) for m in ("bt601", "bt709", "average", "lightness", "luminosity")],
    *[("gaussian_blur", {"sigma": 2.0, "border": b}) for b in ("reflect", "clamp", "wrap", "constant")],
    ("gaussian_blur", {"sigma": 3.0, "ksize": 7}),
    ("gaussian_blur", {"sigma": 12.0, "border": "wrap"}),  # too wide for the fused tile on colour
    *[("box_blur", {"ksize": 5, "border": b}) for b in ("reflect", "clamp", "wrap", "constant")],
    ("median", {"ksize": 3}),
    ("median", {"ksize": 5}),
    ("unsharp_mask", {"sigma": 1.5, "amount": 1.0}),
    ("unsharp_mask", {"sigma": 1.0, "amount": 0.5, "threshold": 4}),
    ("unsharp_mask", {"sigma": 1.5, "amount": 1.0, "threshold": 8}),
    *[("sobel", {"direction": d, "ksize": k}) for d in ("x", "y", "magnitude") for k in (1, 3, 5)],
    ("canny", {}),
    ("threshold", {"method": "binary", "value": 100.0}),
    ("threshold", {"method": "binary", "value": 100.0, "invert": True}),
    ("threshold", {"method": "otsu"}),
    ("threshold", {"method": "adaptive", "block_size": 15, "c": 3}),
    *[
        ("resize", {"scale": s, "interpolation": m})
        for s in (0.5, 0.37, 1.7)
        for m in ("nearest", "bilinear", "area")
    ],
    ("resize", {"width": 40, "height": 90, "keep_aspect": False, "interpolation": "area"}),
    ("crop", {"x": 5, "y": 3, "width": 20, "height": 11}),
    *[("rotate", {"angle": a}) for a in (90.0, 180.0, -90.0, 30.0)],
    ("rotate", {"angle": 17.0, "interpolation": "nearest", "expand": False}),
    ("rotate", {"angle": 90.0, "expand": False}),
    *[("flip", {"direction": d}) for d in ("horizontal", "vertical", "both")],
    ("adjust", {"brightness": 0.1, "contrast": 1.3, "gamma": 2.2}),
    ("invert", {}),
    ("equalize", {"method": "global"}),
    ("equalize", {"method": "clahe"}),
    *[("convert_color", {"conversion": c}) for c in ("rgb_to_hsv", "hsv_to_rgb", "rgb_to_bgr")],
]


def within(name: str, cpu: npt.NDArray[Any], gpu: npt.NDArray[Any]) -> None:
    """Assert the GPU result is within the filter's stated tolerance of the CPU result."""
    tolerance = FILTERS[name].tolerance
    assert cpu.shape == gpu.shape
    assert cpu.dtype == gpu.dtype
    diff = np.abs(cpu.astype(np.int64) - gpu.astype(np.int64))
    limit, fraction = tolerance.limit(cpu.dtype.itemsize * 8)
    share = float((diff <= limit).mean())
    assert share >= fraction, f"{name}: {share:.4%} within {limit}, max {diff.max()}"
