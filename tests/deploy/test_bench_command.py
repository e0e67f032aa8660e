"""``python -m bench``: which benchmarks run."""

from __future__ import annotations

import pytest

from bench.__main__ import main


def test_an_unknown_benchmark_is_named_with_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    """A name that is no benchmark ends with status 2 listing the benchmarks, before any runs (it was a
    ModuleNotFoundError traceback, after the benchmarks named before it had run)."""
    assert main(["image", "imgae"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark imgae; the benchmarks are " in err
    assert "image, inference" in err
