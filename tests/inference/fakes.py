"""Test doubles for the inference service: a tiny model, a model repository on disk, an image store."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.kit.errors import NotFound
from mesh.services.inference.convert import strip_reading_to_proto
from mesh.services.inference.images import Pixels
from mesh.services.inference.models import DeviceName, Model, Operation
from mesh.services.inference.parameters import ResolvedParameters
from mesh.services.inference.repository import ModelConfig
from mesh.services.inference.strip.types import ABSENT_LINE, LineReading, QualityFlag, StripReading, Verdict

# An image whose first pixel has this value makes the fake model raise.
POISON = 13


def fake_config(name: str = "fake", **overrides: Any) -> dict[str, Any]:
    """A valid config mapping for the fake model."""
    config: dict[str, Any] = {
        "name": name,
        "implementation": "fake",
        "description": "a fake model for tests",
        "inputs": [{"name": "image", "datatype": "image", "shape": [-1, -1, -1]}],
        "outputs": [{"name": "strip_reading", "datatype": "StripReading", "shape": [1]}],
        "parameters": {
            "threshold": {"type": "number", "default": 128.0, "minimum": 0, "maximum": 255},
        },
        "max_batch_size": 4,
        "max_queue_delay_ms": 20,
    }
    config.update(overrides)
    return config


def write_model(root: Path, name: str = "fake", version: int | str = 1, **overrides: Any) -> Path:
    """Write ``root/name/version/config.yaml`` and return its directory."""
    directory = root / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(fake_config(name, **overrides)))
    return directory


@dataclass
class FakeModel:
    """POSITIVE when the image's mean exceeds the ``threshold`` parameter; records every batch."""

    config: ModelConfig
    device: DeviceName = "cpu"
    delay_seconds: float = 0.0
    platform: str = "python"
    operations: frozenset[Operation] = frozenset({"predict", "precheck"})
    min_image_size: tuple[int, int] = (4, 4)
    batches: list[tuple[Operation, int]] = field(default_factory=list)
    release: threading.Event | None = None
    closed: bool = False

    def warm_up(self) -> None:
        time.sleep(float(self.config.options.get("warm_up_seconds", 0.0)))
        if self.config.options.get("fail_warm_up"):
            raise RuntimeError("weights are corrupt")
        flag = self.config.options.get("fail_warm_up_while")
        if flag is not None and Path(flag).exists():
            raise RuntimeError(f"weights unreadable while {flag} exists")

    def run_batch(
        self, operation: Operation, parameters: ResolvedParameters, images: Sequence[Pixels]
    ) -> Sequence[object]:
        self.batches.append((operation, len(images)))
        if self.release is not None:
            self.release.wait(5)
        delay = self.delay_seconds or float(self.config.options.get("delay_seconds", 0.0))
        if delay:
            time.sleep(delay)
        if any(int(image.flat[0]) == POISON for image in images):
            raise ValueError("poisoned image")
        if any(int(image.flat[0]) == self.config.options.get("exit_on_pixel", -1) for image in images):
            os._exit(17)  # a crash that skips every cleanup, as a segfault would
        self._meet_others()
        threshold = float(dict(parameters).get("threshold", 128.0))
        readings = [self._read(image, threshold, operation == "precheck") for image in images]
        if self.config.options.get("report_opencv_threads"):
            # The threads OpenCV may use in this process, where the control line's x would be.
            line = dataclasses.replace(readings[0].control_line, center_x=float(cv2.getNumThreads()))
            readings = [dataclasses.replace(r, control_line=line) for r in readings]
        return readings

    def _meet_others(self) -> None:
        """With option ``rendezvous_dir``: wait until ``rendezvous_count`` batches (this one included) compute
        at once, each leaving a file named by its process id; raise when they do not within 10 s."""
        directory = self.config.options.get("rendezvous_dir")
        if directory is None:
            return
        (Path(directory) / f"{os.getpid()}-{threading.get_ident()}").touch()
        deadline = time.monotonic() + 10
        while len(list(Path(directory).iterdir())) < int(self.config.options["rendezvous_count"]):
            if time.monotonic() > deadline:
                raise TimeoutError("no other batch computed at the same time")
            time.sleep(0.01)

    def fault(self) -> str | None:
        return None

    def close(self) -> None:
        self.closed = True

    @staticmethod
    def _read(image: Pixels, threshold: float, precheck: bool) -> StripReading:
        mean = float(np.mean(image))
        positive = mean > threshold
        line = LineReading(True, 10.0, 0.5, mean / 255.0, 10.0, 5.0)
        return StripReading(
            verdict=Verdict.POSITIVE if positive else Verdict.NEGATIVE,
            control_line=line,
            test_line=line if positive else ABSENT_LINE,
            t_to_c_ratio=1.0 if positive else 0.0,
            confidence=0.9,
            quality_flags=(QualityFlag.BLUR,) if precheck else (),
            window=None,
            precheck_only=precheck,
        )

    def fill_response(self, output: object, response: pb.PredictResponse) -> None:
        assert isinstance(output, StripReading)
        response.strip_reading.CopyFrom(strip_reading_to_proto(output))


@dataclass
class FakeFactory:
    """Builds FakeModels and keeps them, so that tests can inspect and steer them."""

    delay_seconds: float = 0.0
    built: list[FakeModel] = field(default_factory=list)

    def __call__(self, config: ModelConfig, device: DeviceName) -> Model:
        model = FakeModel(config, device, delay_seconds=self.delay_seconds)
        self.built.append(model)
        return model


class MemoryFetcher:
    """An image store in a dict."""

    def __init__(self, images: dict[str, bytes] | None = None) -> None:
        self.images = dict(images or {})
        self.fetched: list[str] = []
        """Every id asked for, in order."""

    async def fetch(self, image_id: str, deadline: float | None = None) -> bytes:
        self.fetched.append(image_id)
        try:
            return self.images[image_id]
        except KeyError:
            raise NotFound(f"image {image_id} does not exist") from None
