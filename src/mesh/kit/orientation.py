"""EXIF orientation: a phone stores a portrait photo sideways, with a tag saying how to turn it.

Every service treats an image as a viewer shows it: the thumbnail, the strip reader, image processing, and the
width and height the file service reports. Each reads the orientation from what the image's header held
(:func:`exif_orientation`, before the pixels are loaded), so that all of them agree; :func:`orient` turns the
NumPy arrays that OpenCV decodes and :func:`orient_image` Pillow images, the same way.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

ORIENTATION_TAG = 0x0112  # PIL.ExifTags.Base.Orientation
SIDEWAYS = frozenset({5, 6, 7, 8})


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image (1-8; 1 when absent or out of range).

    Read from what the header held, so call it before the pixels are loaded: for a PNG without an early eXIf
    chunk, Pillow's ``getexif`` would decode the whole image to look for a late one, and once the image is
    loaded, a late chunk shows in ``info`` (a service that read only the header would see another size). A
    damaged EXIF block counts as none: the pixels are whole, and Pillow's parse raised out of every caller."""
    if "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except (SyntaxError, ValueError, TypeError, KeyError, OSError, struct.error):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orient_image(image: Image.Image, orientation: int) -> Image.Image:
    """A loaded Pillow image as a viewer shows it (``image`` itself for 1), as :func:`orient` turns arrays."""
    method = _TRANSPOSES.get(orientation)
    return image if method is None else image.transpose(method)


def displayed_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """Width and height as a viewer shows the image."""
    return (height, width) if orientation in SIDEWAYS else (width, height)


def orient(pixels: npt.NDArray[Any], orientation: int) -> npt.NDArray[Any]:
    """(height, width[, channels]) pixels as a viewer shows them, contiguous; ``pixels`` itself for 1."""
    if orientation == 2:
        turned = pixels[:, ::-1]
    elif orientation == 3:
        turned = pixels[::-1, ::-1]
    elif orientation == 4:
        turned = pixels[::-1]
    elif orientation == 5:
        turned = pixels.swapaxes(0, 1)
    elif orientation == 6:
        turned = np.rot90(pixels, -1)
    elif orientation == 7:
        turned = pixels[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        turned = np.rot90(pixels, 1)
    else:
        return pixels
    return np.ascontiguousarray(turned)
