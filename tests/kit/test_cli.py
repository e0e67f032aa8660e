"""mesh.kit.cli: numbers on the command lines."""

from __future__ import annotations

import argparse

import pytest

from mesh.kit.cli import positive_float, positive_int
from mesh.services.inference import evaluate
from mesh.tools import soak, up
from mesh.tools.load import parse_args as load_args


def test_positive_numbers_pass_as_numbers() -> None:
    """A whole number of at least 1, or any finite number above 0, comes back as its value."""
    assert positive_int("3") == 3
    assert positive_float("0.25") == 0.25


@pytest.mark.parametrize("text", ["0", "-2", "1.5", "x"])
def test_positive_int_refuses_everything_else(text: str) -> None:
    """Zero, negatives, fractions and words are refused with what to give instead."""
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
        positive_int(text)


@pytest.mark.parametrize("text", ["0", "-0.5", "inf", "nan", "x"])
def test_positive_float_refuses_everything_else(text: str) -> None:
    """Zero, negatives, infinity, NaN and words are refused with what to give instead."""
    with pytest.raises(argparse.ArgumentTypeError, match="above 0"):
        positive_float(text)


@pytest.mark.parametrize(
    ("parse", "argv", "words"),
    [
        (evaluate.main, ["--count", "0"], "argument --count: 0 is too small"),
        (load_args, ["--duration", "-1"], "argument --duration: -1 is out of range"),
        (soak.parse_args, ["--concurrency", "0"], "argument --concurrency: 0 is too small"),
        (up.main, ["--grace", "0"], "argument --grace: 0 is out of range"),
        (up.main, ["--port-offset", "60000"], "--port-offset 60000 moves ports out of 1-65535; give -8079"),
    ],
)
def test_the_commands_refuse_a_bad_number_as_a_usage_error(
    parse: object, argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each command ends with status 2 and names the option, where `evaluate --count 0` ended in an IndexError
    and `make up --port-offset 60000` started five processes that each refused their ports."""
    assert callable(parse)
    with pytest.raises(SystemExit) as caught:
        parse(argv)
    assert caught.value.code == 2
    assert words in capsys.readouterr().err
