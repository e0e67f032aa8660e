"""Thumbnails made at upload."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from mesh.kit.orientation import ORIENTATION_TAG, orient
from mesh.services.file import thumbnails
from mesh.services.file.thumbnails import make_thumbnail
from mesh.services.file.validation import validate_image
from tests.file import corpus


@pytest.mark.parametrize(
    ("data", "content_type", "mode"),
    [
        (corpus.png("RGBA", 600, 300), "image/png", "RGBA"),
        (corpus.png("LA", 600, 300), "image/png", "LA"),
        (corpus.webp("RGBA", 600, 300), "image/png", "RGBA"),
        (corpus.png("RGB", 600, 300), "image/jpeg", "RGB"),
        (corpus.jpeg("L", 600, 300), "image/jpeg", "L"),
        (corpus.png("P", 600, 300), "image/jpeg", "RGB"),
        (corpus.encode(corpus.pixels("RGB", 600, 300).convert("CMYK"), "JPEG"), "image/jpeg", "RGB"),
        (corpus.encode(corpus.pixels("L", 600, 300), "PNG", transparency=0), "image/png", "LA"),
    ],
)
def test_thumbnail_is_png_with_alpha_else_jpeg_and_fits_256(
    data: bytes, content_type: str, mode: str
) -> None:
    """The longest side becomes 256 px (aspect kept); alpha sources give PNG, others JPEG."""
    thumb = make_thumbnail(validate_image(data), 256)
    assert thumb.content_type == content_type
    decoded = Image.open(io.BytesIO(thumb.data))
    assert decoded.size == (thumb.width, thumb.height) == (256, 128)
    assert decoded.mode == mode


def test_small_images_are_not_upscaled() -> None:
    """An image already smaller than the thumbnail keeps its size."""
    thumb = make_thumbnail(validate_image(corpus.png("RGB", 40, 30)), 256)
    assert (thumb.width, thumb.height) == (40, 30)


def test_16bit_images_are_scaled_not_clipped() -> None:
    """A 16-bit grey gradient keeps its gradient in 8 bits instead of saturating to white."""
    gradient = Image.fromarray(
        (np.arange(512, dtype=np.uint32) * 128).astype(np.uint16).reshape(1, 512).repeat(8, 0)
    )
    data = corpus.encode(gradient, "PNG")
    decoded = validate_image(data)
    assert decoded.image.mode.startswith("I")
    thumb = make_thumbnail(decoded, 256)
    pixels = np.asarray(Image.open(io.BytesIO(thumb.data)).convert("L"), dtype=np.int32)
    assert pixels[:, 0].mean() < 20
    assert pixels[:, -1].mean() > 230


def test_16bit_colour_png_gets_a_thumbnail() -> None:
    """A 16-bit RGB PNG gives a JPEG thumbnail of its size."""
    thumb = make_thumbnail(validate_image(corpus.png_16bit_rgb()), 256)
    assert thumb.content_type == "image/jpeg"
    assert (thumb.width, thumb.height) == (32, 16)


def test_source_image_is_left_untouched() -> None:
    """Making a thumbnail does not shrink the caller's decoded image."""
    decoded = validate_image(corpus.png("RGB", 600, 300))
    image = decoded.image
    make_thumbnail(decoded, 64)
    assert image.size == (600, 300)


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = value
    return exif.tobytes()


def _grey_16bit(width: int, height: int) -> Image.Image:
    """A 16-bit grey gradient, darker to the left, over the whole 16-bit range."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray((x * 65535 // (width - 1) - y % 7).clip(0, 65535).astype(np.uint16))


# Kinds whose thumbnails were made with whole-image copies (up to three times the decoded image): each with a
# file given an EXIF orientation, the 8-bit image its thumbnail is made of, and the thumbnail's type and mode.
KINDS: dict[str, tuple[Callable[[int], bytes], Callable[[Image.Image], Image.Image], str, str]] = {
    "png-grey-16bit": (
        lambda o: corpus.encode(_grey_16bit(999, 601), "PNG", exif=_exif_orientation(o)),
        lambda image: Image.fromarray((np.asarray(image) >> 8).astype(np.uint8)),
        "image/jpeg",
        "L",
    ),
    "png-rgba": (
        lambda o: corpus.encode(corpus.pixels("RGBA", 999, 601), "PNG", exif=_exif_orientation(o)),
        lambda image: image,
        "image/png",
        "RGBA",
    ),
    "png-palette-transparent": (
        lambda o: corpus.encode(
            corpus.pixels("P", 999, 601), "PNG", transparency=3, exif=_exif_orientation(o)
        ),
        lambda image: image.convert("RGBA"),
        "image/png",
        "RGBA",
    ),
    "jpeg-rgb": (
        lambda o: corpus.encode(corpus.pixels("RGB", 999, 601), "JPEG", exif=_exif_orientation(o)),
        lambda image: image,
        "image/jpeg",
        "RGB",
    ),
}


def _premultiplied(image: Image.Image) -> npt.NDArray[np.float64]:
    """The pixels, colour weighted by alpha where there is one: a transparent pixel's colour is not seen."""
    pixels = np.asarray(image).astype(np.float64)
    if image.mode in ("LA", "RGBA"):
        pixels[..., :-1] *= pixels[..., -1:] / 255
    return pixels


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_thumbnail_is_the_whole_image_turned_converted_and_thumbnailed(
    kind: str, orientation: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made strip by strip (small strips here) and turned upright once small, the thumbnail has the size,
    orientation and mode of Pillow's thumbnail of the whole image turned upright and brought to 8 bits, as it
    was first made, and its pixels within rounding (resampling a turned image rounds values by 1-2 levels the
    other way, and premultiplied 8-bit alpha a few pixels at the rims of transparent areas by more)."""
    monkeypatch.setattr(thumbnails, "_STRIP_PIXELS", 20_000)
    make, eight_bit, content_type, mode = KINDS[kind]
    decoded = validate_image(make(orientation))
    thumb = make_thumbnail(decoded, 256)
    expected = Image.fromarray(orient(np.asarray(eight_bit(decoded.image)), orientation))
    expected.thumbnail((256, 256), Image.Resampling.LANCZOS, reducing_gap=3.0)
    sideways = orientation in (5, 6, 7, 8)
    assert (thumb.width, thumb.height) == expected.size == ((154, 256) if sideways else (256, 154))
    assert (decoded.info.width > decoded.info.height) == (thumb.width > thumb.height)
    assert thumb.content_type == content_type
    received = Image.open(io.BytesIO(thumb.data))
    assert received.mode == mode
    encoded = corpus.encode(expected, "PNG" if content_type == "image/png" else "JPEG", quality=85)
    difference = np.abs(_premultiplied(received) - _premultiplied(Image.open(io.BytesIO(encoded))))
    assert np.mean(difference > 2) < 0.005  # a few hundred values, at the rims of transparent areas
    assert difference.max() <= 24


def test_the_decoded_image_is_read_in_strips_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No whole-image copy is made (a 50-megapixel RGBA image is 200 MB; each copy was another 200 MB): the
    decoded image is only cropped, in strips of about ``_STRIP_PIXELS``."""
    decoded = validate_image(
        corpus.encode(corpus.pixels("RGBA", 1500, 1000), "PNG", exif=_exif_orientation(6))
    )
    image = decoded.image
    monkeypatch.setattr(thumbnails, "_STRIP_PIXELS", 100_000)
    calls: list[tuple[str, int]] = []
    for name in ("copy", "convert", "crop", "reduce", "resize", "transpose", "getdata", "tobytes"):
        method = getattr(Image.Image, name)

        def spy(
            self: Image.Image, *args: Any, _method: Any = method, _name: str = name, **kwargs: Any
        ) -> Any:
            result = _method(self, *args, **kwargs)
            if self is image:
                made = result if isinstance(result, Image.Image) else self
                calls.append((_name, made.width * made.height))
            return result

        monkeypatch.setattr(Image.Image, name, spy)
    make_thumbnail(decoded, 256)
    assert {name for name, _ in calls} == {"crop"}
    assert max(pixels for _, pixels in calls) <= 100_000


def test_16bit_grey_is_turned_by_its_exif_orientation() -> None:
    """A 16-bit grey PNG with EXIF orientation 6 is reported 100x200, and its thumbnail is turned too (it was
    not: the 8-bit conversion dropped the EXIF before it was applied): the dark left edge is now the top."""
    decoded = validate_image(corpus.encode(_grey_16bit(200, 100), "PNG", exif=_exif_orientation(6)))
    thumb = make_thumbnail(decoded, 256)
    assert (decoded.info.width, decoded.info.height) == (thumb.width, thumb.height) == (100, 200)
    pixels = np.asarray(Image.open(io.BytesIO(thumb.data)), dtype=np.int32)
    assert pixels[:5].mean() < 20
    assert pixels[-5:].mean() > 235


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_orientation_in_xmp_only_is_ignored_like_the_reported_size(fmt: str) -> None:
    """Browsers and the reported width and height follow EXIF alone; the thumbnail does too, instead of Pillow's
    rule, which also reads XMP and turned the thumbnail of an image reported 200x100."""
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    image = corpus.pixels("RGB", 200, 100)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp)
        data = corpus.encode(image, "PNG", pnginfo=info)
    else:
        data = corpus.encode(image, "JPEG", xmp=xmp.encode())
    decoded = validate_image(data)
    assert "xmp" in decoded.image.info or "XML:com.adobe.xmp" in decoded.image.info
    thumb = make_thumbnail(decoded, 256)
    assert (decoded.info.width, decoded.info.height) == (thumb.width, thumb.height) == (200, 100)


def _profile(colour_space: bytes) -> bytes:
    """An sRGB ICC profile, or one whose header names another colour space."""
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return srgb[:16] + colour_space + srgb[20:]


@pytest.mark.parametrize(
    ("mode", "fmt"), [("RGB", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "WEBP")]
)
def test_the_icc_profile_is_kept(mode: str, fmt: str) -> None:
    """The thumbnail carries the image's ICC profile, so that its colours are the image's (JPEG thumbnails
    lost it)."""
    profile = _profile(b"RGB ")
    thumb = make_thumbnail(
        validate_image(corpus.encode(corpus.pixels(mode, 600, 300), fmt, icc_profile=profile))
    )
    assert Image.open(io.BytesIO(thumb.data)).info.get("icc_profile") == profile


def test_a_cmyk_profile_is_not_given_to_the_rgb_thumbnail() -> None:
    """A CMYK JPEG's thumbnail is RGB: its CMYK profile would make viewers show wrong colours, so it is left out."""
    cmyk = corpus.encode(
        corpus.pixels("RGB", 600, 300).convert("CMYK"), "JPEG", icc_profile=_profile(b"CMYK")
    )
    thumb = make_thumbnail(validate_image(cmyk))
    received = Image.open(io.BytesIO(thumb.data))
    assert received.mode == "RGB"
    assert "icc_profile" not in received.info


def test_16bit_grey_with_a_colour_key_gets_an_alpha_thumbnail() -> None:
    """A 16-bit grey PNG with a tRNS colour key is reported with 2 channels (grey and alpha) and its thumbnail
    is a PNG with alpha, as for 8-bit grey (it was a JPEG without alpha); the keyed pixels are transparent."""
    pixels = np.full((100, 200), 40_000, dtype=np.uint16)
    pixels[:, :100] = 300
    decoded = validate_image(corpus.encode(Image.fromarray(pixels), "PNG", transparency=300))
    assert decoded.info.channels == 2
    thumb = make_thumbnail(decoded, 256)
    assert thumb.content_type == "image/png"
    received = np.asarray(Image.open(io.BytesIO(thumb.data)))
    assert received.shape == (100, 200, 2)
    assert (received[:, :95, 1] == 0).all()
    assert (received[:, 105:, 1] == 255).all()
    assert (received[:, 105:, 0] == 40_000 >> 8).all()
