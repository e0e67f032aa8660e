"""Accuracy and latency of the strip reader on generated images whose truth is known.

``evaluate`` reads a split of the generator and returns one JSON-ready dict: verdict accuracy, INVALID recall,
the false POSITIVE rate on negatives, the limit of detection (the lowest T contrast bin from which on T is
found in at least 95 % of positives), the Spearman correlation of ``t_to_c_ratio`` with the true T/C strength,
and latencies per 1080p image (one CPU thread; GPU when CuPy sees a device). Each share comes with its 95 % Wilson
interval: 43 positives in a contrast bin, or 600 negatives, pin a rate down only so far, and the interval says
whether a miss of a target is the reader's or the sample's.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from scipy import stats

from mesh.kit.devices import gpu_available
from mesh.services.inference.strip.config import ReaderConfig
from mesh.services.inference.strip.generator import (
    GeneratorOptions,
    Overrides,
    Sample,
    Split,
    Truth,
    generate,
    generate_with,
    split_seeds,
)
from mesh.services.inference.strip.reader import Scores, StripReader
from mesh.services.inference.strip.types import QualityFlag, StripReading, Verdict

# T contrast bins for the limit of detection.
LOD_EDGES = (0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 1.0)
LOD_RATE = 0.95
LOD_MIN_COUNT = 5

TARGETS = {
    "accuracy": 0.99,
    "invalid_recall": 0.995,
    "false_positive_rate": 0.005,
    "limit_of_detection": 0.03,
    "spearman": 0.95,
    "cpu_ms_per_1080p": 15.0,
    "precheck_ms_per_1080p": 10.0,
    "gpu_ms_per_1080p": 3.0,
}


@dataclass(frozen=True)
class Record:
    """One image: its truth, the reading and the raw scores."""

    truth: Truth
    reading: StripReading
    scores: Scores


def read_sample(reader: StripReader, sample: Sample) -> Record:
    """Reads one generated sample; the record keeps its truth and the raw scores."""
    reading, scores = reader.read_with_scores(sample.image)
    return Record(sample.truth, reading, scores)


LOSSLESS = Overrides(image_format="png")
"""Every picture saved as PNG: the same scenes, light and noise as their seeds draw, without the JPEG's loss."""


def run_split(reader: StripReader, seeds: Iterable[int], lossless: bool = False) -> list[Record]:
    """Generates and reads every seed (``lossless``: each saved as PNG, whatever format its seed draws)."""
    return [
        read_sample(reader, generate_with(seed, LOSSLESS) if lossless else generate(seed)) for seed in seeds
    ]


def limit_of_detection(records: list[Record]) -> tuple[float | None, list[dict[str, Any]]]:
    """Lowest bin edge from which on every populated bin finds T in >= 95 % of positives, and the bins."""
    bins: list[dict[str, Any]] = []
    for lo, hi in itertools.pairwise(LOD_EDGES):
        inside = [
            r
            for r in records
            if r.truth.verdict is Verdict.POSITIVE and lo <= r.truth.test_line.contrast < hi
        ]
        found = sum(1 for r in inside if r.reading.test_line.present)
        rate = found / len(inside) if inside else None
        bins.append(
            {
                "from": lo,
                "to": hi,
                "count": len(inside),
                "found": found,
                "rate": rate,
                "rate_95": wilson_interval(found, len(inside)),
            }
        )
    lod: float | None = None
    for entry in reversed(bins):
        if entry["count"] < LOD_MIN_COUNT:
            continue
        if entry["rate"] is not None and entry["rate"] >= LOD_RATE:
            lod = float(entry["from"])
        else:
            break
    return lod, bins


def metrics(records: list[Record]) -> dict[str, Any]:
    """Accuracy figures of a set of records."""
    total = len(records)
    correct = sum(1 for r in records if r.reading.verdict is r.truth.verdict)
    invalid = [r for r in records if r.truth.verdict is Verdict.INVALID]
    negative = [r for r in records if r.truth.verdict is Verdict.NEGATIVE]
    positive = [r for r in records if r.truth.verdict is Verdict.POSITIVE]
    no_strip = [r for r in records if r.truth.kind == "none"]
    lod, bins = limit_of_detection(records)
    truth_ratio = [r.truth.t_to_c for r in positive]
    read_ratio = [r.reading.t_to_c_ratio for r in positive]
    spearman = float(stats.spearmanr(truth_ratio, read_ratio).statistic) if len(positive) > 2 else None
    confusion = Counter(f"{r.truth.verdict.name}->{r.reading.verdict.name}" for r in records)
    found_strips = [r for r in records if r.truth.kind != "none"]
    # The shares the targets name: (hits, trials) each.
    counts = {
        "accuracy": (correct, total),
        "invalid_recall": _hits(invalid, lambda r: r.reading.verdict is Verdict.INVALID),
        "false_positive_rate": _hits(negative, lambda r: r.reading.verdict is Verdict.POSITIVE),
        "positive_recall": _hits(positive, lambda r: r.reading.verdict is Verdict.POSITIVE),
    }
    return {
        "images": total,
        **{name: hits / trials if trials else None for name, (hits, trials) in counts.items()},
        "intervals_95": {name: wilson_interval(hits, trials) for name, (hits, trials) in counts.items()},
        "no_strip_flagged": _share(
            no_strip, lambda r: QualityFlag.STRIP_NOT_FOUND in r.reading.quality_flags
        ),
        "strip_found_rate": _share(
            found_strips, lambda r: QualityFlag.STRIP_NOT_FOUND not in r.reading.quality_flags
        ),
        "never_verdict_without_strip": all(
            r.reading.verdict is Verdict.INVALID
            for r in records
            if QualityFlag.STRIP_NOT_FOUND in r.reading.quality_flags
        ),
        "limit_of_detection": lod,
        "lod_bins": bins,
        "spearman": spearman,
        "confusion": dict(sorted(confusion.items())),
        "errors": [
            {
                "seed": r.truth.seed,
                "truth": r.truth.verdict.name,
                "read": r.reading.verdict.name,
                "kind": r.truth.kind,
                "t": round(r.truth.test_line.contrast, 4),
                "c": round(r.truth.control_line.contrast, 4),
            }
            for r in records
            if r.reading.verdict is not r.truth.verdict
        ],
    }


def _hits(records: list[Record], predicate: Any) -> tuple[int, int]:
    return sum(1 for r in records if predicate(r)), len(records)


def _share(records: list[Record], predicate: Any) -> float | None:
    hits, trials = _hits(records, predicate)
    return hits / trials if trials else None


def wilson_interval(successes: int, total: int) -> tuple[float, float] | None:
    """The 95 % Wilson score interval of ``successes`` out of ``total`` (None for no trials), rounded to 4
    places. Unlike the normal approximation it stays inside [0, 1] and does not shrink to a point at 0 or
    ``total`` successes: 600 of 600 INVALID tests read right still leaves 0.9936-1."""
    if total == 0:
        return None
    interval = stats.binomtest(successes, total).proportion_ci(confidence_level=0.95, method="wilson")
    return round(float(interval.low), 4), round(float(interval.high), 4)


def latency_ms(reader: StripReader, count: int = 12, repeats: int = 3, precheck: bool = False) -> float:
    """Median milliseconds per 1920x1080 RGB image (decoded), best of ``repeats`` per image."""
    options = GeneratorOptions(size=(1920, 1080))
    images = []
    for seed in split_seeds("heldout", count, start=900_000):
        image = generate(seed, options).image
        if image.ndim == 3 and image.shape[2] == 4:
            image = np.ascontiguousarray(image[:, :, :3])
        images.append(image)
    call = reader.precheck if precheck else reader.read
    call(images[0])  # warm-up
    times = []
    for image in images:
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            call(image)
            best = min(best, time.perf_counter() - started)
        times.append(best * 1000)
    return float(statistics.median(times))


def evaluate(
    split: Split = "heldout", count: int = 400, timing: bool = True, lossless: bool = False
) -> dict[str, Any]:
    """The full evaluation as one JSON-ready dict; ``lossless`` reads the same scenes saved as PNG (a diagnosis
    of what JPEG costs, not the figures the targets are judged on)."""
    cv2.setNumThreads(1)
    reader = StripReader(ReaderConfig())
    started = time.perf_counter()
    records = run_split(reader, split_seeds(split, count), lossless)
    result: dict[str, Any] = {
        "split": split,
        "seeds": [split_seeds(split, count)[0], split_seeds(split, count)[-1]],
        "pictures": "every one saved as PNG (--lossless)" if lossless else "as each seed draws them",
    }
    result.update(metrics(records))
    if timing:
        result["cpu_ms_per_1080p"] = round(latency_ms(reader), 2)
        result["precheck_ms_per_1080p"] = round(latency_ms(reader, precheck=True), 2)
        result["gpu_ms_per_1080p"] = (
            round(latency_ms(StripReader(ReaderConfig(), device="gpu")), 2) if gpu_available()[0] else None
        )
    result["targets"] = TARGETS
    result["met"] = {
        name: _meets(name, result.get(name), target) for name, target in TARGETS.items() if name in result
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _meets(name: str, value: Any, target: float) -> bool | None:
    if value is None:
        return None
    higher_is_better = name in ("accuracy", "invalid_recall", "spearman")
    return bool(value >= target) if higher_is_better else bool(value <= target)
