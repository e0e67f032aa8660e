"""What encoded image bytes are, told from their magic bytes: one answer for every service that takes images.

The file service, the image processing service and the inference service all accept PNG, JPEG and WebP, and
all must tell a client who sent something else what it sent (a GIF, a PDF, HTML from a login page) and a client
whose file is cut off that it is cut off, rather than "not an image".
"""

from __future__ import annotations

from typing import Final, Literal

Format = Literal["PNG", "JPEG", "WEBP"]

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
