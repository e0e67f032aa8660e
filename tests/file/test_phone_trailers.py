"""Phone JPEGs with data after the image: Samsung's SEF trailer and motion photos (a video that the XMP declares)
are accepted when well formed; anything they do not account for is still refused as trailing data."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from mesh.kit import errors
from mesh.services.file.validation import validate_image
from tests.file import corpus

TRAILING = "the file carries other data after the image (a polyglot or a corrupted file)"


def mp4(extra: int = 64) -> bytes:
    """A small ISO BMFF file as phones append it: an ftyp box, then an mdat box."""
    ftyp = struct.pack(">I", 24) + b"ftypmp42" + b"\x00\x00\x00\x00mp42isom"
    return ftyp + struct.pack(">I", 8 + extra) + b"mdat" + bytes(range(extra))


def with_xmp(jpeg: bytes, description: str) -> bytes:
    """``jpeg`` with an XMP packet (APP1, right after SOI) whose rdf:Description holds ``description``."""
    packet = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:GCamera="http://ns.google.com/photos/1.0/camera/" '
        'xmlns:Container="http://ns.google.com/photos/1.0/container/" '
        'xmlns:Item="http://ns.google.com/photos/1.0/container/item/" '
        f"{description}</rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()
    payload = b"http://ns.adobe.com/xap/1.0/\x00" + packet
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def micro_video(offset: int, *, element: bool = False) -> str:
    """The Micro Video declaration (Pixel 2/3, Samsung): the video starts ``offset`` bytes before the end."""
    if element:
        return f"><GCamera:MicroVideo>1</GCamera:MicroVideo><GCamera:MicroVideoOffset>{offset}</GCamera:MicroVideoOffset"
    return f'GCamera:MicroVideo="1" GCamera:MicroVideoVersion="1" GCamera:MicroVideoOffset="{offset}">'


def container(*items: tuple[str, str, int], padding: int = 0) -> str:
    """A Motion Photo 1.0 Container directory: the primary JPEG (with ``padding``), then ``items`` (MIME type,
    semantic, length), as Pixel and Samsung phones write it."""
    listed = [
        f'<Container:Item Item:Mime="image/jpeg" Item:Semantic="Primary" Item:Length="0" Item:Padding="{padding}"/>'
    ]
    listed += [
        f'<Container:Item Item:Mime="{mime}" Item:Semantic="{semantic}" Item:Length="{length}" Item:Padding="0"/>'
        for mime, semantic, length in items
    ]
    entries = "".join(f'<rdf:li rdf:parseType="Resource">{item}</rdf:li>' for item in listed)
    return f'GCamera:MotionPhoto="1" GCamera:MotionPhotoVersion="1"><Container:Directory><rdf:Seq>{entries}</rdf:Seq></Container:Directory'


def sef_record(kind: int, name: bytes, value: bytes) -> bytes:
    """One Samsung trailer record: zero, its type, the length of its name, the name and the value."""
    return struct.pack("<HHI", 0, kind, len(name)) + name + value


def sef_trailer(records: list[tuple[int, bytes]], *, version: int = 106) -> bytes:
    """Samsung's trailer (exiftool's Samsung.pm layout): ``records`` (type, bytes), then the SEFH directory
    (each entry: zero, type, distance back from the directory's start, length), its length and "SEFT"."""
    body = b"".join(record for _, record in records)
    entries = b""
    back = len(body)
    for kind, record in records:
        entries += struct.pack("<HHII", 0, kind, back, len(record))
        back -= len(record)
    directory = b"SEFH" + struct.pack("<II", version, len(records)) + entries
    return body + directory + struct.pack("<I", len(directory)) + b"SEFT"


UTC = (0x0A01, sef_record(0x0A01, b"Image_UTC_Data", b"1700000000000"))
CAPTURE_MODE = (0x0C61, sef_record(0x0C61, b"Camera_Capture_Mode_Info", b"1"))


def samsung_photo() -> bytes:
    """A Galaxy photo: the JPEG, then its SEF trailer (capture time, camera mode)."""
    return corpus.jpeg() + sef_trailer([UTC, CAPTURE_MODE])


def samsung_motion_photo() -> bytes:
    """A Galaxy motion photo (One UI 5 on): the video inside the MotionPhoto_Data record; the XMP's primary item
    pads over the record headers before the video and the video item's length runs to the end of the file."""
    video = mp4()
    version = (0x0A31, sef_record(0x0A31, b"MotionPhoto_Version", b"mpv3"))
    data = (0x0A30, sef_record(0x0A30, b"MotionPhoto_Data", video))
    trailer = sef_trailer([version, data])
    padding = len(version[1]) + len(data[1]) - len(video)
    return (
        with_xmp(
            corpus.jpeg(), container(("video/mp4", "MotionPhoto", len(trailer) - padding), padding=padding)
        )
        + trailer
    )


def samsung_micro_video() -> bytes:
    """An older Galaxy motion photo: MicroVideoOffset counts back from the end to the video inside its
    MotionPhoto_Data record, so the SEF directory after the video lies within it."""
    video = mp4()
    trailer = sef_trailer([(0x0A30, sef_record(0x0A30, b"MotionPhoto_Data", video)), UTC])
    offset = len(trailer) - trailer.index(video)
    return with_xmp(corpus.jpeg(), micro_video(offset)) + trailer


def ultra_hdr_motion_photo() -> bytes:
    """A Pixel Ultra HDR motion photo: the gain map (declared by MPF and the Container directory), then the
    video."""
    gain_map_jpeg = corpus.jpeg_with_gain_map()
    gain_map = len(corpus.jpeg("L", 32, 24))
    video = mp4()
    items = (("image/jpeg", "GainMap", gain_map), ("video/mp4", "MotionPhoto", len(video)))
    return with_xmp(gain_map_jpeg, container(*items)) + video


ACCEPTED: dict[str, Callable[[], bytes]] = {
    "samsung-trailer": samsung_photo,
    "samsung-trailer-after-zero-padding": lambda: corpus.jpeg() + b"\x00" * 16 + sef_trailer([UTC]),
    "samsung-motion-photo": samsung_motion_photo,
    "samsung-micro-video-offset": samsung_micro_video,
    "pixel-micro-video": lambda: with_xmp(corpus.jpeg(), micro_video(len(mp4()))) + mp4(),
    "pixel-micro-video-element-form": lambda: (
        with_xmp(corpus.jpeg(), micro_video(len(mp4()), element=True)) + mp4()
    ),
    "pixel-motion-photo": lambda: (
        with_xmp(corpus.jpeg(), container(("video/mp4", "MotionPhoto", len(mp4())))) + mp4()
    ),
    "pixel-motion-photo-after-zero-padding": lambda: (
        with_xmp(corpus.jpeg(), container(("video/mp4", "MotionPhoto", len(mp4())))) + b"\x00" * 8 + mp4()
    ),
    "pixel-ultra-hdr-motion-photo": ultra_hdr_motion_photo,
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_a_well_formed_phone_trailer_is_accepted_as_the_first_image(name: str) -> None:
    """A JPEG followed by a Samsung SEF trailer, a motion photo's video that its XMP declares, or both as Galaxy
    phones write them, is accepted and described by its first image."""
    data = ACCEPTED[name]()
    info = validate_image(data).info
    assert (info.format, info.width, info.height, info.size_bytes) == ("JPEG", 64, 48, len(data))


def _sef_with_entry(entry: bytes) -> bytes:
    """A photo whose one-record SEF directory carries ``entry`` instead of the true one."""
    trailer = sef_trailer([UTC])
    directory = trailer.index(b"SEFH")
    return corpus.jpeg() + trailer[: directory + 12] + entry + trailer[directory + 24 :]


def _sef_directory_length(length: int) -> bytes:
    trailer = sef_trailer([UTC])
    return corpus.jpeg() + trailer[:-8] + struct.pack("<I", length) + b"SEFT"


def _pixel(description: str, tail: bytes) -> bytes:
    return with_xmp(corpus.jpeg(), description) + tail


VIDEO = len(mp4())
HTML = b"<html><body><script>alert(1)</script></body></html>"
ZIP = b"PK\x03\x04" + b"\x00" * 26 + b"evil.sh" + b"PK\x05\x06" + b"\x00" * 18

REFUSED: dict[str, Callable[[], bytes]] = {
    "jpeg-zip": lambda: corpus.jpeg() + ZIP,
    "jpeg-html-ending-in-seft": lambda: corpus.jpeg() + HTML + b"SEFT",
    "html-before-a-samsung-trailer": lambda: corpus.jpeg() + HTML + sef_trailer([UTC]),
    "samsung-trailer-then-html": lambda: samsung_photo() + HTML,
    "sef-directory-length-reaching-into-the-image": lambda: _sef_directory_length(10_000),
    "sef-directory-length-off-by-four": lambda: _sef_directory_length(28),
    "sef-directory-without-sefh": lambda: samsung_photo().replace(b"SEFH", b"SEFX"),
    "sef-record-reaching-into-the-image": lambda: _sef_with_entry(
        struct.pack("<HHII", 0, 0x0A01, 10_000, 35)
    ),
    "sef-record-longer-than-its-room": lambda: _sef_with_entry(struct.pack("<HHII", 0, 0x0A01, 35, 36)),
    "sef-record-of-another-type": lambda: _sef_with_entry(struct.pack("<HHII", 0, 0x0A02, 35, 35)),
    "sef-directory-counting-more-records": lambda: samsung_photo().replace(
        b"SEFH" + struct.pack("<II", 106, 2), b"SEFH" + struct.pack("<II", 106, 3)
    ),
    "undeclared-video": lambda: corpus.jpeg() + mp4(),
    "micro-video-offset-too-short": lambda: _pixel(micro_video(VIDEO - 8), mp4()),
    "micro-video-offset-too-long": lambda: _pixel(micro_video(VIDEO + 8), mp4()),
    "micro-video-offset-with-html-before-the-video": lambda: _pixel(micro_video(VIDEO), HTML + mp4()),
    "micro-video-offset-past-the-image": lambda: _pixel(micro_video(10_000_000), mp4()),
    "container-length-one-short": lambda: _pixel(container(("video/mp4", "MotionPhoto", VIDEO - 1)), mp4()),
    "container-length-one-long": lambda: _pixel(container(("video/mp4", "MotionPhoto", VIDEO + 1)), mp4()),
    "container-video-then-html": lambda: _pixel(container(("video/mp4", "MotionPhoto", VIDEO)), mp4() + HTML),
    "container-video-that-is-a-zip": lambda: _pixel(container(("video/mp4", "MotionPhoto", len(ZIP))), ZIP),
    "container-item-of-an-unknown-type": lambda: _pixel(
        container(("application/zip", "Payload", len(ZIP))), ZIP
    ),
    "container-padding-hiding-html": lambda: _pixel(
        container(("video/mp4", "MotionPhoto", VIDEO), padding=len(HTML)), HTML + mp4()
    ),
    "container-length-covering-html-after-the-video": lambda: _pixel(
        container(("video/mp4", "MotionPhoto", VIDEO + len(HTML))), mp4() + HTML
    ),
    "micro-video-offset-covering-html-after-the-video": lambda: _pixel(
        micro_video(VIDEO + len(HTML)), mp4() + HTML
    ),
    "container-ftyp-box-then-zip": lambda: _pixel(
        container(("video/mp4", "MotionPhoto", 24 + len(ZIP))), mp4()[:24] + ZIP
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_data_a_phone_trailer_does_not_account_for_is_refused(name: str) -> None:
    """A real polyglot (JPEG+ZIP, JPEG+HTML), a SEF trailer whose directory lies about where it or its records
    are, data before or after a well-formed trailer, and an XMP declaration whose length does not match the
    bytes after the image, names no video or covers more than the video's boxes, are refused as trailing data,
    with the same advice as before."""
    with pytest.raises(errors.InvalidData) as caught:
        validate_image(REFUSED[name]())
    assert "extra data after its end-of-image marker" in caught.value.message
    assert TRAILING in caught.value.message
    assert "re-save it as a plain image" in caught.value.message
