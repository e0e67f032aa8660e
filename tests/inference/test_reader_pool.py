"""Strip readers in worker processes: the readings of the in-process reader, and a clean stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.services.inference.models import StripReaderModel
from mesh.services.inference.reader_pool import ReaderPool
from mesh.services.inference.repository import ModelConfig, ModelRepository
from mesh.services.inference.strip.generator import generate
from mesh.services.inference.strip.reader import StripReader
from tests.inference.fakes import FakeFactory, write_model

IMAGES = [generate(seed).image for seed in range(1_000_000, 1_000_004)]


def _config(**options: object) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "strip-reader",
            "implementation": "strip_reader",
            "inputs": [{"name": "image", "datatype": "image"}],
            "outputs": [{"name": "strip_reading", "datatype": "StripReading"}],
            "options": {"warm_up_shape": [120, 160, 3], **options},
        }
    )


def test_pool_reads_as_the_reader_does() -> None:
    """Two worker processes give every image, in order, the reading the in-process reader gives it, for
    the full read and for the pre-check."""
    reader = StripReader()
    pool = ReaderPool(2, "cpu")
    try:
        assert pool.read(IMAGES) == [reader.read(image) for image in IMAGES]
        assert pool.read(IMAGES[:2], precheck=True) == [reader.precheck(image) for image in IMAGES[:2]]
    finally:
        pool.close()


def test_model_with_worker_processes_reads_batches_in_the_pool() -> None:
    """``worker_processes: 2`` sends a batch to the pool and a lone image to the calling thread; both give
    the reader's readings, and close() stops the workers."""
    model = StripReaderModel(_config(worker_processes=2), "cpu")
    try:
        model.warm_up()
        assert model._pool is not None
        reader = StripReader()
        assert list(model.run_batch("predict", (), IMAGES[:3])) == [reader.read(i) for i in IMAGES[:3]]
        assert list(model.run_batch("precheck", (), IMAGES[:1])) == [reader.precheck(IMAGES[0])]
    finally:
        model.close()
    with pytest.raises(RuntimeError, match="shutdown"):
        model._pool.read(IMAGES[:2])


def test_negative_worker_count_is_a_load_error() -> None:
    """A negative ``worker_processes`` is refused with the option's name."""
    with pytest.raises(ValueError, match="worker_processes must be 0 or more"):
        StripReaderModel(_config(worker_processes=-1), "cpu")


async def test_repository_close_releases_every_model(tmp_path: Path) -> None:
    """Unloading the repository calls each loaded model's close()."""
    write_model(tmp_path, version=1)
    factory = FakeFactory()
    repository = ModelRepository(tmp_path, factories={"fake": factory})
    await repository.load()
    assert [model.closed for model in factory.built] == [False]
    await repository.close()
    assert [model.closed for model in factory.built] == [True]
