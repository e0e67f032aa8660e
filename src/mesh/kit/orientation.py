"""EXIF orientation: a phone stores a portrait photo sideways, with a tag saying how to turn it.

Every service treats an image as a viewer shows it: the thumbnail, the strip reader, image processing, and the
width and height the file service reports. Pillow's ``ImageOps.exif_transpose`` turns Pillow images;
:func:`orient` turns the NumPy arrays that OpenCV decodes, the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

ORIENTATION_TAG = 0x0112  # PIL.ExifTags.Base.Orientation
SIDEWAYS = frozenset({5, 6, 7, 8})


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image (1-8; 1 when absent or out of range).

    Read from what the header held: for a PNG without an early eXIf chunk, Pillow's ``getexif`` would decode
    the whole image to look for a late one."""
    if "exif" not in image.info:
        return 1
    value = image.getexif().get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


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
