"""mesh.kit.raw_pixels: one reading of RawImage for the image and inference services."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.common.v1 import image_pb2
from mesh.kit import errors
from mesh.kit.raw_pixels import read_raw


def test_samples_take_height_width_channels_in_8_and_16_bit() -> None:
    """RGB bytes come back as (height, width, 3) viewing the message's bytes; 16-bit samples are read
    little-endian into native uint16; grey keeps a channel axis of 1."""
    rgb = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    read = read_raw(image_pb2.RawImage(pixels=rgb.tobytes(), width=3, height=4, channels=3), max_pixels=100)
    assert np.array_equal(read, rgb)
    assert not read.flags.writeable
    wide = np.array([[0x1234, 0xABCD]], dtype="<u2")
    sixteen = image_pb2.RawImage(
        pixels=wide.tobytes(), width=2, height=1, channels=1, pixel_type=image_pb2.PIXEL_TYPE_UINT16
    )
    read16 = read_raw(sixteen, max_pixels=100)
    assert read16.dtype == np.uint16
    assert read16.shape == (1, 2, 1)
    assert [int(v) for v in read16.ravel()] == [0x1234, 0xABCD]


def test_every_problem_of_the_shape_is_told_at_once() -> None:
    """Bad channels, an empty size and an unknown pixel type are one InvalidData naming all three fields; an
    unknown pixel type is never read as 8-bit."""
    bad = image_pb2.RawImage(pixels=bytes(8), width=0, height=4, channels=2, pixel_type=99)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidData) as info:
        read_raw(bad, max_pixels=100, field="input.raw")
    assert [v.field for v in info.value.field_violations] == [
        "input.raw.channels",
        "input.raw.width",
        "input.raw.pixel_type",
    ]
    assert "channels is 2" in info.value.message
    assert "the size is 0x4" in info.value.message
    assert "pixel_type is 99" in info.value.message
    assert errors.http_status(info.value) == 400


def test_too_many_pixels_or_bytes_is_payload_too_large_and_a_wrong_length_invalid_data() -> None:
    """Width x height over the limit is 413 before the bytes are counted; bytes over ``max_bytes`` are 413;
    a byte count that does not fit the shape is InvalidData naming ``pixels``."""
    huge = image_pb2.RawImage(pixels=bytes(3), width=2**31, height=2**31, channels=3)
    with pytest.raises(errors.PayloadTooLarge) as big:
        read_raw(huge, max_pixels=100)
    assert errors.http_status(big.value) == 413
    fits = image_pb2.RawImage(pixels=bytes(300), width=10, height=10, channels=3)
    with pytest.raises(errors.PayloadTooLarge):
        read_raw(fits, max_pixels=100, max_bytes=299)
    short = image_pb2.RawImage(pixels=bytes(299), width=10, height=10, channels=3)
    with pytest.raises(errors.InvalidData) as wrong:
        read_raw(short, max_pixels=100)
    assert wrong.value.field_violations[0].field == "input.raw.pixels"
    assert "needs 300 bytes, got 299" in wrong.value.message
