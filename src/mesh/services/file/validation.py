"""Upload validation: what the bytes really are, whether they are whole, and whether they are too big.

The order matters: cheap checks first (size, emptiness, checksum, magic bytes, declared type), then a walk
of the container (truncation, trailing polyglot data, the declared pixel size, so bombs are refused before
any decoder allocates), and only then a full decode with Pillow restricted to the accepted formats.
Every error says what is wrong and what to do about it.
"""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
from dataclasses import dataclass
from typing import Final

from PIL import Image

from mesh.kit import errors
from mesh.kit.image_bytes import (
    CONTENT_TYPES,
    EXTENSIONS,
    Format,
    no_pixels,
    normalise_content_type,
    not_an_image,
    sniff_format,
)
from mesh.kit.jpeg_data import check_jpeg_data
from mesh.kit.orientation import displayed_size, exif_orientation
from mesh.kit.units import binary_size
from mesh.services.file.blobs import SHA256_HEX
from mesh.services.file.containers import (
    ContainerError,
    ContainerInfo,
    inspect_jpeg,
    inspect_png,
    inspect_webp,
)

FORMATS: Final[tuple[Format, ...]] = ("PNG", "JPEG", "WEBP")
# Extensions a name may carry that say it is some image (of another format, it is replaced by the real one's).
_IMAGE_SUFFIXES: Final = frozenset(
    {ext.removeprefix(".") for exts in EXTENSIONS.values() for ext in exts}
    | {"gif", "bmp", "tif", "tiff", "heic", "heif", "avif", "jxl", "ico", "svg"}
)
MAX_FILENAME_CHARS: Final = 200


@dataclass(frozen=True)
class Limits:
    """What an upload may be."""

    max_bytes: int = 25 * 1024 * 1024
    """Largest file, in bytes."""

    max_pixels: int = 50_000_000
    """Largest width x height."""

    max_aspect_ratio: float = 100.0
    """Largest ratio of the longer side to the shorter one."""


DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True)
class ImageInfo:
    """What an accepted image is."""

    format: Format
    content_type: str
    width: int
    height: int
    channels: int
    bit_depth: int
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class DecodedImage:
    """An accepted image: its facts and its decoded pixels (for the thumbnail)."""

    info: ImageInfo
    image: Image.Image
    orientation: int
    """The EXIF orientation its header held (``kit.orientation``), which ``info``'s width and height follow."""


class UploadSizeGuard:
    """Counts the bytes of a streamed upload and stops it as soon as it passes the limit."""

    def __init__(self, max_bytes: int, field: str | None = None) -> None:
        self.max_bytes = max_bytes
        self.field = field
        self.received = 0

    def add(self, count: int) -> None:
        """Account for ``count`` more bytes; raises PayloadTooLarge (naming ``field``) once over the limit."""
        self.received += count
        if self.received > self.max_bytes:
            raise too_large(self.received, self.max_bytes, complete=False, field=self.field)


def too_large(
    size: int, max_bytes: int, *, complete: bool = True, field: str | None = None
) -> errors.PayloadTooLarge:
    """The error for an upload over the size limit (naming ``field``, the bytes' field, when given)."""
    amount = f"{size} bytes" if complete else f"more than {max_bytes} bytes (stopped after {size})"
    return errors.PayloadTooLarge(
        f"the upload is {amount}, over the limit of {max_bytes} bytes ({binary_size(max_bytes)}); "
        "send a smaller or more compressed image",
        field_violations=_on(field, f"at most {max_bytes} bytes"),
        metadata={"limit_bytes": str(max_bytes)},
    )


def _on(field: str | None, description: str) -> list[errors.FieldViolation]:
    """The violation of the bytes' field, where the caller named one."""
    return [errors.FieldViolation(field, description)] if field else []


def check_sha256_syntax(value: str) -> str:
    """The declared SHA-256 in lower case; InvalidArgument unless it is 64 hex digits (or empty)."""
    normal = value.strip().lower()
    if normal and not SHA256_HEX.fullmatch(normal):
        raise errors.InvalidArgument(
            f"sha256 {value[:80]!r} is not a SHA-256 digest; send 64 hexadecimal digits or leave it empty",
            field_violations=[errors.FieldViolation("metadata.sha256", "must be 64 hexadecimal digits")],
        )
    return normal


def validate_image(
    data: bytes,
    *,
    declared_content_type: str = "",
    declared_sha256: str = "",
    limits: Limits = DEFAULT_LIMITS,
    field: str | None = None,
) -> DecodedImage:
    """Accept ``data`` as a PNG, JPEG or WebP image or raise the MeshError that says why not; an error about the
    bytes themselves names ``field``, the request field that carried them (CreateImage's ``data``, UploadImage's
    ``chunk``), when given."""
    size = len(data)
    if size > limits.max_bytes:
        raise too_large(size, limits.max_bytes, field=field)
    if size == 0:
        raise errors.InvalidData(
            "the file is empty (0 bytes); send the image's bytes", field_violations=_on(field, "no bytes")
        )
    expected_sha = check_sha256_syntax(declared_sha256)
    sha256 = hashlib.sha256(data).hexdigest()
    if expected_sha and expected_sha != sha256:
        raise errors.InvalidData(
            f"sha256 mismatch: declared {expected_sha} but the {size} bytes received hash to {sha256}; "
            "the upload was corrupted or the checksum is of another file, send it again",
            field_violations=[errors.FieldViolation("metadata.sha256", "does not match the bytes received")],
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise not_an_image(data, field)
    real_type = CONTENT_TYPES[fmt]
    declared = normalise_content_type(declared_content_type)
    if declared and declared != real_type:
        raise errors.InvalidArgument(
            f"declared content type {declared!r} does not match the bytes, which are a {fmt} image "
            f"({real_type}); declare {real_type} or leave the type empty",
            field_violations=[errors.FieldViolation("metadata.content_type", f"the bytes are {real_type}")],
        )
    container = _inspect_container(fmt, data, field)
    _check_shape(fmt, container, limits, field)
    if fmt == "JPEG":  # Pillow decodes image data cut short (its end marker put back) with no error
        check_jpeg_data(data, field)
    image, orientation = _decode(fmt, data, field)
    if image.size != (container.width, container.height):
        raise errors.InvalidData(
            f"the {fmt} is corrupted: its header says {container.width}x{container.height} but it decodes "
            f"as {image.width}x{image.height}; re-export the image",
            field_violations=_on(field, f"a {fmt} whose pixels match its header"),
        )
    channels, bit_depth = _channels_and_depth(image, container)
    width, height = displayed_size(image.width, image.height, orientation)
    info = ImageInfo(fmt, real_type, width, height, channels, bit_depth, size, sha256)
    return DecodedImage(info, image, orientation)


# What the bytes' field must hold instead, by the container's problem.
_CONTAINER_VIOLATIONS: Final[dict[str, str]] = {
    "truncated": "the complete {fmt} file",
    "trailing": "a {fmt} with nothing after its end",
    "corrupt": "an undamaged {fmt} file",
}


def _inspect_container(fmt: Format, data: bytes, field: str | None) -> ContainerInfo:
    inspect = {"PNG": inspect_png, "JPEG": inspect_jpeg, "WEBP": inspect_webp}[fmt]
    try:
        return inspect(data)
    except ContainerError as error:
        advice = {
            "truncated": "the upload was cut off; send the complete file",
            "trailing": "the file carries other data after the image (a polyglot or a corrupted file); "
            "re-save it as a plain image",
            "corrupt": "re-export the image from its source",
        }[error.problem]
        raise errors.InvalidData(
            f"{error}; {advice}",
            field_violations=_on(field, _CONTAINER_VIOLATIONS[error.problem].format(fmt=fmt)),
            metadata={"problem": error.problem},
        ) from None


def _check_shape(fmt: Format, container: ContainerInfo, limits: Limits, field: str | None) -> None:
    width, height = container.width, container.height
    if width == 0 or height == 0:
        raise no_pixels(fmt, width, height, field)
    pixels = width * height
    if pixels > limits.max_pixels:
        # Refused from the header alone: a decompression bomb never reaches the decoder.
        raise errors.PayloadTooLarge(
            f"the {fmt} is {width}x{height} = {pixels / 1e6:.1f} megapixels, over the limit of "
            f"{limits.max_pixels / 1e6:g} megapixels (a decompression bomb, or simply too large); "
            "downscale the image before uploading",
            field_violations=_on(field, f"at most {limits.max_pixels} pixels"),
            metadata={"limit_pixels": str(limits.max_pixels)},
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise errors.InvalidData(
            f"the {fmt} is {width}x{height} pixels, an aspect ratio of {ratio:g}:1, over the limit of "
            f"{limits.max_aspect_ratio:g}:1; crop it to the region of interest",
            field_violations=_on(field, f"an aspect ratio of at most {limits.max_aspect_ratio:g}:1"),
            metadata={"limit_aspect_ratio": f"{limits.max_aspect_ratio:g}"},
        )
    if container.animated:
        raise errors.InvalidData(
            f"the {fmt} is animated; upload a single still image",
            field_violations=_on(field, "a single still image"),
        )


def _decode(fmt: Format, data: bytes, field: str | None) -> tuple[Image.Image, int]:
    """The decoded image and the EXIF orientation its header held (read before the pixels: a late eXIf
    chunk, which loading the pixels reveals, is not what the other services read)."""
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
        orientation = exif_orientation(image)
        image.load()
    except Image.DecompressionBombError as error:  # only when max_pixels is set above Pillow's own limit
        raise errors.PayloadTooLarge(
            f"the {fmt} is too large to decode safely: {error}",
            field_violations=_on(field, "fewer pixels"),
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        # The container walk found the file whole, so what stops the decoder lies inside its image data. Its
        # own text names Python objects ("cannot identify image file <_io.BytesIO ...>"), or says "truncated"
        # of data that is short inside a complete file, which no resend mends.
        raise errors.InvalidData(
            f"the {fmt} could not be decoded: its image data is damaged; re-export the image from its source",
            field_violations=_on(field, _CONTAINER_VIOLATIONS["corrupt"].format(fmt=fmt)),
            metadata={"problem": "corrupt"},
        ) from None
    return image, orientation


def _channels_and_depth(image: Image.Image, container: ContainerInfo) -> tuple[int, int]:
    """Channels and bits per sample; the PNG header knows 16-bit colour that Pillow reduces to 8 bits."""
    if container.channels is not None and container.bit_depth is not None and image.format == "PNG":
        return container.channels, container.bit_depth
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        return 1, 16
    if mode == "P":
        return (4 if "transparency" in image.info else 3), 8
    if mode in ("1", "L"):
        return 1, 8
    if mode in ("LA", "La"):
        return 2, 8
    if mode == "CMYK":  # print-oriented JPEGs; every consumer decodes them to RGB
        return 3, 8
    return len(image.getbands()), 8


def sanitise_filename(name: str, fmt: Format) -> str:
    """A safe display name: the base name only, no control or path characters, bounded length.

    Falls back to ``image`` plus the real format's extension when nothing usable is left; a name whose
    extension is not one of the real format's gets the real one, in place of another image format's (PNG
    bytes named ``photo.jpg`` are ``photo.png``) and added to any other (``notes.exe`` is ``notes.exe.png``),
    so that a saved download opens as what it is.
    """
    text = unicodedata.normalize("NFC", name)
    text = text.replace("\\", "/").rsplit("/", 1)[-1]
    # Whitespace of any kind becomes one space below; every other unprintable character goes.
    text = "".join(ch for ch in text if ch.isprintable() or ch.isspace())
    text = re.sub(r'[<>:"|?*]', "_", text)
    text = re.sub(r"\s+", " ", text).strip().lstrip(".").strip()
    extension = EXTENSIONS[fmt][0]
    if not text or set(text) <= {".", " "}:
        return f"image{extension}"
    stem, dot, suffix = text.rpartition(".")
    if not dot or not stem:
        stem, suffix = text, extension.removeprefix(".")
    elif f".{suffix.lower()}" not in EXTENSIONS[fmt]:
        stem = stem if suffix.lower() in _IMAGE_SUFFIXES else text
        suffix = extension.removeprefix(".")
    stem = stem[: MAX_FILENAME_CHARS - len(suffix) - 1].rstrip()
    return f"{stem}.{suffix}"
