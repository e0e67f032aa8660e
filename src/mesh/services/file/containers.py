"""Structural checks of PNG, JPEG and WebP containers, done on the raw bytes before any decoder runs.

Pillow decodes happily past the end of an image: bytes appended after a PNG's IEND or a JPEG's EOI (the
classic polyglot) are ignored, and a cut-off file can fail with a vague message. Walking the container
first gives precise answers (truncated, trailing data, corrupted chunk) and the declared pixel size, so
that decompression bombs are refused before a decoder allocates anything.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from dataclasses import dataclass
from typing import Literal

from mesh.kit.image_bytes import PNG_SIGNATURE

Problem = Literal["truncated", "trailing", "corrupt"]


# PNG colour type -> channels (palette images are reported as RGB, or RGBA with a tRNS chunk).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic variants).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_SOI = b"\xff\xd8"
# A multi-picture JPEG (CIPA DC-007: cameras' MPO, HDR gain maps of phones) declares its further images in an
# APP2 segment that opens with this identifier; they follow the first image's end-of-image marker.
_MPF_IDENTIFIER = b"MPF\x00"
_MPF_ENTRIES = 0xB002  # the MP Index IFD's MP Entry tag: 16 bytes an image (attribute, size, offset, links)


class ContainerError(Exception):
    """The container is damaged; ``problem`` says how and the message says where."""

    def __init__(self, problem: Problem, message: str) -> None:
        super().__init__(message)
        self.problem: Problem = problem


@dataclass(frozen=True)
class ContainerInfo:
    """What the container's headers declare, before decoding."""

    width: int
    height: int
    channels: int | None = None
    bit_depth: int | None = None
    animated: bool = False


def inspect_png(data: bytes) -> ContainerInfo:
    """Walk every chunk: CRCs, IHDR first, nothing after IEND."""
    pos = len(PNG_SIGNATURE)
    size = len(data)
    info: ContainerInfo | None = None
    has_alpha_chunk = False
    animated = False
    while True:
        if pos + 8 > size:
            raise ContainerError(
                "truncated", f"the PNG is truncated: it ends at byte {size} before its IEND chunk"
            )
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if not kind.isalpha():
            raise ContainerError("corrupt", f"the PNG is corrupted: no valid chunk at byte {pos}")
        name = kind.decode("ascii")
        end = pos + 12 + length
        if end > size:
            raise ContainerError(
                "truncated",
                f"the PNG is truncated: chunk {name} at byte {pos} runs to byte {end} "
                f"but the file ends at byte {size}",
            )
        expected = int.from_bytes(data[end - 4 : end], "big")
        if zlib.crc32(data[pos + 4 : end - 4]) != expected:
            raise ContainerError(
                "corrupt", f"the PNG is corrupted: chunk {name} at byte {pos} fails its CRC check"
            )
        if info is None:
            if name != "IHDR" or length != 13:
                raise ContainerError("corrupt", "the PNG is corrupted: its first chunk is not IHDR")
            width, height, depth, colour = struct.unpack(">IIBB", data[pos + 8 : pos + 18])
            if colour not in _PNG_CHANNELS:
                raise ContainerError("corrupt", f"the PNG is corrupted: unknown colour type {colour}")
            info = ContainerInfo(width, height, _PNG_CHANNELS[colour], 16 if depth == 16 else 8)
        elif name == "tRNS":
            has_alpha_chunk = True
        elif name == "acTL":
            animated = True
        elif name == "IEND":
            extra = size - end
            if extra:
                raise ContainerError(
                    "trailing", f"the PNG has {extra} bytes of extra data after its end (IEND chunk)"
                )
            break
        pos = end
    channels = info.channels
    if has_alpha_chunk and channels in (1, 3):
        channels = 2 if channels == 1 else 4
    return ContainerInfo(info.width, info.height, channels, info.bit_depth, animated)


def inspect_jpeg(data: bytes) -> ContainerInfo:
    """Walk the marker segments and entropy-coded scans up to EOI; nothing but padding may follow, except
    the further images of a multi-picture file (MPF) that the first image declares."""
    frame, end, declared = _walk_jpeg(data)
    trailing = data[end:]
    if trailing.strip(b"\x00") and not _holds_declared_images(data, end, declared):
        raise ContainerError(
            "trailing", f"the JPEG has {len(trailing)} bytes of extra data after its end-of-image marker"
        )
    return frame


def _walk_jpeg(data: bytes) -> tuple[ContainerInfo, int, list[int]]:
    """The frame of the JPEG at the start of ``data``, the offset after its EOI marker, and the offsets of the
    further images its MPF segment declares."""
    size = len(data)
    pos = 2
    frame: ContainerInfo | None = None
    declared: list[int] = []
    while True:
        if pos >= size:
            raise ContainerError(
                "truncated", f"the JPEG is truncated: it ends at byte {size} before its end-of-image marker"
            )
        if data[pos] != 0xFF:
            raise ContainerError("corrupt", f"the JPEG is corrupted: no marker at byte {pos}")
        while pos < size and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= size:
            raise ContainerError("truncated", "the JPEG is truncated: it ends inside a marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        if marker < 0xC0:
            raise ContainerError(
                "corrupt", f"the JPEG is corrupted: invalid marker 0x{marker:02X} at byte {pos - 1}"
            )
        if pos + 2 > size:
            raise ContainerError("truncated", f"the JPEG is truncated: it ends inside segment 0x{marker:02X}")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            raise ContainerError(
                "corrupt", f"the JPEG is corrupted: segment at byte {pos} has length {length}"
            )
        if pos + length > size:
            raise ContainerError(
                "truncated",
                f"the JPEG is truncated: segment 0x{marker:02X} at byte {pos} needs {length} bytes "
                f"but the file ends at byte {size}",
            )
        if marker in _JPEG_SOF and frame is None and length >= 8:
            precision, height, width, components = struct.unpack(">BHHB", data[pos + 2 : pos + 8])
            frame = ContainerInfo(width, height, components, 16 if precision > 8 else 8)
        if marker == 0xE2 and not declared and data[pos + 2 : pos + 6] == _MPF_IDENTIFIER:
            declared = _mpf_images(data, pos + 6, pos + length)
        pos += length
        if marker == 0xDA:
            pos = _skip_entropy_coded(data, pos)
    if frame is None:
        raise ContainerError("corrupt", "the JPEG is corrupted: it has no frame header (SOF)")
    return frame, pos, declared


def _mpf_images(data: bytes, header: int, end: int) -> list[int]:
    """Where in ``data`` the images that an MPF segment's MP Index IFD lists after the first one start
    (CIPA DC-007: offsets count from the segment's byte-order mark at ``header``); none when the segment lists
    none or cannot be read. Their sizes are not used: some writers get them wrong (Pillow, from a third image on).
    """
    segment = data[header:end]
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(segment[:4])
    if order is None:
        return []
    try:
        (ifd,) = struct.unpack_from(order + "I", segment, 4)
        (count,) = struct.unpack_from(order + "H", segment, ifd)
        for index in range(count):
            tag, _, length, offset = struct.unpack_from(order + "HHII", segment, ifd + 2 + 12 * index)
            if tag == _MPF_ENTRIES:
                starts = [
                    struct.unpack_from(order + "8xI4x", segment, offset + 16 * number)[0]
                    for number in range(length // 16)
                ]
                return [header + start for start in starts if start != 0]
    except struct.error:
        return []
    return []


def _holds_declared_images(data: bytes, end: int, starts: list[int]) -> bool:
    """Whether everything after ``end`` is the declared images, each a whole JPEG, with zero padding only;
    ContainerError when the last one is cut off."""
    position = end
    for start, following in itertools.pairwise([*sorted(set(starts)), len(data)]):
        if start < position or data[position:start].strip(b"\x00"):
            return False
        image = data[start:following]
        if image[:2] != _JPEG_SOI:
            return False
        try:
            _, image_end, _ = _walk_jpeg(image)
        except ContainerError as error:
            if error.problem == "truncated" and following == len(data):
                raise ContainerError(
                    "truncated",
                    f"the JPEG is truncated: the image at byte {start} that its MPF segment declares ends at "
                    f"byte {len(data)} before its end-of-image marker",
                ) from None
            return False
        position = start + image_end
    return not data[position:].strip(b"\x00")


def _skip_entropy_coded(data: bytes, pos: int) -> int:
    """The offset of the marker that ends a scan (0xFF00 is a stuffed byte, 0xFFD0-D7 restart markers)."""
    size = len(data)
    while True:
        index = data.find(b"\xff", pos)
        if index < 0 or index + 1 >= size:
            raise ContainerError(
                "truncated",
                f"the JPEG is truncated: its image data stops at byte {size} without an end marker",
            )
        following = data[index + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            pos = index + 2
            continue
        if following == 0xFF:  # fill byte before a marker
            pos = index + 1
            continue
        return index


def inspect_webp(data: bytes) -> ContainerInfo:
    """Check the RIFF length against the file and read the canvas size from VP8X, VP8 or VP8L."""
    size = len(data)
    if size < 30:
        raise ContainerError("truncated", f"the WebP is truncated: {size} bytes is shorter than its header")
    declared = int.from_bytes(data[4:8], "little") + 8
    if size < declared:
        raise ContainerError(
            "truncated",
            f"the WebP is truncated: its header declares {declared} bytes but the file has {size}",
        )
    if size > declared:
        raise ContainerError(
            "trailing", f"the WebP has {size - declared} bytes of extra data after its declared end"
        )
    kind = data[12:16]
    body = data[20:]
    if kind == b"VP8X":
        flags = body[0]
        width = int.from_bytes(body[4:7], "little") + 1
        height = int.from_bytes(body[7:10], "little") + 1
        has_alpha = bool(flags & 0x10)
        return ContainerInfo(width, height, 4 if has_alpha else 3, 8, animated=bool(flags & 0x02))
    if kind == b"VP8 ":
        if body[3:6] != b"\x9d\x01\x2a":
            raise ContainerError("corrupt", "the WebP is corrupted: its VP8 frame has no start code")
        width = int.from_bytes(body[6:8], "little") & 0x3FFF
        height = int.from_bytes(body[8:10], "little") & 0x3FFF
        return ContainerInfo(width, height, 3, 8)
    if kind == b"VP8L":
        if body[0] != 0x2F:
            raise ContainerError("corrupt", "the WebP is corrupted: its VP8L stream has no signature")
        bits = int.from_bytes(body[1:5], "little")
        width = (bits & 0x3FFF) + 1
        height = ((bits >> 14) & 0x3FFF) + 1
        has_alpha = bool((bits >> 28) & 1)
        return ContainerInfo(width, height, 4 if has_alpha else 3, 8)
    raise ContainerError("corrupt", f"the WebP is corrupted: unknown first chunk {kind!r}")
