"""Decoding and encoding, with limits and the errors for bad inputs."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image as PilImage
from PIL import ImageOps

from mesh.common.v1 import image_pb2
from mesh.kit import errors
from mesh.kit.orientation import ORIENTATION_TAG
from mesh.kit.raw_pixels import read_raw
from mesh.services.image_processing import codec
from tests.image_processing.images import LAYOUTS, noise, smooth

LIMITS = codec.Limits(max_pixels=10_000, max_bytes=200_000)


@pytest.mark.parametrize(("dtype", "channels"), LAYOUTS)
def test_png_and_raw_round_trip_every_layout(dtype: Any, channels: int) -> None:
    """PNG keeps grey/RGB/RGBA at 8 and 16 bits exactly; raw bytes do too."""
    image = noise(12, 17, channels, dtype)
    assert np.array_equal(codec.decode(codec.encode(image, codec.Format.PNG), LIMITS), image)
    sample = image_pb2.PIXEL_TYPE_UINT16 if dtype == np.uint16 else image_pb2.PIXEL_TYPE_UINT8
    message = image_pb2.RawImage(
        pixels=bytes(codec.raw_samples(image)), width=17, height=12, channels=channels, pixel_type=sample
    )
    assert np.array_equal(read_raw(message, max_pixels=LIMITS.max_pixels), image)


@pytest.mark.parametrize("orientation", [6, 3])
def test_an_exif_orientation_is_applied_as_a_viewer_shows_it(orientation: int) -> None:
    """A phone stores a portrait photo sideways with an EXIF orientation: the pixels come back turned, as
    the thumbnail and the strip reader show them (OpenCV alone kept them as stored)."""
    image = noise(12, 17, 3, np.uint8)
    exif = PilImage.Exif()
    exif[ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    PilImage.fromarray(image).save(buffer, format="PNG", exif=exif.tobytes())
    with PilImage.open(io.BytesIO(buffer.getvalue())) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored))
    decoded = codec.decode(buffer.getvalue(), LIMITS)
    assert decoded.shape == ((17, 12, 3) if orientation == 6 else (12, 17, 3))
    assert np.array_equal(decoded, expected)


@pytest.mark.parametrize("fmt", [codec.Format.JPEG, codec.Format.WEBP])
def test_lossy_formats_round_trip_closely(fmt: codec.Format) -> None:
    """JPEG and WebP decode to the same size and roughly the same pixels, in RGB order."""
    image = smooth(32, 48, 3)
    image[:, :, 2] = 0
    decoded = codec.decode(codec.encode(image, fmt, quality=95), LIMITS)
    assert decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image.astype(int)).mean() < 4


def test_unknown_bytes_are_unsupported_media() -> None:
    """Bytes that are no PNG, JPEG or WebP are UNSUPPORTED_MEDIA_TYPE (HTTP 415)."""
    with pytest.raises(errors.UnsupportedMediaType) as caught:
        codec.decode(b"GIF89a....", LIMITS)
    assert errors.http_status(caught.value) == 415


def test_truncated_png_is_invalid_data() -> None:
    """A truncated PNG is INVALID_ARGUMENT with the DATA category."""
    data = codec.encode(noise(20, 20, 3), codec.Format.PNG)
    with pytest.raises(errors.InvalidData) as caught:
        codec.decode(data[:60], LIMITS)
    assert caught.value.code.name == "INVALID_ARGUMENT"
    assert caught.value.field_violations[0].field == "input.encoded.data"


def test_empty_data_is_invalid_argument_the_image_is_empty() -> None:
    """No bytes at all is INVALID_ARGUMENT "the image is empty", as inference says; it was 415 "not an
    image (they start with b'')", which told the client to send another format."""
    with pytest.raises(errors.InvalidArgument) as caught:
        codec.decode(b"", LIMITS)
    assert not isinstance(caught.value, errors.UnsupportedMediaType)
    assert caught.value.message == "the image is empty"
    assert [v.field for v in caught.value.field_violations] == ["input.encoded.data"]


@pytest.mark.parametrize("keep", [8, 12, 20, 30])
def test_a_png_cut_within_its_header_says_so_without_a_python_repr(keep: int) -> None:
    """A PNG cut off before its header can be read is InvalidData saying it is truncated (send the whole
    file), in inference's words; the message quoted Pillow's, which names a ``<_io.BytesIO object at ...>``."""
    data = codec.encode(noise(20, 20, 3), codec.Format.PNG)
    with pytest.raises(errors.InvalidData) as caught:
        codec.decode(data[:keep], LIMITS)
    message = caught.value.message
    assert message.startswith("the PNG image is truncated or damaged: its header cannot be read")
    assert "send the whole file" in message
    assert "<" not in message
    assert "BytesIO" not in message
    assert errors.http_status(caught.value) == 400


def test_the_header_tells_the_decoded_size_before_decoding() -> None:
    """probe reads width, height, channels and sample size from the header alone (a grey-and-alpha PNG
    decodes to RGBA, an EXIF-turned JPEG to its shown size), and they are what decode returns."""
    grey_alpha = io.BytesIO()
    PilImage.fromarray(noise(6, 9, 2)).save(grey_alpha, format="PNG")
    exif = PilImage.Exif()
    exif[ORIENTATION_TAG] = 6
    turned = io.BytesIO()
    PilImage.fromarray(noise(6, 9, 3)).save(turned, format="JPEG", exif=exif.tobytes())
    samples = [
        codec.encode(noise(7, 5, 4, np.uint16), codec.Format.PNG),
        codec.encode(noise(7, 5, 1), codec.Format.PNG),
        codec.encode(noise(7, 5, 3), codec.Format.WEBP),
        grey_alpha.getvalue(),
        turned.getvalue(),
    ]
    for data in samples:
        header = codec.probe(data, LIMITS)
        decoded = codec.decode(data, LIMITS, header=header)
        assert (header.height, header.width, header.channels) == decoded.shape
        assert header.itemsize == decoded.dtype.itemsize
        assert header.nbytes == decoded.nbytes


def test_too_many_pixels_is_refused_before_decoding() -> None:
    """An image over the pixel limit is RESOURCE_EXHAUSTED (HTTP 413), checked from the header."""
    data = codec.encode(np.zeros((200, 200, 1), np.uint8), codec.Format.PNG)
    with pytest.raises(errors.PayloadTooLarge) as caught:
        codec.decode(data, LIMITS)
    assert caught.value.code.name == "RESOURCE_EXHAUSTED"
    assert errors.http_status(caught.value) == 413


def test_a_header_over_pillows_own_limit_is_refused_naming_its_size() -> None:
    """A PNG declaring 20000x20000 pixels (over twice Pillow's own bomb limit, where it refuses to tell the size)
    is refused against the service's limit naming that size; it said "10001x1", a stand-in for it."""
    data = bytearray(codec.encode(noise(1, 1, 3), codec.Format.PNG))
    data[16:24] = struct.pack(">II", 20_000, 20_000)
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))
    with pytest.raises(errors.PayloadTooLarge) as caught:
        codec.probe(bytes(data), LIMITS)
    assert caught.value.message == "input.encoded.data is 20000x20000 = 400000000 pixels; the limit is 10000"


def test_too_many_bytes_is_refused() -> None:
    """Input bytes over the limit are refused."""
    with pytest.raises(errors.PayloadTooLarge):
        codec.decode(b"\x89PNG\r\n\x1a\n" + bytes(300_000), LIMITS)


def test_sixteen_bit_jpeg_output_is_reduced_to_eight() -> None:
    """JPEG output of a 16-bit image carries the high byte."""
    image = np.full((8, 8, 1), 0xAB00, np.uint16)
    decoded = codec.decode(codec.encode(image, codec.Format.JPEG, 100), LIMITS)
    assert decoded.dtype == np.uint8
    assert abs(int(decoded[4, 4, 0]) - 0xAB) <= 1


def test_raw_output_of_untouched_raw_input_is_not_copied() -> None:
    """Raw pixels that come back unchanged are a view of the same bytes object (pixels travel once)."""
    message = image_pb2.RawImage(pixels=bytes(range(256)) * 3, width=16, height=16, channels=3)
    image = read_raw(message, max_pixels=LIMITS.max_pixels)
    data: object = image
    while isinstance(data, np.ndarray):
        data = data.base
    assert isinstance(data, bytes)
    assert data == message.pixels
    view = codec.raw_samples(image)
    # A view of the request's own bytes, not a copy of them.
    assert np.frombuffer(view, np.uint8).ctypes.data == np.frombuffer(data, np.uint8).ctypes.data
    assert view == data
    assert codec.raw_samples(image[:, ::-1]) != data
    assert codec.raw_samples(image[1:]) == data[48:]


@pytest.mark.parametrize(("dtype", "channels"), LAYOUTS)
@pytest.mark.parametrize("fmt", [codec.Format.PNG, codec.Format.JPEG, codec.Format.WEBP])
def test_encoded_channels_are_the_channels_the_bytes_decode_to(
    fmt: codec.Format, dtype: Any, channels: int
) -> None:
    """What a response reports as its channels is what the delivered bytes hold: JPEG drops alpha, and WebP
    has no grey mode, so grey comes back as RGB (it reported 1 for a grey WebP that decodes to 3)."""
    image = noise(6, 5, channels, dtype)
    decoded = codec.decode(codec.encode(image, fmt), LIMITS)
    assert codec.encoded_channels(channels, fmt) == decoded.shape[2]


@pytest.mark.parametrize(
    ("fmt", "limit", "fitting"),
    [
        (codec.Format.WEBP, 16_383, "PNG, JPEG, RAW"),
        (codec.Format.JPEG, 65_500, "PNG, RAW"),
        (codec.Format.PNG, 1_000_000, "RAW"),
    ],
)
def test_an_image_beyond_a_formats_side_limit_is_invalid_argument_before_encoding(
    fmt: codec.Format, limit: int, fitting: str
) -> None:
    """Each format's widest side (WebP 16383, JPEG 65500, libpng's 1000000) is checked before the encoder
    runs, in width and in height: INVALID_ARGUMENT on the given field naming the limit, the size and the
    formats that can hold it. The encoder's failure was INTERNAL (HTTP 500). At the limit it encodes."""
    assert codec.encode(np.zeros((1, limit, 1), np.uint8), fmt)
    for shape in ((1, limit + 1, 1), (limit + 1, 1, 1)):
        height, width = shape[:2]
        with pytest.raises(errors.InvalidArgument) as caught:
            codec.encode(np.zeros(shape, np.uint8), fmt, where="config.output.format")
        assert [v.field for v in caught.value.field_violations] == ["config.output.format"]
        description = caught.value.field_violations[0].description
        assert f"at most {limit} pixels wide and high, this one is {width}x{height}" in description
        assert f"ask for one of {fitting}, or resize it" in description


_SAMPLINGS = {
    "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
    "420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
    "440": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440,
    "411": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411,
}


@pytest.mark.parametrize("sampling", list(_SAMPLINGS))
@pytest.mark.parametrize(("progressive", "restart"), [(False, 0), (True, 0), (False, 2)])
@pytest.mark.parametrize("channels", [3, 1])
def test_a_jpeg_decodes_to_opencvs_pixels(
    sampling: str, progressive: bool, restart: int, channels: int
) -> None:
    """YCbCr and grey JPEGs are decoded by libjpeg-turbo's strict decode, not OpenCV's: the same pixels to the
    last bit, whatever the chroma subsampling, progressive or with restart markers, at odd sizes."""
    image = noise(37, 61, channels, np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, 75, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    params += [cv2.IMWRITE_JPEG_RST_INTERVAL, restart, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, _SAMPLINGS[sampling]]
    ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1] if channels == 3 else image[:, :, 0], params)
    assert ok
    opencv = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    assert opencv is not None
    expected = cv2.cvtColor(opencv, cv2.COLOR_BGR2RGB) if channels == 3 else opencv[:, :, None]
    decoded = codec.decode(encoded.tobytes(), LIMITS)
    assert decoded.shape == (37, 61, channels)
    assert np.array_equal(decoded, expected)


def test_a_jpegs_exif_orientation_is_applied() -> None:
    """A JPEG's EXIF orientation turns its pixels as it does a PNG's."""
    exif = PilImage.Exif()
    exif[ORIENTATION_TAG] = 6
    buffer = io.BytesIO()
    PilImage.fromarray(smooth(12, 17, 3)).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    with PilImage.open(io.BytesIO(buffer.getvalue())) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored))
    assert np.array_equal(codec.decode(buffer.getvalue(), LIMITS), expected)


def test_a_cmyk_jpeg_is_decoded_by_opencv_to_rgb() -> None:
    """A CMYK JPEG, which the strict decoder does not convert, still decodes (OpenCV's colour conversion, after
    the strict check of its image data)."""
    buffer = io.BytesIO()
    PilImage.fromarray(smooth(12, 17, 3)).convert("CMYK").save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    decoded = codec.decode(data, LIMITS)
    assert decoded.shape == (12, 17, 3)
    with pytest.raises(errors.InvalidData, match="truncated or damaged"):
        codec.decode(data[: len(data) // 2] + b"\xff\xd9", LIMITS)
