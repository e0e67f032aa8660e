"""Structural checks of PNG, JPEG and WebP containers, done on the raw bytes before any decoder runs.

Pillow decodes happily past the end of an image: bytes appended after a PNG's IEND or a JPEG's EOI (the
classic polyglot) are ignored, and a cut-off file can fail with a vague message. Walking the container
first gives precise answers (truncated, trailing data, corrupted chunk) and the declared pixel size, so
that decompression bombs are refused before a decoder allocates anything.

Phones write a few well-known structures after a JPEG's end-of-image marker, and those are accepted when they
are well formed: the further images an MPF segment declares (MPO, Ultra HDR gain maps), Samsung's SEF trailer
(records, then a SEFH directory, then its length and "SEFT"), and the motion photo's video (and other items)
that the XMP declares by length (Google's Camera/Container namespaces, as Pixel and Samsung phones write them).
Anything else after the image, or a declaration that does not account for the bytes, is trailing data.
"""

from __future__ import annotations

import itertools
import re
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
# The standard XMP packet sits in one APP1 segment (at most 64 KiB) that opens with this namespace.
_XMP_IDENTIFIER = b"http://ns.adobe.com/xap/1.0/\x00"
# Samsung's trailer (exiftool's Samsung.pm): records, each "\0\0" + its type (2 bytes) + the length of its name
# (4 bytes) + name + data; then the directory: "SEFH", version, count (4 bytes each), and per record 12 bytes
# ("\0\0" + type, its distance back from the directory's start, its length); then the directory's length and
# "SEFT". All little-endian.
_SEF_END = b"SEFT"
_SEF_DIRECTORY = b"SEFH"
_SEF_ENTRY = struct.Struct("<4sII")
# Micro Video (Pixel 2/3, Samsung): the appended video's start, counted back from the end of the file.
_MICRO_VIDEO_OFFSET = re.compile(rb"(?<![\w:])G?Camera:MicroVideoOffset(?:\s*=\s*[\"']|>)\s*(\d{1,15})")
# Motion Photo 1.0 (Pixel, Samsung): a Container:Directory of items, the primary image first; each further
# item's bytes follow in order and the last one ends the file (how Android's media3 finds them).
_CONTAINER_ITEM = re.compile(rb"<G?Container:Item\b([^>]*)>")
_ITEM_ATTRIBUTE = re.compile(rb"(?<![\w:])(?:Item|GContainerItem):(\w+)\s*=\s*([\"'])(.*?)\2")
_DECIMAL = re.compile(rb"\d{1,15}")


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


@dataclass(frozen=True)
class _JpegLayout:
    """What walking a JPEG found: its frame, where it ends, and what its header declares about what follows."""

    frame: ContainerInfo
    end: int
    """The offset just after the EOI marker."""
    declared_images: list[int]
    """Where the further images that its MPF segment lists start."""
    xmp: bytes
    """Its standard XMP packet (the APP1 segment's payload), empty when it has none."""


@dataclass(frozen=True)
class _DeclaredItems:
    """Items that the XMP declares after the primary image: (MIME type, length) each, in file order, the last
    one ending the file; ``padding`` is the room the primary image declares between its end and the first."""

    padding: int
    items: list[tuple[bytes, int]]


def inspect_jpeg(data: bytes) -> ContainerInfo:
    """Walk the marker segments and entropy-coded scans up to EOI; nothing but padding may follow, except
    the further images of a multi-picture file (MPF) that the first image declares, and a phone's trailer."""
    layout = _walk_jpeg(data)
    trailing = len(data) - layout.end
    if (
        data.count(0, layout.end) != trailing
        and not _holds_declared_images(data, layout.end, layout.declared_images)
        and not _holds_phone_trailer(data, layout)
    ):
        raise ContainerError(
            "trailing", f"the JPEG has {trailing} bytes of extra data after its end-of-image marker"
        )
    return layout.frame


def _walk_jpeg(data: bytes) -> _JpegLayout:
    """The layout of the JPEG at the start of ``data``: its frame, the offset after its EOI marker, the offsets
    of the further images its MPF segment declares and its XMP packet."""
    size = len(data)
    pos = 2
    frame: ContainerInfo | None = None
    declared: list[int] = []
    xmp = b""
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
        if marker == 0xE1 and not xmp and data[pos + 2 : pos + 2 + len(_XMP_IDENTIFIER)] == _XMP_IDENTIFIER:
            xmp = data[pos + 2 + len(_XMP_IDENTIFIER) : pos + length]
        pos += length
        if marker == 0xDA:
            pos = _skip_entropy_coded(data, pos)
    if frame is None:
        raise ContainerError("corrupt", "the JPEG is corrupted: it has no frame header (SOF)")
    return _JpegLayout(frame, pos, declared, xmp)


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
            image_end = _walk_jpeg(image).end
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


def _holds_phone_trailer(data: bytes, layout: _JpegLayout) -> bool:
    """Whether everything after the image is what phones write there, each part well formed: Samsung's SEF
    trailer, the items (a motion photo's video) that the XMP declares, the images that MPF declares, and zero
    padding between them. A file that ends in "SEFT" with a directory that does not hold is refused outright."""
    samsung = _samsung_trailer(data, layout.end)
    if samsung is None and data.endswith(_SEF_END):
        return False
    found = [*(samsung or []), *_mpf_spans(data, layout.end, layout.declared_images)]
    placed = [_place_items(data, layout.end, declared) for declared in _xmp_declarations(layout.xmp)]
    candidates = [spans for spans in placed if spans is not None]
    if samsung:
        candidates.append([])  # the Samsung trailer alone may hold everything (its video in a record)
    return any(_covers(data, layout.end, found + spans) for spans in candidates)


def _samsung_trailer(data: bytes, end: int) -> list[tuple[int, int]] | None:
    """The spans (start, stop) of the records and the directory of the Samsung trailer that ends ``data``, or
    None when it ends in none, or in one whose directory does not hold: every record it lists must lie between
    the image's end (``end``) and the directory, and start with the type its entry gives."""
    size = len(data)
    # The least a trailer holds: a record's header, a one-entry directory, then its length and "SEFT".
    if size - end < 8 + 24 + 8 or not data.endswith(_SEF_END):
        return None
    (directory_length,) = struct.unpack_from("<I", data, size - 8)
    directory = size - 8 - directory_length
    if directory < end or directory_length < 12 or data[directory : directory + 4] != _SEF_DIRECTORY:
        return None
    (count,) = struct.unpack_from("<I", data, directory + 8)
    if count == 0 or 12 + _SEF_ENTRY.size * count > directory_length:
        return None
    spans = [(directory, size)]
    for index in range(count):
        kind, back, length = _SEF_ENTRY.unpack_from(data, directory + 12 + _SEF_ENTRY.size * index)
        start = directory - back
        if not kind.startswith(b"\x00\x00") or not 8 <= length <= back or start < end:
            return None
        (name_length,) = struct.unpack_from("<I", data, start + 4)
        if data[start : start + 4] != kind or 8 + name_length > length:
            return None
        spans.append((start, start + length))
    return spans


def _mpf_spans(data: bytes, end: int, starts: list[int]) -> list[tuple[int, int]]:
    """The spans of the whole JPEGs found where the MPF segment declares further images (after ``end``)."""
    spans = []
    for start in sorted(set(starts)):
        if start < end or data[start : start + 2] != _JPEG_SOI:
            continue
        try:
            spans.append((start, start + _walk_jpeg(data[start:]).end))
        except ContainerError:
            continue
    return spans


def _xmp_declarations(xmp: bytes) -> list[_DeclaredItems]:
    """What the XMP packet declares after the primary image: a Micro Video's offset, a Container directory's
    further items (those with a length)."""
    declarations = []
    offset = _MICRO_VIDEO_OFFSET.search(xmp)
    if offset and int(offset[1]):
        declarations.append(_DeclaredItems(0, [(b"video/mp4", int(offset[1]))]))
    directory = _container_items(xmp)
    if directory is not None:
        declarations.append(directory)
    return declarations


def _container_items(xmp: bytes) -> _DeclaredItems | None:
    """The items after the primary image (the directory's first item) that a Container directory lists with a
    length (a length of 0 shares the bytes of the item before it); None when it lists none, or an item without a
    MIME type or with a length or padding that is not a number."""
    items = [
        {match[1]: match[3] for match in _ITEM_ATTRIBUTE.finditer(item[1])}
        for item in _CONTAINER_ITEM.finditer(xmp)
    ]
    if len(items) < 2 or not all(_is_readable_item(item) for item in items):
        return None
    primary, *further = items
    declared = [(item[b"Mime"].strip(), int(item.get(b"Length", b"0"))) for item in further]
    declared = [(mime, length) for mime, length in declared if length]
    return _DeclaredItems(int(primary.get(b"Padding", b"0")), declared) if declared else None


def _is_readable_item(attributes: dict[bytes, bytes]) -> bool:
    """Whether a Container item has a MIME type, and its length and padding (where given) are numbers."""
    numbers = (attributes.get(name, b"0").strip() for name in (b"Length", b"Padding"))
    return b"Mime" in attributes and all(_DECIMAL.fullmatch(number) for number in numbers)


def _place_items(data: bytes, end: int, declared: _DeclaredItems) -> list[tuple[int, int]] | None:
    """The spans of the declared items, laid out back from the end of the file, each as far as its content is
    well formed; None when they would reach into the image or an item is not of its declared type. The
    primary image's padding is only room: what lies there must be accounted for otherwise (Samsung's record
    headers) or be zeros, as must what lies in an item after its content (Samsung's SEF directory)."""
    start = len(data) - sum(length for _, length in declared.items)
    if start - declared.padding < end:
        return None
    spans = []
    for mime, length in declared.items:
        content_end = _content_end(data, start, start + length, mime)
        if content_end is None:
            return None
        spans.append((start, content_end))
        start += length
    return spans


def _content_end(data: bytes, start: int, stop: int, mime: bytes) -> int | None:
    """Where the file of type ``mime`` at ``start`` ends (at most ``stop``): after the last whole top-level box
    of a video, after the EOI of a JPEG; None when no such file starts there (or the type is not one phones
    append)."""
    if mime in (b"video/mp4", b"video/quicktime"):
        if data[start + 4 : start + 8] != b"ftyp":  # an ISO BMFF file opens with its ftyp box
            return None
        return _boxes_end(data, start, stop)
    if mime == b"image/jpeg" and data[start : start + 2] == _JPEG_SOI:
        try:
            return start + _walk_jpeg(data[start:stop]).end
        except ContainerError:
            return None
    return None


def _boxes_end(data: bytes, start: int, stop: int) -> int:
    """The offset after the last whole ISO BMFF top-level box (size, four-character type) from ``start`` that
    ends by ``stop``."""
    position = start
    while position + 8 <= stop:
        size, kind = struct.unpack_from(">I4s", data, position)
        header = 8
        if size == 0:  # the last box runs to the end
            size = stop - position
        elif size == 1 and position + 16 <= stop:  # a 64-bit size follows the type
            (size,) = struct.unpack_from(">Q", data, position + 8)
            header = 16
        if size < header or position + size > stop or not all(0x20 <= byte < 0x7F for byte in kind):
            break
        position += size
    return position


def _covers(data: bytes, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether every byte after ``end`` lies in one of ``spans`` or is zero padding."""
    position = end
    for start, stop in sorted(spans):
        if start > position and data.count(0, position, start) != start - position:
            return False
        position = max(position, stop)
    return data.count(0, position) == max(len(data) - position, 0)


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
