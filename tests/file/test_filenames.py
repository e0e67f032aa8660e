"""Filename sanitising."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.kit.image_bytes import Format
from mesh.services.file.validation import MAX_FILENAME_CHARS, sanitise_filename


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("strip.png", "strip.png"),
        ("../../etc/passwd", "passwd.png"),
        ("..\\..\\windows\\system32\\evil.png", "evil.png"),
        ("/abs/path/photo.png", "photo.png"),
        ("", "image.png"),
        ("..", "image.png"),
        ("...", "image.png"),
        ("dir/", "image.png"),
        (".hidden.png", "hidden.png"),
        ("bell\x07and\x00nul\r\n.png", "bellandnul.png"),
        ("right\u202etxt.png", "righttxt.png"),
        ('a<b>c:d"e|f?g*h.png', "a_b_c_d_e_f_g_h.png"),
        ("  spaced   out  .png  ", "spaced out.png"),
        ("noextension", "noextension.png"),
        ("café.png", "café.png"),
    ],
)
def test_examples(raw: str, expected: str) -> None:
    """Path parts, control and bidi characters and reserved characters go; a usable name stays."""
    assert sanitise_filename(raw, "PNG") == expected


@pytest.mark.parametrize(
    ("raw", "fmt", "expected"),
    [
        ("photo.jpg", "PNG", "photo.png"),
        ("photo.JPEG", "JPEG", "photo.JPEG"),
        ("scan.jfif", "JPEG", "scan.jfif"),
        ("picture.gif", "WEBP", "picture.webp"),
        ("\u202egnp.exe", "PNG", "gnp.exe.png"),
        ("report.2024", "JPEG", "report.2024.jpg"),
    ],
)
def test_a_name_gets_the_real_formats_extension(raw: str, fmt: Format, expected: str) -> None:
    """A name whose extension is not the real format's gets the real one: in place of another image format's,
    after anything else (PNG bytes named photo.jpg were stored and downloaded as photo.jpg, and a name ending
    in .exe kept it), so that a saved download opens as what it is."""
    assert sanitise_filename(raw, fmt) == expected


def test_fallback_uses_the_real_format() -> None:
    """An unusable name becomes image.<real extension>."""
    assert sanitise_filename("../", "JPEG") == "image.jpg"
    assert sanitise_filename("", "WEBP") == "image.webp"


def test_long_names_are_capped_and_keep_their_extension() -> None:
    """A very long name is cut to the cap, extension kept."""
    name = sanitise_filename("x" * 5000 + ".jpeg", "JPEG")
    assert len(name) == MAX_FILENAME_CHARS
    assert name.endswith(".jpeg")


@given(st.text(max_size=400))
def test_any_input_gives_a_safe_name(raw: str) -> None:
    """Whatever comes in: non-empty, bounded, no separators, no control characters, no leading dot."""
    name = sanitise_filename(raw, "PNG")
    assert 0 < len(name) <= MAX_FILENAME_CHARS
    assert "/" not in name
    assert "\\" not in name
    assert not name.startswith(".")
    assert name not in (".", "..")
    assert all(ch.isprintable() or ch == " " for ch in name)
