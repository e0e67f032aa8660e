"""How errors show a name a client sent (whole when short, cut with an ellipsis when long), and which text
counts as a number."""

from __future__ import annotations

from mesh.kit.text_fields import MAX_SHOWN_CHARS, ascii_digits, shown


def test_a_short_name_is_shown_whole() -> None:
    """A name of up to MAX_SHOWN_CHARS characters is shown as it is."""
    assert shown("sigma") == "sigma"
    assert shown("k" * MAX_SHOWN_CHARS) == "k" * MAX_SHOWN_CHARS


def test_a_long_name_is_cut_with_an_ellipsis() -> None:
    """A name of a million characters is shown as its first 40 and an ellipsis, so the error that echoes it
    stays short; a caller's own limit applies where one is given."""
    assert shown("k" * 1_000_000) == "k" * MAX_SHOWN_CHARS + "…"
    assert shown("abcdef", 3) == "abc…"


def test_only_ascii_digits_count_as_a_number() -> None:
    """ascii_digits passes what int() reads as a plain number and refuses '²' (which isdigit() passes but int()
    refuses), other scripts' digits, signs, spaces and the empty string."""
    for text in ("0", "0042", "1700000000000000"):
        assert ascii_digits(text), text
    for text in ("²", "1²", "١٢", "", "-1", "+1", " 1", "1.0", "1_000"):
        assert not ascii_digits(text), text
