"""A corpus of good and bad image files, generated on the fly (nothing binary is checked in)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

GOOD_MODES = ("L", "LA", "RGB", "RGBA", "I;16", "P")


def pixels(mode: str, width: int = 64, height: int = 48) -> Image.Image:
    """A deterministic gradient image in ``mode``."""
    y, x = np.mgrid[0:height, 0:width]
    base = ((x * 255) // max(width - 1, 1)).astype(np.uint8)
    other = ((y * 255) // max(height - 1, 1)).astype(np.uint8)
    if mode == "I;16":
        return Image.fromarray((x * 1000 + y).astype(np.uint16))
    if mode == "L":
        return Image.fromarray(base)
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(base), Image.fromarray(other)])
    rgb = np.dstack([base, other, (base // 2 + other // 2).astype(np.uint8)])
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, other]))
    if mode == "P":
        return Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    raise ValueError(mode)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    """``image`` encoded as ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(mode: str = "RGB", width: int = 64, height: int = 48) -> bytes:
    """A valid PNG."""
    return encode(pixels(mode, width, height), "PNG")


def jpeg(mode: str = "RGB", width: int = 64, height: int = 48) -> bytes:
    """A valid JPEG (grey or RGB)."""
    return encode(pixels(mode, width, height), "JPEG", quality=90)


def webp(mode: str = "RGB", width: int = 64, height: int = 48, *, lossless: bool = False) -> bytes:
    """A valid WebP (RGB or RGBA)."""
    return encode(pixels(mode, width, height), "WEBP", lossless=lossless, quality=80)


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """An RGB PNG of random noise (incompressible, so its size is about 3 bytes per pixel)."""
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)), "PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_16bit_rgb(width: int = 32, height: int = 16) -> bytes:
    """A 16-bit RGB PNG, written by hand (Pillow cannot write 16-bit colour)."""
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            row += struct.pack(">HHH", x * 2000, y * 4000, 65535 - x * 1000)
        rows.append(bytes(row))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + png_chunk(b"IEND", b"")
    )


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` grey pixels (a decompression bomb's shape).

    Its IDAT holds one compressed row of zeros only; a decoder that trusted the header would allocate
    ``width * height`` bytes before noticing.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
        + png_chunk(b"IEND", b"")
    )


def png_with_corrupt_idat() -> bytes:
    """A PNG whose IDAT is garbage with a recomputed (valid) CRC: only a full decode can tell."""
    good = png("RGB")
    start = good.index(b"IDAT") - 4
    length = struct.unpack(">I", good[start : start + 4])[0]
    garbage = bytes((i * 37 + 11) % 256 for i in range(length))
    return good[:start] + png_chunk(b"IDAT", garbage) + good[start + 12 + length :]


def png_with_bad_crc() -> bytes:
    """A PNG with one flipped bit in its pixel data (the chunk CRC no longer matches)."""
    good = bytearray(png("RGB"))
    index = good.index(b"IDAT") + 10
    good[index] ^= 0x01
    return bytes(good)


def jpeg_with_embedded_thumbnail() -> bytes:
    """A JPEG whose APP1 (EXIF) segment carries another JPEG, end marker included (as cameras write)."""
    main = jpeg("RGB", 200, 100)
    payload = b"Exif\x00\x00" + jpeg("RGB", 32, 16)
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return main[:2] + app1 + main[2:]


def png_with_colour_key(mode: str) -> bytes:
    """A grey or RGB PNG with a tRNS colour key (black is transparent)."""
    return encode(pixels(mode), "PNG", transparency=0 if mode == "L" else (0, 0, 0))


def mpo(width: int = 64, height: int = 48) -> bytes:
    """A multi-picture JPEG (CIPA DC-007, as cameras and HDR phones write): the first image, then two more that
    its MPF segment declares."""
    further = [pixels("RGB", 32, 24), pixels("L", 16, 16)]
    return encode(pixels("RGB", width, height), "MPO", save_all=True, append_images=further)


def jpeg_with_gain_map() -> bytes:
    """A JPEG followed by a second (grey) JPEG that a big-endian MPF segment declares, as Ultra HDR photos and
    most cameras write them (Pillow writes little-endian)."""
    primary, gain_map = jpeg("RGB", 64, 48), jpeg("L", 32, 24)

    def app2(size: int, offset: int) -> bytes:
        entries = struct.pack(">IIIHH", 0x030000, size, 0, 0, 0) + struct.pack(
            ">IIIHH", 0, len(gain_map), offset, 0, 0
        )
        ifd = (
            struct.pack(">H", 3)
            + struct.pack(">HHI4s", 0xB000, 7, 4, b"0100")  # MPF version
            + struct.pack(">HHII", 0xB001, 4, 1, 2)  # number of images
            + struct.pack(">HHII", 0xB002, 7, len(entries), 8 + 2 + 3 * 12 + 4)  # MP entries, after this IFD
            + struct.pack(">I", 0)
        )
        payload = b"MPF\x00" + b"MM\x00*" + struct.pack(">I", 8) + ifd + entries
        return b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload

    size = len(primary) + len(app2(0, 0))
    header = 2 + 4 + 4  # SOI, the segment's marker and length, "MPF\0": offsets count from here
    return primary[:2] + app2(size, size - header) + primary[2:] + gain_map
