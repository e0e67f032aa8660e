"""Whether a JPEG's image data is whole: one check for every service that takes JPEGs.

A JPEG cut short in its image data and given its end marker back (a truncated upload "repaired" by a tool, a
file copied off a card in the middle of a write) decodes without an error in Pillow and OpenCV: libjpeg only
warns "premature end of data segment" and fills the rows it never got with flat grey. Stored, it is an image
whose lower part is lost; read by the strip reader, it gets a confident wrong verdict. libjpeg-turbo through
simplejpeg, in its strict mode, turns that warning into an error. The check decodes at an eighth of the size
(the image data is still read whole, only the inverse transforms shrink): about 0.3 ms for a 1280x720 photo.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import simplejpeg

from mesh.kit.errors import FieldViolation, InvalidData

# libjpeg's warnings that say nothing of the image: stray bytes between segments, which cameras and editors
# write and every decoder skips.
_HARMLESS: Final = ("extraneous bytes before marker",)


def decode_jpeg(data: bytes, field: str | None, *, grey: bool) -> npt.NDArray[np.uint8]:
    """A YCbCr or greyscale JPEG's pixels, (height, width, 3) RGB or (height, width) grey, as stored (not turned
    by its EXIF orientation), decoded by libjpeg-turbo in the strict mode of :func:`check_jpeg_data` (refused
    alike). The same pixels as Pillow's decoder (both libjpeg-turbo, the same transform and upsampling) in half
    its time: a decoder that needs no separate check. Call it once the size is known to be within the limits."""
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if grey else "RGB", strict=True)
    except ValueError as error:
        _refuse(str(error), len(data), field)
        raise  # a header it cannot read: the caller's check refused it already
    image: npt.NDArray[np.uint8] = pixels[:, :, 0] if grey else pixels
    return image


def check_jpeg_data(data: bytes, field: str | None) -> None:
    """Refuse a JPEG whose image data ends early or is damaged: InvalidData naming ``field`` (where the request
    has one), which says to send the whole file. Call it once the image's size is known to be within the
    limits (it decodes at an eighth of that size). A header the check cannot read is left to the caller's
    decoder, which says what is wrong with it in its own words."""
    try:
        _, _, colour_space, _ = simplejpeg.decode_jpeg_header(data)
        simplejpeg.decode_jpeg(
            data,
            colorspace="CMYK" if colour_space == "CMYK" else "GRAY",
            min_height=1,
            min_width=1,
            strict=True,
        )
    except ValueError as error:
        _refuse(str(error), len(data), field)


def _refuse(message: str, size: int, field: str | None) -> None:
    lowered = message.lower()
    if "premature end" in lowered:
        # Damaged data reads the same: the decoder loses its way and runs out of data before the last row.
        raise InvalidData(
            f"the JPEG image is truncated or damaged: its image data ends before its last row ({size} bytes); "
            "send the whole file",
            field_violations=[FieldViolation(field, "a complete JPEG file")] if field else (),
            metadata={"problem": "truncated"},
        )
    if lowered.startswith("corrupt jpeg data") and not any(harmless in lowered for harmless in _HARMLESS):
        raise InvalidData(
            f"the JPEG image is damaged: {message.rstrip('.')}; send the file again as it was made",
            field_violations=[FieldViolation(field, "an undamaged JPEG file")] if field else (),
            metadata={"problem": "corrupt"},
        )
