"""Small synthetic images and step builders shared by the image processing tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from mesh.kit.param_values import ParamScalar
from mesh.services.image_processing.registry import Step, validate_pipeline

LAYOUTS = [(np.uint8, 1), (np.uint8, 3), (np.uint8, 4), (np.uint16, 1), (np.uint16, 3), (np.uint16, 4)]


def noise(height: int, width: int, channels: int, dtype: Any = np.uint8, seed: int = 0) -> npt.NDArray[Any]:
    """Uniform random samples over the dtype's whole range."""
    rng = np.random.default_rng(seed)
    top = int(np.iinfo(dtype).max)
    return rng.integers(0, top, (height, width, channels), endpoint=True).astype(dtype)


def smooth(height: int, width: int, channels: int, dtype: Any = np.uint8) -> npt.NDArray[Any]:
    """Gentle gradients with a bright disc: structure without noise."""
    top = float(np.iinfo(dtype).max)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = []
    for c in range(channels):
        base = 0.25 + 0.5 * (x / max(width - 1, 1)) * (1 - c / 4) + 0.2 * (y / max(height - 1, 1))
        disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2) < (min(height, width) / 4) ** 2
        planes.append(np.clip(base + 0.2 * disc, 0, 1))
    return np.rint(np.stack(planes, axis=2) * top).astype(dtype)


def step(name: str, **params: ParamScalar) -> Step:
    """One validated step."""
    return validate_pipeline([(name, params)])[0]
