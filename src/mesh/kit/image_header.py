"""What an encoded image's header says, read without decoding a pixel: one reader for every service that sizes
an image before it decodes it (image processing against its limits, inference against its memory budget).

It answers what is stored: the format, width and height, Pillow's mode, the sample size and the EXIF
orientation. What the pixels will take once decoded is each caller's rule, as each decodes differently; so is
refusing an image over its own pixel limit.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Final

from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

# Private, but the very function whose answer Pillow refuses in the case it serves (requirements.lock pins Pillow).
from PIL.WebPImagePlugin import _get_size as _webp_canvas

from mesh.kit.image_bytes import Format, sniff_format
from mesh.kit.orientation import displayed_size, exif_orientation

# Each format's reader, used directly rather than through Image.open: open checks the size against Pillow's
# own pixel limit (a warning over it, an error over twice it), which is each caller's to check against its own.
_READERS: Final[dict[Format, type[ImageFile.ImageFile]]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}


@dataclass(frozen=True)
class ImageHeader:
    """An encoded image's header."""

    format: Format
    width: int
    """As stored, before the EXIF orientation turns the image (see ``shown_size``)."""
    height: int
    mode: str
    """Pillow's mode ("L", "RGB", "P", "LA", "RGBA", "CMYK", "I;16", ...): a 16-bit RGB(A) PNG says RGB(A), as
    Pillow reduces it; ``itemsize`` tells."""
    itemsize: int
    """Bytes per stored sample: 2 for a 16-bit PNG (read from its IHDR), else 1."""
    orientation: int
    """The EXIF orientation, 1-8 (1 when there is none)."""

    @property
    def shown_size(self) -> tuple[int, int]:
        """Width and height as a viewer shows the image (turned as its EXIF orientation says)."""
        return displayed_size(self.width, self.height, self.orientation)


def read_header(data: bytes) -> ImageHeader | None:
    """The header of PNG, JPEG or WebP bytes, with no pixel decoded and whatever their size; None when they are
    no such image or their header cannot be read (cut off, damaged), which the caller refuses in its own words
    (``image_bytes.not_an_image`` or ``unreadable_header``)."""
    found = sniff_format(data)
    if found is None:
        return None
    try:
        with _READERS[found](io.BytesIO(data)) as image:
            width, height = image.size
            mode = image.mode
            orientation = exif_orientation(image)
    except Image.DecompressionBombError:
        # Only WebP's reader checks the size itself, to allocate no canvas over twice Pillow's limit: neither its
        # mode nor its EXIF is read then; RGBA is the most a WebP decodes to.
        canvas = _webp_canvas(data[:30])
        if canvas is None:
            return None
        (width, height), mode, orientation = canvas, "RGBA", 1
    except Exception:  # any unreadable header: the caller says what is wrong with it, not Pillow's text
        return None
    # IHDR, which the PNG reader has just read, gives the depth that Pillow reduces in its mode.
    sixteen_bit = found == "PNG" and data[12:16] == b"IHDR" and data[24] == 16
    return ImageHeader(found, width, height, mode, 2 if sixteen_bit else 1, orientation)
