"""Upload validation against a generated corpus of good and bad files."""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from PIL import Image

from mesh.kit import errors
from mesh.kit.image_bytes import sniff_format
from mesh.kit.image_header import read_header
from mesh.kit.orientation import ORIENTATION_TAG
from mesh.services.file.thumbnails import make_thumbnail
from mesh.services.file.validation import (
    DEFAULT_LIMITS,
    Limits,
    UploadSizeGuard,
    validate_image,
)
from tests.file import corpus
from tests.kit.test_orientation import png_with_exif_block


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = value
    return exif.tobytes()


GOOD: dict[str, tuple[Callable[[], bytes], str, int, int]] = {
    # name: (file, format, channels, bit depth)
    "png-grey": (lambda: corpus.png("L"), "PNG", 1, 8),
    "png-grey-alpha": (lambda: corpus.png("LA"), "PNG", 2, 8),
    "png-rgb": (lambda: corpus.png("RGB"), "PNG", 3, 8),
    "png-rgba": (lambda: corpus.png("RGBA"), "PNG", 4, 8),
    "png-palette": (lambda: corpus.png("P"), "PNG", 3, 8),
    "png-grey-16bit": (lambda: corpus.png("I;16"), "PNG", 1, 16),
    "png-rgb-16bit": (corpus.png_16bit_rgb, "PNG", 3, 16),
    "jpeg-grey": (lambda: corpus.jpeg("L"), "JPEG", 1, 8),
    "jpeg-rgb": (lambda: corpus.jpeg("RGB"), "JPEG", 3, 8),
    "webp-rgb": (lambda: corpus.webp("RGB"), "WEBP", 3, 8),
    "webp-rgba": (lambda: corpus.webp("RGBA"), "WEBP", 4, 8),
    "webp-lossless-rgba": (lambda: corpus.webp("RGBA", lossless=True), "WEBP", 4, 8),
    "png-grey-colour-key": (lambda: corpus.png_with_colour_key("L"), "PNG", 2, 8),
    "png-rgb-colour-key": (lambda: corpus.png_with_colour_key("RGB"), "PNG", 4, 8),
    "jpeg-progressive": (lambda: corpus.encode(corpus.pixels("RGB"), "JPEG", progressive=True), "JPEG", 3, 8),
    "jpeg-restart-markers": (
        lambda: corpus.encode(corpus.pixels("RGB"), "JPEG", restart_marker_blocks=2),
        "JPEG",
        3,
        8,
    ),
    "jpeg-cmyk": (lambda: corpus.encode(corpus.pixels("RGB").convert("CMYK"), "JPEG"), "JPEG", 3, 8),
    "jpeg-zero-padding": (lambda: corpus.jpeg() + b"\x00" * 32, "JPEG", 3, 8),
    "jpeg-embedded-thumbnail": (corpus.jpeg_with_embedded_thumbnail, "JPEG", 3, 8),
    # A phone's HDR photo or a camera's MPO: the facts are the first image's.
    "jpeg-multi-picture": (corpus.mpo, "JPEG", 3, 8),
    "jpeg-multi-picture-zero-padding": (lambda: corpus.mpo() + b"\x00" * 16, "JPEG", 3, 8),
    "jpeg-multi-picture-big-endian": (corpus.jpeg_with_gain_map, "JPEG", 3, 8),
    # A phone's portrait photo: stored 64x48 with EXIF orientation 6, shown (and reported) 48x64.
    "jpeg-exif-rotated": (
        lambda: corpus.encode(corpus.pixels("RGB"), "JPEG", exif=_orientation(6)),
        "JPEG",
        3,
        8,
    ),
    "jpeg-exif-mirrored": (
        lambda: corpus.encode(corpus.pixels("RGB"), "JPEG", exif=_orientation(2)),
        "JPEG",
        3,
        8,
    ),
}
SIZES = {"png-rgb-16bit": (32, 16), "jpeg-embedded-thumbnail": (200, 100), "jpeg-exif-rotated": (48, 64)}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_files_are_accepted_with_their_facts(name: str) -> None:
    """Every good file is accepted and reports its real format, size, channels, bit depth and digest."""
    make, fmt, channels, bit_depth = GOOD[name]
    data = make()
    decoded = validate_image(data)
    info = decoded.info
    assert info.format == fmt
    assert info.content_type == {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    assert (info.channels, info.bit_depth) == (channels, bit_depth)
    assert (info.width, info.height) == SIZES.get(name, (64, 48))
    assert info.size_bytes == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()


def test_declared_type_and_digest_that_match_are_accepted() -> None:
    """A correct declared type (with parameters or an alias) and a correct SHA-256 pass."""
    data = corpus.jpeg()
    digest = hashlib.sha256(data).hexdigest()
    info = validate_image(data, declared_content_type="Image/JPG; q=1", declared_sha256=digest.upper()).info
    assert info.sha256 == digest


@dataclass(frozen=True)
class Bad:
    """A bad file and what its rejection must say."""

    make: Callable[[], bytes]
    error: type[errors.MeshError]
    words: tuple[str, ...]
    content_type: str = ""
    sha256: str = ""
    limits: Limits = DEFAULT_LIMITS


def _png() -> bytes:
    return corpus.png("RGB")


def _mpo_with_a_declared_image_that_is_no_jpeg() -> bytes:
    data = corpus.mpo()
    second = data.index(b"\xff\xd8", 2)
    return data[:second] + b"PK" + data[second + 2 :]


BAD: dict[str, Bad] = {
    "zero-bytes": Bad(lambda: b"", errors.InvalidData, ("empty", "0 bytes")),
    "text-named-png": Bad(
        lambda: b"just some text, saved as photo.png\n",
        errors.UnsupportedMediaType,
        ("not a PNG, JPEG or WebP", "look like text", "just some text"),
        content_type="image/png",
    ),
    "gif": Bad(lambda: corpus.encode(corpus.pixels("P"), "GIF"), errors.UnsupportedMediaType, ("GIF image",)),
    "bmp": Bad(
        lambda: corpus.encode(corpus.pixels("RGB"), "BMP"), errors.UnsupportedMediaType, ("BMP image",)
    ),
    "png-truncated-in-data": Bad(
        lambda: _png()[:120], errors.InvalidData, ("truncated", "IDAT", "complete file")
    ),
    "png-truncated-before-iend": Bad(lambda: _png()[:-12], errors.InvalidData, ("truncated", "IEND")),
    "png-truncated-last-byte": Bad(lambda: _png()[:-1], errors.InvalidData, ("truncated",)),
    "jpeg-truncated-in-scan": Bad(
        lambda: corpus.jpeg()[:-300], errors.InvalidData, ("truncated", "end marker")
    ),
    "jpeg-truncated-in-header": Bad(lambda: corpus.jpeg()[:300], errors.InvalidData, ("truncated",)),
    "webp-truncated": Bad(lambda: corpus.webp()[:-40], errors.InvalidData, ("truncated", "declares")),
    "png-wrong-magic": Bad(lambda: b"\x89PNX" + _png()[4:], errors.UnsupportedMediaType, ("not a PNG",)),
    "jpeg-magic-then-garbage": Bad(
        lambda: b"\xff\xd8\xff" + bytes(range(256)),
        errors.InvalidData,
        ("JPEG is corrupted", "invalid marker"),
    ),
    "png-magic-then-html": Bad(
        lambda: b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>",
        errors.InvalidData,
        ("PNG is corrupted", "no valid chunk"),
    ),
    "polyglot-png-zip": Bad(
        lambda: _png() + b"PK\x03\x04" + b"\x00" * 26 + b"evil.sh",
        errors.InvalidData,
        ("extra data after its end", "polyglot"),
    ),
    "polyglot-jpeg-html": Bad(
        lambda: corpus.jpeg() + b"<html><body>hi</body></html>",
        errors.InvalidData,
        ("extra data after its end-of-image", "polyglot"),
    ),
    "polyglot-multi-picture-jpeg-html": Bad(
        lambda: corpus.mpo() + b"<html><body>hi</body></html>",
        errors.InvalidData,
        ("extra data after its end-of-image", "polyglot", "re-save it as a plain image"),
    ),
    "polyglot-multi-picture-declaring-no-jpeg": Bad(
        _mpo_with_a_declared_image_that_is_no_jpeg,
        errors.InvalidData,
        ("extra data after its end-of-image", "polyglot"),
    ),
    "jpeg-multi-picture-truncated": Bad(
        lambda: corpus.mpo()[:-40], errors.InvalidData, ("truncated", "MPF segment", "complete file")
    ),
    "polyglot-webp-trailer": Bad(
        lambda: corpus.webp() + b"#!/bin/sh\n", errors.InvalidData, ("extra data after its declared end",)
    ),
    "png-garbage-inside-idat": Bad(
        corpus.png_with_corrupt_idat, errors.InvalidData, ("could not be decoded", "re-export")
    ),
    "png-bad-crc": Bad(corpus.png_with_bad_crc, errors.InvalidData, ("CRC", "IDAT")),
    "oversize": Bad(
        lambda: corpus.noise_png(40, 40),
        errors.PayloadTooLarge,
        ("over the limit of 1000 bytes", "smaller"),
        limits=Limits(max_bytes=1000),
    ),
    "bomb-30000x30000": Bad(
        lambda: corpus.png_declaring(30000, 30000),
        errors.PayloadTooLarge,
        ("30000x30000", "900.0 megapixels", "limit of 50 megapixels", "decompression bomb"),
    ),
    "over-pixel-limit": Bad(
        lambda: corpus.png("L", 200, 100),
        errors.PayloadTooLarge,
        ("200x100", "downscale"),
        limits=Limits(max_pixels=10_000),
    ),
    "absurd-shape-1x100000": Bad(
        lambda: corpus.png_declaring(1, 100000), errors.InvalidData, ("1x100000", "aspect ratio", "crop")
    ),
    "absurd-shape-wide": Bad(
        lambda: corpus.png("L", 1000, 2), errors.InvalidData, ("1000x2", "500:1", "limit of 100:1")
    ),
    "zero-width": Bad(lambda: corpus.png_declaring(0, 10), errors.InvalidData, ("0x10", "no pixels")),
    "declared-type-mismatch": Bad(
        lambda: corpus.jpeg(),
        errors.InvalidArgument,
        ("'image/png'", "JPEG", "image/jpeg"),
        content_type="image/png",
    ),
    "declared-unsupported-type": Bad(
        lambda: _png(), errors.InvalidArgument, ("'image/gif'", "image/png"), content_type="image/gif"
    ),
    "sha256-mismatch": Bad(
        _png, errors.InvalidData, ("sha256 mismatch", "0" * 64, "send it again"), sha256="0" * 64
    ),
    "sha256-malformed": Bad(_png, errors.InvalidArgument, ("not a SHA-256", "64 hexadecimal"), sha256="abc"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_are_refused_with_a_helpful_message(name: str) -> None:
    """Each bad file raises exactly its error class (and gRPC code), and the message says what is wrong."""
    case = BAD[name]
    with pytest.raises(errors.MeshError) as caught:
        validate_image(
            case.make(),
            declared_content_type=case.content_type,
            declared_sha256=case.sha256,
            limits=case.limits,
        )
    error = caught.value
    assert type(error) is case.error, f"{name}: {error!r}"
    assert error.code == case.error.code
    for word in case.words:
        assert word in error.message, f"{name}: {word!r} not in {error.message!r}"


# The refusals about the declared metadata, which name their own fields (metadata.*), not the bytes'.
_METADATA_CASES = frozenset(
    {"declared-type-mismatch", "declared-unsupported-type", "sha256-mismatch", "sha256-malformed"}
)


@pytest.mark.parametrize("name", sorted(set(BAD) - _METADATA_CASES))
@pytest.mark.parametrize("field", ["data", "chunk"])
def test_a_refusal_of_the_bytes_names_the_field_that_carried_them(name: str, field: str) -> None:
    """An empty file, bytes of another kind (GIF, text), a container cut off or with trailing data, a shape or
    size over the limits: each names the request field that held the bytes (CreateImage's ``data``,
    UploadImage's ``chunk``) in a BadRequest, as the other services name theirs; they carried none."""
    case = BAD[name]
    with pytest.raises(errors.MeshError) as caught:
        validate_image(case.make(), limits=case.limits, field=field)
    assert [v.field for v in caught.value.field_violations] == [field], name


def test_http_statuses_of_the_main_refusals() -> None:
    """Not an image is 415, too large is 413, truncated is 400 (the contract's mapping)."""
    statuses = {}
    for name in ("text-named-png", "oversize", "png-truncated-in-data", "bomb-30000x30000"):
        case = BAD[name]
        with pytest.raises(errors.MeshError) as caught:
            validate_image(case.make(), limits=case.limits)
        statuses[name] = errors.http_status(caught.value)
    assert statuses == {
        "text-named-png": 415,
        "oversize": 413,
        "png-truncated-in-data": 400,
        "bomb-30000x30000": 413,
    }
    assert BAD["oversize"].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bomb_is_refused_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decompression bomb is refused from its header: the decoder is never called."""
    from PIL import Image

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the decoder was reached")

    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(errors.PayloadTooLarge):
        validate_image(corpus.png_declaring(30000, 30000))


def test_size_guard_stops_a_stream_as_soon_as_it_passes_the_limit() -> None:
    """The streaming guard accepts exactly the limit and refuses the first byte beyond it."""
    guard = UploadSizeGuard(100)
    guard.add(60)
    guard.add(40)
    with pytest.raises(errors.PayloadTooLarge, match="more than 100 bytes"):
        guard.add(1)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x89PNG\r\n\x1a\nrest", "PNG"),
        (b"\xff\xd8\xff\xe0", "JPEG"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b"GIF89a", None),
        (b"", None),
    ],
)
def test_magic_bytes(data: bytes, expected: str | None) -> None:
    """Magic bytes name PNG, JPEG and WebP, and nothing else (a RIFF WAVE is not a WebP)."""
    assert sniff_format(data) == expected


def test_an_image_with_a_damaged_exif_block_is_accepted_upright() -> None:
    """A PNG whose eXIf chunk Pillow cannot parse is accepted as stored, and its thumbnail made: the pixels
    are whole (the parse's SyntaxError escaped as INTERNAL, REST 500)."""
    decoded = validate_image(png_with_exif_block(b"garbage-not-tiff"))
    assert (decoded.info.width, decoded.info.height, decoded.orientation) == (6, 4, 1)
    assert (make_thumbnail(decoded).width, make_thumbnail(decoded).height) == (6, 4)


def test_a_late_exif_chunk_turns_neither_the_size_nor_the_thumbnail() -> None:
    """A PNG's eXIf chunk after its pixel data is not what the header held, so the file service reports the
    stored size as the other services' header reader does (it reported the turned one, and turned the
    thumbnail, where image processing did not)."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    data = png_with_exif_block(exif.tobytes(), after_pixels=True)
    decoded = validate_image(data)
    header = read_header(data)
    assert header is not None
    assert (decoded.info.width, decoded.info.height) == header.shown_size == (6, 4)
    assert (make_thumbnail(decoded).width, make_thumbnail(decoded).height) == (6, 4)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _whole_png(depth: int, colour_type: int, scanlines: bytes) -> bytes:
    """A 4x4 PNG whose chunks are all whole and checksummed, with this header and pixel data."""
    header = struct.pack(">IIBBBBB", 4, 4, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(scanlines))
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_whole_png(3, 0, bytes(12)), id="bit-depth-3"),
        pytest.param(_whole_png(8, 2, bytes(10)), id="pixel-data-short-in-a-whole-file"),
    ],
)
def test_a_whole_file_whose_pixels_do_not_decode_is_called_damaged_in_our_words(data: bytes) -> None:
    """A PNG whose every chunk is whole but whose header or pixel data Pillow refuses is damaged: the message
    says so in our words (it quoted Pillow, "cannot identify image file <_io.BytesIO object at 0x...>") and
    does not ask for the file to be sent again (it said "the upload was cut off" of data short inside a
    complete file)."""
    with pytest.raises(errors.InvalidData) as refused:
        validate_image(data, field="data")
    assert refused.value.message == (
        "the PNG could not be decoded: its image data is damaged; re-export the image from its source"
    )
    assert refused.value.metadata == {"problem": "corrupt"}
