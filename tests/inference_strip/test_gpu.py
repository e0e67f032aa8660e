"""CPU and GPU (CuPy) readers give the same verdicts; skipped without CuPy and a CUDA device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.kit.devices import gpu_available
from mesh.services.inference.strip.generator import decode, generate
from mesh.services.inference.strip.reader import StripReader

DATA = Path(__file__).resolve().parents[1] / "data" / "strips"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available()[0], reason="needs CuPy and a CUDA device"),
]


def test_gpu_and_cpu_verdicts_agree() -> None:
    """On the tricky cases and 30 held-out images, both devices give the same verdict per image."""
    cpu, gpu = StripReader(device="cpu"), StripReader(device="gpu")
    images = [
        decode((DATA / c["file"]).read_bytes())
        for c in json.loads((DATA / "manifest.json").read_text())["cases"]
    ]
    images += [generate(seed).image for seed in range(1_000_000, 1_000_030)]
    disagreements = [
        i for i, image in enumerate(images) if cpu.read(image).verdict is not gpu.read(image).verdict
    ]
    assert not disagreements


def test_gpu_batch_equals_gpu_singles() -> None:
    """The GPU read_batch gives the same readings as reading one image at a time."""
    gpu = StripReader(device="gpu")
    images = [generate(seed).image for seed in range(1_000_000, 1_000_008)]
    assert [r.verdict for r in gpu.read_batch(images)] == [gpu.read(i).verdict for i in images]
