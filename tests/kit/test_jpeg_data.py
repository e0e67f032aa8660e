"""mesh.kit.jpeg_data: a JPEG whose image data ends early, or is damaged, is refused; a whole one passes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mesh.kit.errors import InvalidData
from mesh.kit.jpeg_data import check_jpeg_data

PHOTO = (Path(__file__).parents[1] / "data" / "strips" / "hd_positive.jpg").read_bytes()
EOI = b"\xff\xd9"


def _jpeg(mode: str, **options: object) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=85, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        PHOTO,
        _jpeg("RGB"),
        _jpeg("L"),
        _jpeg("CMYK"),
        _jpeg("RGB", progressive=True),
        PHOTO[:-2] + b"\x00" + EOI,
    ],
    ids=["photo", "rgb", "grey", "cmyk", "progressive", "stray-byte-before-the-end"],
)
def test_a_whole_jpeg_passes(data: bytes) -> None:
    """Whole JPEGs of every colour space and both codings pass, and so does one with a stray byte between
    segments, which cameras write and every decoder skips."""
    check_jpeg_data(data, "data")


@pytest.mark.parametrize("end", [EOI, b""], ids=["end-marker-put-back", "cut"])
def test_a_jpeg_cut_in_its_image_data_is_refused_as_truncated(end: bytes) -> None:
    """Cut at 60 % of its bytes, with or without its end marker put back: Pillow decodes the first with no
    error and grey rows where the rest was; the check names the field and says to send the whole file."""
    with pytest.raises(InvalidData) as info:
        check_jpeg_data(PHOTO[: int(len(PHOTO) * 0.6)] + end, "input.encoded.data")
    assert "truncated or damaged" in info.value.message
    assert "send the whole file" in info.value.message
    assert info.value.field_violations[0].field == "input.encoded.data"


def test_a_jpeg_with_damaged_image_data_is_refused() -> None:
    """Random bytes in the middle of the image data make the decoder lose its way and run out of data before
    the last row, as a cut does: refused alike (Pillow decodes it with no error)."""
    data = bytearray(PHOTO)
    middle = len(data) // 2
    junk = np.random.default_rng(0).integers(0, 255, 400, dtype=np.uint8).tobytes().replace(b"\xff", b"\xfe")
    data[middle : middle + 400] = junk
    with Image.open(io.BytesIO(bytes(data))) as image:
        image.load()  # no error from Pillow
    with pytest.raises(InvalidData) as info:
        check_jpeg_data(bytes(data), "data")
    assert "truncated or damaged" in info.value.message


@pytest.mark.parametrize(
    "data", [b"", b"GIF89a" + bytes(20), PHOTO[:600]], ids=["empty", "gif", "header-cut"]
)
def test_what_has_no_readable_jpeg_header_is_left_to_the_decoder(data: bytes) -> None:
    """Bytes whose header cannot be read are not this check's to word: it passes them, and the callers'
    decoders say what they are (not an image, or a header cut short)."""
    check_jpeg_data(data, "data")
