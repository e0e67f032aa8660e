"""The model port and the implementations a model config can name.

A model config says ``implementation: strip_reader``; :func:`default_factories` maps that name to a
factory. A :class:`Model` computes whole batches (called from a worker thread by the batcher) and writes
its output into a ``PredictResponse``. Tests inject factories of their own (fakes) into the repository.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias, cast

import numpy as np

from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.kit.devices import DeviceName as DeviceName
from mesh.kit.logging import get_logger
from mesh.services.inference.convert import ReadingLike, strip_reading_to_proto
from mesh.services.inference.parameters import ResolvedParameters

if TYPE_CHECKING:
    from mesh.services.inference.images import Pixels
    from mesh.services.inference.repository import ModelConfig

log = get_logger(__name__)

# What a request asks of a model: the full prediction, or only the fast quality pre-check.
Operation: TypeAlias = Literal["predict", "precheck"]


class Model(Protocol):
    """A loaded model version."""

    @property
    def platform(self) -> str:
        """What runs it ("python", "cupy")."""
        ...

    @property
    def device(self) -> DeviceName:
        """Where it computes."""
        ...

    @property
    def operations(self) -> frozenset[Operation]:
        """What it can do; every model can ``predict``."""
        ...

    @property
    def min_image_size(self) -> tuple[int, int]:
        """The smallest (width, height) it reads: a smaller image is refused before it joins a batch."""
        ...

    def warm_up(self) -> None:
        """Run once on a synthetic input (compile kernels, fault in memory); raises when the model is unusable."""
        ...

    def run_batch(
        self, operation: Operation, parameters: ResolvedParameters, images: Sequence[Pixels]
    ) -> Sequence[object]:
        """One output per image, in order (called from a worker thread)."""
        ...

    def fill_response(self, output: object, response: pb.PredictResponse) -> None:
        """Write one output into the response's ``output``."""
        ...

    def fault(self) -> str | None:
        """Why the loaded model cannot compute now (its worker processes no longer start), or None."""
        ...

    def close(self) -> None:
        """Release what the model holds (worker processes, device memory); called once, after its last batch."""
        ...


ModelFactory: TypeAlias = Callable[["ModelConfig", DeviceName], Model]


class StripReaderModel:
    """The lateral-flow strip reader (``strip.reader.StripReader``) behind the model port.

    It declares no request parameters (the reader's thresholds are calibrated, not per request).
    """

    operations: frozenset[Operation] = frozenset({"predict", "precheck"})

    def __init__(self, config: ModelConfig, device: DeviceName) -> None:
        # Imported here: the serving side loads without the reader, and a broken reader fails this model's
        # load (the version is then not ready, with the reason) instead of the whole process.
        from mesh.services.inference.strip.reader import MIN_IMAGE_SIDE, StripReader

        self._reader = StripReader(config=None, device=device)
        self.min_image_size = (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)
        self._device: DeviceName = device
        self._warm_up_shape = tuple(int(v) for v in config.options.get("warm_up_shape", (480, 640, 3)))

    @property
    def platform(self) -> str:
        return "cupy" if self._device == "gpu" else "python"

    @property
    def device(self) -> DeviceName:
        return self._device

    def warm_up(self) -> None:
        image = np.full(self._warm_up_shape, 200, dtype=np.uint8)
        self._reader.read_batch([image])
        self._reader.precheck(image)

    def run_batch(
        self, operation: Operation, parameters: ResolvedParameters, images: Sequence[Pixels]
    ) -> Sequence[object]:
        if operation == "precheck":
            return [self._reader.precheck(image) for image in images]
        return list(self._reader.read_batch(images))

    def fill_response(self, output: object, response: pb.PredictResponse) -> None:
        response.strip_reading.CopyFrom(strip_reading_to_proto(cast(ReadingLike, output)))

    def fault(self) -> str | None:
        """None: in the server's own threads, the reader has nothing that can break after it loaded."""
        return None

    def close(self) -> None:
        """Nothing to release: the reader holds only memory (and CuPy's pool, freed with the process)."""


def default_factories() -> Mapping[str, ModelFactory]:
    """Implementations a model config may name."""
    return {"strip_reader": StripReaderModel}
