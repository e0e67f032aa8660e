"""mesh.kit.image_bytes: one refusal of bytes that are not an accepted image, whichever service gets them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mesh.kit import errors
from mesh.kit.image_bytes import declared_image_type, no_pixels, normalise_content_type, not_an_image
from mesh.services.file.validation import validate_image
from mesh.services.image_processing import codec
from mesh.services.inference.images import ImageDecoder
from tests.file import corpus

NOT_IMAGES = {
    "gif": b"GIF89a\x01\x00\x01\x00\x00\x00\x00",
    "html": b"<!doctype html><title>Sign in</title>",
    "zeros": bytes(64),
}


@pytest.mark.parametrize("data", NOT_IMAGES.values(), ids=NOT_IMAGES.keys())
def test_every_service_refuses_a_non_image_in_the_same_words(data: bytes) -> None:
    """The file service, image processing and inference said it three ways ("the image is not PNG, JPEG or
    WebP", "not a PNG / JPEG / WEBP image", ...) and named the field two ways; now one message, 415, and the
    bytes field itself (input.encoded.data) where a request has one."""
    refusals: list[errors.MeshError] = []
    for refuse in (
        lambda: validate_image(data),
        lambda: codec.decode(data, codec.Limits(), "input.encoded.data"),
        lambda: ImageDecoder(max_pixels=1_000_000).decode_encoded(data, field="input.encoded.data"),
    ):
        with pytest.raises(errors.UnsupportedMediaType) as caught:
            refuse()
        refusals.append(caught.value)
    expected = not_an_image(data)
    assert {error.message for error in refusals} == {expected.message}
    assert all(errors.http_status(error) == 415 for error in refusals)
    assert [[v.field for v in error.field_violations] for error in refusals] == [
        [],
        ["input.encoded.data"],
        ["input.encoded.data"],
    ]
    assert expected.message.startswith("the bytes are not a PNG, JPEG or WebP image (they ")


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ("", ""),
        ("application/octet-stream", ""),
        ("IMAGE/PNG", "image/png"),
        ("image/jpg", "image/jpeg"),
        ("image/webp; charset=binary", "image/webp"),
        ("binary/octet-stream", ""),
        ("image/pjpeg", "image/jpeg"),
        ("image/x-png", "image/png"),
    ],
)
def test_declared_content_types_are_normalised(declared: str, expected: str) -> None:
    """Case, parameters and aliases do not cause false mismatches; octet-stream means undeclared."""
    assert normalise_content_type(declared) == expected


@pytest.mark.parametrize("declared", ["text/plain", "image/gif", "application/json"])
def test_a_type_that_is_no_image_we_take_is_unsupported_media_type(declared: str) -> None:
    """Every service that takes a typed body refuses the same types, naming what to send instead."""
    with pytest.raises(errors.UnsupportedMediaType, match="application/octet-stream"):
        declared_image_type(declared)


@pytest.mark.parametrize("keep", [0, 12], ids=["empty", "cut-in-header"])
def test_image_processing_and_inference_say_the_same_of_empty_and_cut_off_images(keep: int) -> None:
    """No bytes: "the image is empty" (INVALID_ARGUMENT) in both services; a PNG cut within its header: the
    same "truncated or damaged ... send the whole file" (image processing said 415 for the one and quoted a
    Python repr for the other)."""
    data = codec.encode(np.zeros((20, 20, 3), np.uint8), codec.Format.PNG)[:keep]
    refusals: list[errors.MeshError] = []
    for refuse in (
        lambda: codec.decode(data, codec.Limits(), "input.encoded.data"),
        lambda: ImageDecoder(max_pixels=1_000_000).decode_encoded(data, field="input.encoded.data"),
    ):
        with pytest.raises(errors.InvalidArgument) as caught:
            refuse()
        refusals.append(caught.value)
    assert len({error.message for error in refusals}) == 1
    assert all(errors.http_status(error) == 400 for error in refusals)


def _refusals_of_the_three_services(data: bytes) -> list[errors.InvalidData]:
    """What the file service's upload check, image processing's decoder and inference's decoder refuse
    ``data`` with, each naming the bytes' field ``input.encoded.data`` (each must refuse it: InvalidData)."""
    refusals: list[errors.InvalidData] = []
    for refuse in (
        lambda: validate_image(data, field="input.encoded.data"),
        lambda: codec.decode(data, codec.Limits(), "input.encoded.data"),
        lambda: ImageDecoder(max_pixels=10_000_000).decode_encoded(data, field="input.encoded.data"),
    ):
        with pytest.raises(errors.InvalidData) as caught:
            refuse()
        refusals.append(caught.value)
    return refusals


@pytest.mark.parametrize(("width", "height"), [(0, 0), (0, 10), (10, 0)])
def test_every_service_refuses_a_png_declaring_no_pixels_in_the_same_words(width: int, height: int) -> None:
    """A whole PNG whose header declares a width or height of 0: image processing and inference said "truncated
    or damaged: its header cannot be read ... send the whole file" (their decoders refuse the size as an
    unreadable header), the file service that it has no pixels; now all three say the file service's words,
    INVALID_ARGUMENT naming the bytes' field."""
    data = corpus.png_declaring(width, height)
    refusals = _refusals_of_the_three_services(data)
    assert {error.message for error in refusals} == {no_pixels("PNG", width, height).message}
    assert refusals[0].message.startswith(
        f"the PNG declares a size of {width}x{height} pixels; it has no pixels"
    )
    assert [[v.field for v in error.field_violations] for error in refusals] == [["input.encoded.data"]] * 3


@pytest.mark.parametrize("damage", ["cut-end-marker-put-back", "random-bytes-inside"])
def test_every_service_refuses_a_jpeg_whose_image_data_is_cut_or_damaged(damage: str) -> None:
    """A photo cut at 60 % of its bytes with its end marker put back, or with bytes overwritten inside its
    image data: Pillow and OpenCV decode both with no error and grey rows, and the file service stored it, the
    image service processed it, the strip reader read it INVALID with confidence 0.9. All three refuse it now,
    in the same words, naming the bytes' field."""
    photo = (Path(__file__).parents[1] / "data" / "strips" / "hd_positive.jpg").read_bytes()
    if damage == "cut-end-marker-put-back":
        data = photo[: int(len(photo) * 0.6)] + b"\xff\xd9"
    else:
        junk = (
            np.random.default_rng(0).integers(0, 255, 400, dtype=np.uint8).tobytes().replace(b"\xff", b"\xfe")
        )
        middle = len(photo) // 2
        data = photo[:middle] + junk + photo[middle + 400 :]
    refusals = _refusals_of_the_three_services(data)
    assert len({error.message for error in refusals}) == 1
    assert refusals[0].message.startswith("the JPEG image is truncated or damaged")
    assert [[v.field for v in error.field_violations] for error in refusals] == [["input.encoded.data"]] * 3
