"""Strip reader latency and throughput: 1080p read and pre-check on one CPU thread, read_batch, and the served
model's worker processes; GPU with CuPy.

Images are decoded before timing (the figures are "after decoding", as the targets state).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from mesh.kit.devices import gpu_available
from mesh.services.inference.models import StripReaderModel
from mesh.services.inference.repository import read_config
from mesh.services.inference.strip.generator import GeneratorOptions, generate, split_seeds
from mesh.services.inference.strip.reader import StripReader
from mesh.services.inference.workers import WorkerModel

IMAGES = 12
REPEATS = 3
MODEL_CONFIG = Path(__file__).resolve().parents[1] / "models" / "strip-reader" / "1" / "config.yaml"


def _images(size: tuple[int, int]) -> list[npt.NDArray[Any]]:
    options = GeneratorOptions(size=size)
    return [generate(seed, options).image for seed in split_seeds("heldout", IMAGES, start=900_000)]


def _per_image_ms(
    call: Callable[[npt.NDArray[Any]], object], images: list[npt.NDArray[Any]]
) -> dict[str, float]:
    call(images[0])
    times = []
    for image in images:
        best = float("inf")
        for _ in range(REPEATS):
            started = time.perf_counter()
            call(image)
            best = min(best, time.perf_counter() - started)
        times.append(best * 1000)
    return {
        "median_ms": round(statistics.median(times), 3),
        "p90_ms": round(float(np.percentile(times, 90)), 3),
        "max_ms": round(max(times), 3),
    }


def _batch_throughput(reader: StripReader, images: list[npt.NDArray[Any]], batch: int) -> float:
    reader.read_batch(images[:batch])
    started = time.perf_counter()
    done = 0
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        reader.read_batch(chunk)
        done += len(chunk)
    return done / (time.perf_counter() - started)


def _workers_throughput(device: Literal["cpu", "gpu"], images: list[npt.NDArray[Any]]) -> dict[str, object]:
    """Images per second through the served model's worker processes (``instance_count`` of them, as
    ``models/strip-reader`` resolves it here), each fed batches of 8 from its own thread as the batcher would."""
    config = read_config(MODEL_CONFIG)
    count = config.instances()
    model = WorkerModel(StripReaderModel, config, device, count)
    try:
        batches = [images[i : i + 8] for i in range(0, len(images), 8)]
        model.run_batch("predict", (), batches[0])
        with ThreadPoolExecutor(count) as pool:
            started = time.perf_counter()
            for _ in range(2):
                list(pool.map(lambda batch: model.run_batch("predict", (), batch), batches * count))
            seconds = time.perf_counter() - started
        return {
            "benchmark": f"strip_read_workers_1080p_{device}",
            "workers": count,
            "images_per_second": round(2 * count * len(images) / seconds, 1),
        }
    finally:
        model.close()


def run() -> list[dict[str, object]]:
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        results: list[dict[str, object]] = []
        hd = _images((1920, 1080))
        cpu = StripReader(device="cpu")
        results.append(
            {
                "benchmark": "strip_read_1080p_cpu_1thread",
                "images": IMAGES,
                **_per_image_ms(cpu.read, hd),
                "target_ms": 15.0,
            }
        )
        results.append(
            {
                "benchmark": "strip_precheck_1080p_cpu_1thread",
                "images": IMAGES,
                **_per_image_ms(cpu.precheck, hd),
                "target_ms": 10.0,
            }
        )
        large = [generate(seed, GeneratorOptions(size=(4000, 3000))).image for seed in (1_900_000, 1_900_001)]
        results.append(
            {
                "benchmark": "strip_read_4000x3000_cpu_1thread",
                "images": len(large),
                **_per_image_ms(cpu.read, large),
            }
        )
        for batch in (1, 8):
            results.append(
                {
                    "benchmark": f"strip_read_batch{batch}_1080p_cpu_1thread",
                    "images_per_second": round(_batch_throughput(cpu, hd, batch), 1),
                }
            )
        results.append(_workers_throughput("cpu", hd))
        if gpu_available()[0]:
            gpu = StripReader(device="gpu")
            results.append(
                {
                    "benchmark": "strip_read_1080p_gpu",
                    "images": IMAGES,
                    **_per_image_ms(gpu.read, hd),
                    "target_ms": 3.0,
                }
            )
            for batch in (1, 8):
                results.append(
                    {
                        "benchmark": f"strip_read_batch{batch}_1080p_gpu",
                        "images_per_second": round(_batch_throughput(gpu, hd, batch), 1),
                    }
                )
            results.append(_workers_throughput("gpu", hd))
        return results
    finally:
        cv2.setNumThreads(threads)
