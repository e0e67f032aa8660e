"""What encoded image bytes are, told from their magic bytes: one answer for every service that takes images.

The file service, the image processing service and the inference service all accept PNG, JPEG and WebP, and
all must tell a client who sent something else what it sent (a GIF, a PDF, HTML from a login page) and a client
whose file is cut off that it is cut off, rather than "not an image".
"""

from __future__ import annotations

from typing import Final, Literal

from mesh.common.v1 import image_pb2
from mesh.kit.errors import FieldViolation, InvalidArgument, InvalidData, UnsupportedMediaType

Format = Literal["PNG", "JPEG", "WEBP"]

_DECLARABLE: Final[dict[int, Format]] = {
    image_pb2.IMAGE_FORMAT_PNG: "PNG",
    image_pb2.IMAGE_FORMAT_JPEG: "JPEG",
    image_pb2.IMAGE_FORMAT_WEBP: "WEBP",
}

CONTENT_TYPES: Final[dict[Format, str]] = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
IMAGE_CONTENT_TYPES: Final = tuple(CONTENT_TYPES.values())
EXTENSIONS: Final[dict[Format, tuple[str, ...]]] = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "WEBP": (".webp",),
}
"""Each format's file name extensions, the usual one first."""


def extension_of(content_type: str) -> str:
    """The usual file name extension of an image content type; empty for another type."""
    for fmt, known in CONTENT_TYPES.items():
        if known == content_type:
            return EXTENSIONS[fmt][0]
    return ""


# Types that declare nothing (the format is detected from the bytes), and aliases that clients send.
_UNDECLARED: Final = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_ALIASES: Final = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE: Final = b"\xff\xd8\xff"


def sniff_format(data: bytes) -> Format | None:
    """The format the magic bytes announce, or None when they are not PNG, JPEG or WebP."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(JPEG_SIGNATURE):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


_OTHER_MAGIC: Final = (
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x00\x00\x01\x00", "an ICO icon"),
)


def describe_bytes(data: bytes) -> str:
    """What unaccepted bytes look like, for error messages."""
    for magic, name in _OTHER_MAGIC:
        if data.startswith(magic):
            return f"they look like {name}"
    if data[4:8] == b"ftyp":
        return f"they look like an ISO media file ({data[8:12].decode('latin-1')!r}, e.g. HEIC or AVIF)"
    head = data[:64]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return f"they look like text: {text[:24]!r}"
    return f"they start with {data[:8]!r}"


ACCEPTED: Final = "PNG, JPEG or WebP"


def not_an_image(data: bytes, field: str | None = None) -> UnsupportedMediaType:
    """The one refusal, in every service, of bytes that are not an image the mesh accepts (HTTP 415), saying
    what they look like; ``field`` names the request field that held them, where there is one."""
    return UnsupportedMediaType(
        f"the bytes are not a {ACCEPTED} image ({describe_bytes(data)}), whatever their name or declared type "
        f"says; send a {ACCEPTED} image",
        field_violations=[FieldViolation(field, f"must be {ACCEPTED} bytes")] if field else (),
        metadata={"accepted": "image/png,image/jpeg,image/webp"},
    )


def empty_image(field: str) -> InvalidArgument:
    """The refusal of an image of no bytes at all (a client that sent nothing, not something else)."""
    return InvalidArgument("the image is empty", field_violations=[FieldViolation(field, "no bytes")])


def unreadable_header(data: bytes, field: str) -> InvalidData | UnsupportedMediaType:
    """Why a decoder could not read an image's header: one that declares no pixels (``no_pixels``), a file of an
    accepted format cut off or damaged (the client should send the whole file again), or bytes of another kind
    (it should send another; ``not_an_image``), each naming ``field``, the bytes' field. Never the decoder's own
    text, which names Python objects."""
    found = sniff_format(data)
    if found is None:
        return not_an_image(data, field)
    size = _declared_png_size(data) if found == "PNG" else None
    if size is not None and 0 in size:
        return no_pixels(found, *size, field)
    return InvalidData(
        f"the {found} image is truncated or damaged: its header cannot be read ({len(data)} bytes); "
        "send the whole file",
        field_violations=[FieldViolation(field, f"a complete {found} file")],
    )


def no_pixels(found: str, width: int, height: int, field: str | None = None) -> InvalidData:
    """The one refusal, in every service, of an image whose header declares a width or height of 0; ``field``
    names the request field that held it, where there is one."""
    return InvalidData(
        f"the {found} declares a size of {width}x{height} pixels; it has no pixels; re-export the image "
        "from its source",
        field_violations=[FieldViolation(field, "at least 1x1 pixels")] if field else (),
    )


def undecodable(found: str, field: str) -> InvalidData:
    """The refusal of an image whose header was read but whose pixels cannot be decoded (cut off after its
    header, or damaged), naming ``field``; never the decoder's own text."""
    return InvalidData(
        f"the {found} image cannot be decoded: its data is truncated or damaged; send the whole file",
        field_violations=[FieldViolation(field, f"a complete {found} file")],
    )


def _declared_png_size(data: bytes) -> tuple[int, int] | None:
    """The width and height in a PNG's IHDR, which a PNG has first, at a fixed place; None when it has none.
    Decoders refuse a size of 0 as an unreadable header, without saying so."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def check_declared_format(declared: image_pb2.ImageFormat.ValueType, data: bytes, field: str) -> None:
    """An ``EncodedImage``'s declared format, when it declares one, must be what its bytes are.

    Unset is fine (the bytes tell); RAW belongs in a ``RawImage``; a number that is no format, or a format the
    bytes contradict, is the client's mistake and is named rather than passed over."""
    if declared == image_pb2.IMAGE_FORMAT_UNSPECIFIED:
        return
    where = f"{field}.format"
    if declared == image_pb2.IMAGE_FORMAT_RAW:
        raise InvalidArgument(
            "format RAW needs a raw image (input.raw), not encoded bytes",
            field_violations=[FieldViolation(where, "use input.raw for raw pixels")],
        )
    expected = _DECLARABLE.get(declared)
    if expected is None:
        raise InvalidArgument(
            f"format {declared} is not an image format; declare PNG, JPEG or WEBP, or leave it unset",
            field_violations=[FieldViolation(where, "not an image format")],
        )
    found = sniff_format(data)
    if found is not None and found != expected:
        raise InvalidArgument(
            f"format says {expected} but the bytes are a {found} image; declare {found} or leave it unset",
            field_violations=[FieldViolation(where, f"the bytes are {found}")],
        )


def normalise_content_type(declared: str) -> str:
    """Lower case, parameters dropped, common aliases resolved; ``""`` when nothing useful was declared."""
    value = declared.split(";", 1)[0].strip().lower()
    value = _ALIASES.get(value, value)
    return "" if value in _UNDECLARED else value


def declared_image_type(declared: str, *, what: str = "Content-Type") -> str:
    """One of IMAGE_CONTENT_TYPES, or ``""`` (detect it from the bytes); UNSUPPORTED_MEDIA_TYPE naming
    ``what`` for any other type."""
    normal = normalise_content_type(declared)
    if normal and normal not in IMAGE_CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"unsupported {what} {declared!r}: send the image as one of {', '.join(IMAGE_CONTENT_TYPES)}, or as"
            " application/octet-stream to have its format detected from the bytes"
        )
    return normal
