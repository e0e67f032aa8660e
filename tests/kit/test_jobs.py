"""mesh.kit.jobs: the model a job names."""

from __future__ import annotations

import pytest

from mesh.kit import errors
from mesh.kit.jobs import ModelReference


@pytest.mark.parametrize(
    ("reference", "expected"),
    [("strip-reader", ("strip-reader", "")), ("strip-reader/2", ("strip-reader", "2"))],
)
def test_a_name_or_a_name_and_version(reference: str, expected: tuple[str, str]) -> None:
    """A bare name asks for the default version; ``name/version`` pins one."""
    assert ModelReference.parse(reference) == expected


@pytest.mark.parametrize("reference", ["", "/2", "strip-reader/", "strip-reader/2/3"])
def test_anything_else_is_refused_on_the_model_field(reference: str) -> None:
    """An empty name or version, or a second slash, is InvalidArgument on ``model`` saying what to send."""
    with pytest.raises(errors.InvalidArgument) as caught:
        ModelReference.parse(reference)
    assert "send a model's name, or name/version" in caught.value.message
    assert [v.field for v in caught.value.field_violations] == ["model"]
