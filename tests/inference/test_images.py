"""Decoding model inputs: accepted formats, the pixel limit, orientation, raw pixels and clear errors."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from PIL import Image, ImageOps

from mesh.common.v1 import image_pb2
from mesh.kit.deadlines import deadline_in
from mesh.kit.errors import InvalidArgument, InvalidData, PayloadTooLarge, UnsupportedMediaType, http_status
from mesh.services.inference.images import FileServiceFetcher, ImageDecoder
from tests.file.corpus import png_declaring
from tests.kit.test_orientation import png_with_exif_block

STRIP_PHOTO = (Path(__file__).parents[1] / "data" / "strips" / "hd_positive.jpg").read_bytes()

DECODER = ImageDecoder(max_pixels=200 * 200)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _gradient(mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Image.Image:
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[..., 0] = np.arange(size[0], dtype=np.uint8)[None, :] * 5
    return Image.fromarray(array, "RGB").convert(mode)


@pytest.mark.parametrize(
    ("fmt", "mode", "shape"),
    [
        ("PNG", "RGB", (30, 40, 3)),
        ("PNG", "RGBA", (30, 40, 4)),
        ("PNG", "L", (30, 40)),
        ("PNG", "P", (30, 40, 3)),
        ("JPEG", "RGB", (30, 40, 3)),
        ("WEBP", "RGB", (30, 40, 3)),
    ],
)
def test_accepted_formats_decode_to_the_readers_shapes(fmt: str, mode: str, shape: tuple[int, ...]) -> None:
    """PNG, JPEG and WebP decode to 8-bit grey, RGB or RGBA arrays."""
    pixels = DECODER.decode_encoded(_encode(_gradient(mode), fmt))
    assert pixels.dtype == np.uint8
    assert pixels.shape == shape


def test_pixels_survive_a_lossless_round_trip() -> None:
    """PNG pixels come back exactly, in RGB order."""
    image = _gradient()
    assert np.array_equal(DECODER.decode_encoded(_encode(image, "PNG")), np.asarray(image))


def test_sixteen_bit_grey_keeps_its_top_byte() -> None:
    """A 16-bit PNG becomes 8-bit by its most significant byte."""
    array = np.full((10, 10), 0xABCD, dtype=np.uint16)
    pixels = DECODER.decode_encoded(_encode(Image.fromarray(array), "PNG"))
    assert pixels.dtype == np.uint8
    assert int(pixels[0, 0]) == 0xAB


def test_exif_orientation_is_applied() -> None:
    """A JPEG stored sideways with an EXIF rotation comes out upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(_gradient(size=(40, 30)), "JPEG", exif=exif)
    assert DECODER.decode_encoded(data).shape == (40, 30, 3)


def test_other_formats_are_unsupported_media_type() -> None:
    """A GIF (or anything else) is refused with 415 naming the bytes' field (a declared format that the bytes
    contradict is the predictor's to refuse: see test_servicer's test_a_declared_format_is_checked_by_predict)."""
    with pytest.raises(UnsupportedMediaType) as info:
        DECODER.decode_encoded(_encode(_gradient(), "GIF"))
    assert http_status(info.value) == 415
    assert [v.field for v in info.value.field_violations] == ["input.encoded.data"]


def test_truncated_and_empty_images_are_invalid() -> None:
    """Bytes cut short are InvalidData; no bytes at all are InvalidArgument."""
    data = _encode(_gradient(size=(120, 120)), "PNG")
    with pytest.raises(InvalidData):
        DECODER.decode_encoded(data[: len(data) // 2])
    with pytest.raises(InvalidArgument, match="empty"):
        DECODER.decode_encoded(b"")


@pytest.mark.parametrize("keep", [8, 12, 20], ids=["signature-only", "cut-in-length", "cut-in-header"])
def test_a_png_cut_within_its_header_is_invalid_data_not_another_format(keep: int) -> None:
    """A PNG cut off before Pillow can read its header is still a PNG: 400 InvalidData saying it is truncated
    or damaged (send the whole file), not 415 "not a PNG / JPEG / WEBP image", which told a client to send
    another format."""
    data = _encode(_gradient(size=(120, 120)), "PNG")
    with pytest.raises(InvalidData, match="PNG image is truncated or damaged") as info:
        DECODER.decode_encoded(data[:keep])
    assert http_status(info.value) == 400


def test_unsupported_bytes_are_described() -> None:
    """The 415 for bytes of another kind says what they look like."""
    with pytest.raises(UnsupportedMediaType, match="look like a GIF image"):
        DECODER.decode_encoded(_encode(_gradient(), "GIF"))
    with pytest.raises(UnsupportedMediaType, match="look like text: '<html>"):
        DECODER.decode_encoded(b"<html><body>sign in</body></html>")


def test_images_above_the_pixel_limit_are_refused() -> None:
    """An image above max_pixels is refused (413) before its pixels are decoded."""
    data = _encode(Image.new("L", (300, 300)), "PNG")
    with pytest.raises(PayloadTooLarge) as info:
        DECODER.decode_encoded(data)
    assert http_status(info.value) == 413
    raw = image_pb2.RawImage(pixels=bytes(300 * 300), width=300, height=300, channels=1)
    with pytest.raises(PayloadTooLarge):
        DECODER.decode_raw(raw)


@pytest.mark.parametrize("side", [300, 100_000], ids=["over-our-limit", "over-pillows-limit-too"])
@pytest.mark.parametrize("field", ["input.encoded.data", "input.image_id"])
def test_an_image_over_the_pixel_limit_is_told_its_size_the_limit_and_the_field(
    side: int, field: str
) -> None:
    """Every image over the limit gets the same 413 that says its size and the limit and names the bytes' field.
    One over Pillow's own limit as well (a 100000x100000 header) said "image exceeds the limit of 40000000
    pixels", with neither its size nor a field."""
    data = png_declaring(side, side)
    with pytest.raises(PayloadTooLarge) as info:
        DECODER.decode_encoded(data, field=field)
    assert info.value.message == f"{field} is {side}x{side} = {side * side} pixels; the limit is {200 * 200}"
    assert [v.field for v in info.value.field_violations] == [field]


def test_an_image_cut_off_after_its_header_names_the_field_and_what_to_send() -> None:
    """A PNG whose header reads but whose pixels are cut off said "the PNG image cannot be decoded: image file
    is truncated" (Pillow's words), with no field; now it names the bytes' field and asks for the whole file,
    in the image processing service's words."""
    data = _encode(_gradient(size=(120, 120)), "PNG")
    with pytest.raises(InvalidData) as info:
        DECODER.decode_encoded(data[: len(data) // 2])
    assert info.value.message == (
        "the PNG image cannot be decoded: its data is truncated or damaged; send the whole file"
    )
    assert [v.field for v in info.value.field_violations] == ["input.encoded.data"]


def test_errors_about_inline_bytes_name_input_encoded_data_as_image_processing_does() -> None:
    """The bytes of an inline image are ``input.encoded.data``: inference named an empty or cut-off one
    ``input.encoded`` (the message that holds them), where the image processing service says
    ``input.encoded.data``."""
    data = _encode(_gradient(size=(120, 120)), "PNG")
    for cut in (b"", data[:12]):
        with pytest.raises(InvalidArgument) as info:
            DECODER.decode_encoded(cut)
        assert [v.field for v in info.value.field_violations] == ["input.encoded.data"]


def test_raw_pixels() -> None:
    """Raw grey, RGB, RGBA and 16-bit pixels take the reader's shapes; a wrong size names the field."""
    rgb = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    raw = image_pb2.RawImage(pixels=rgb.tobytes(), width=3, height=4, channels=3)
    decoded = DECODER.decode_raw(raw)
    assert np.array_equal(decoded, rgb)
    assert decoded.flags.writeable
    grey = image_pb2.RawImage(pixels=bytes(12), width=3, height=4, channels=1)
    assert DECODER.decode_raw(grey).shape == (4, 3)
    wide = np.full((2, 2), 0x1234, dtype="<u2")
    sixteen = image_pb2.RawImage(
        pixels=wide.tobytes(), width=2, height=2, channels=1, pixel_type=image_pb2.PIXEL_TYPE_UINT16
    )
    assert int(DECODER.decode_raw(sixteen)[0, 0]) == 0x12
    with pytest.raises(InvalidArgument) as info:
        DECODER.decode_raw(image_pb2.RawImage(pixels=bytes(5), width=3, height=4, channels=1))
    assert info.value.field_violations[0].field == "input.raw.pixels"
    with pytest.raises(InvalidArgument) as info:
        DECODER.decode_raw(image_pb2.RawImage(pixels=bytes(24), width=3, height=4, channels=2))
    assert info.value.field_violations[0].field == "input.raw.channels"


class RecordingFileClient:
    """The one FileClient call the fetcher makes, recording the timeout it was given."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def download(self, image_id: str, *, timeout: float | None = None) -> tuple[object, str, bytes]:
        self.timeouts.append(timeout)
        return object(), "image/png", b"png"


async def test_a_fetch_by_id_is_bounded_by_the_callers_deadline_or_the_rpc_timeout() -> None:
    """A download for a caller with 2 s left gets about 2 s, not the service's 30 s (a download is a stream, which
    the channel gives no deadline: the caller's was not passed on, and the file service saw none); without a
    deadline it gets the RPC timeout."""
    client = RecordingFileClient()
    fetcher = FileServiceFetcher(cast(Any, client), timeout=30.0)
    assert await fetcher.fetch("a", deadline_in(2.0)) == b"png"
    assert await fetcher.fetch("b") == b"png"
    soon, later = client.timeouts
    assert soon == pytest.approx(2.0, abs=0.5)
    assert later == 30.0


def _pillows_pixels(data: bytes) -> np.ndarray[Any, Any]:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(ImageOps.exif_transpose(image))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_jpeg_decodes_to_pillows_very_pixels_turned_as_its_exif_says(mode: str, orientation: int) -> None:
    """JPEGs are decoded by libjpeg-turbo's strict mode (in half Pillow's time, refusing data cut short): the
    pixels are Pillow's to the last bit, turned by the EXIF orientation as Pillow's exif_transpose turns them,
    for colour and grey photos alike."""
    photo = Image.open(io.BytesIO(STRIP_PHOTO)).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=85, exif=exif.tobytes())
    data = buffer.getvalue()
    decoded = ImageDecoder(max_pixels=10_000_000).decode_encoded(data)
    expected = _pillows_pixels(data)
    assert decoded.shape == expected.shape
    assert np.array_equal(decoded, expected)


def test_a_png_is_turned_by_its_header_exif_and_read_upright_with_a_damaged_one() -> None:
    """Pillow's path (PNG) turns by the orientation its header held; a damaged EXIF block reads as upright (it
    was refused as "truncated or damaged", while the pixels are whole) and a late one is not applied, as the
    file service and image processing read them."""
    exif = Image.Exif()
    exif[0x0112] = 6
    assert DECODER.decode_encoded(png_with_exif_block(exif.tobytes())).shape == (6, 4, 3)
    assert DECODER.decode_encoded(png_with_exif_block(b"garbage-not-tiff")).shape == (4, 6, 3)
    late = png_with_exif_block(exif.tobytes(), after_pixels=True)
    assert DECODER.decode_encoded(late).shape == (4, 6, 3)
