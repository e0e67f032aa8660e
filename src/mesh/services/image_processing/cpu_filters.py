"""The CPU implementation of every filter: OpenCV and vectorised NumPy, no per-pixel Python.

Each function takes an image as (height, width, channels) and a validated step and returns a new image in
the same layout. These are also the reference the GPU backend is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import numpy.typing as npt

from mesh.kit import errors
from mesh.services.image_processing import filter_math as fm
from mesh.services.image_processing.filter_math import Image, as_image, max_value
from mesh.services.image_processing.registry import Step

CV_BORDERS = {
    "reflect": cv2.BORDER_REFLECT_101,
    "clamp": cv2.BORDER_REPLICATE,
    "constant": cv2.BORDER_CONSTANT,
}


def _with_border(image: Image, radius: int, border: str, blur: Callable[[Image, int], Image]) -> Image:
    """Apply ``blur`` with the named border; OpenCV filters cannot wrap, so wrap pads and crops."""
    if border != "wrap":
        return as_image(blur(image, CV_BORDERS[border]))
    height, width = image.shape[:2]
    if radius >= height or radius >= width:
        # Tiling a kernel wider than the image: pad by whole repeats with NumPy.
        padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="wrap")
    else:
        padded = as_image(cv2.copyMakeBorder(image, radius, radius, radius, radius, cv2.BORDER_WRAP))
    out = as_image(blur(padded, cv2.BORDER_REFLECT_101))
    return np.ascontiguousarray(out[radius : radius + height, radius : radius + width])


def grayscale(image: Image, step: Step) -> Image:
    """Grey from RGB(A) with the step's method; grey input is returned unchanged."""
    channels = image.shape[2]
    if channels == 1:
        return image.copy()
    return grey_of(image, step.as_str("method"))


def grey_of(image: Image, method: str) -> Image:
    """Grey from RGB(A): BT.601 by cvtColor; other weighted sums round half to even, like ``cv2.transform``."""
    channels = image.shape[2]
    if method == "bt601":
        code = cv2.COLOR_RGBA2GRAY if channels == 4 else cv2.COLOR_RGB2GRAY
        return as_image(cv2.cvtColor(image, code))
    if method == "lightness":
        rgb = image[:, :, :3]
        high = np.max(rgb, axis=2)
        low = np.min(rgb, axis=2)
        return as_image(cv2.addWeighted(high, 0.5, low, 0.5, 0.0))
    if method == "average":
        weights = np.array([[1 / 3, 1 / 3, 1 / 3]], dtype=np.float64)
    else:
        weights = np.array([fm.GRAY_WEIGHTS[method]], dtype=np.float64) / (1 << fm.GRAY_SHIFT)
    if channels == 4:
        weights = np.hstack([weights, np.zeros((1, 1))])
    return as_image(cv2.transform(image, weights))


def apply_lut(image: Image, lut: Image) -> Image:
    """Map every colour sample through ``lut``; alpha is left unchanged."""
    channels = image.shape[2]
    if image.dtype == np.uint8:
        if channels == 4:
            identity = np.arange(256, dtype=np.uint8)
            table = np.stack([lut, lut, lut, identity], axis=1).reshape(256, 1, 4)
            return as_image(cv2.LUT(image, table))
        return as_image(cv2.LUT(image, lut))
    out: Image = np.take(lut, image)
    if channels == 4:
        out[:, :, 3] = image[:, :, 3]
    return out


def invert(image: Image, step: Step) -> Image:
    """max - x on the colour channels."""
    out = as_image(cv2.bitwise_not(image))
    if image.shape[2] == 4:
        out[:, :, 3] = image[:, :, 3]
    return out


def adjust(image: Image, step: Step) -> Image:
    """Brightness, contrast and gamma through one lookup table."""
    lut = fm.adjust_lut(
        image.dtype, step.as_float("brightness"), step.as_float("contrast"), step.as_float("gamma")
    )
    return apply_lut(image, lut)


def gaussian_blur(image: Image, step: Step) -> Image:
    """Separable Gaussian with OpenCV's coefficients."""
    sigma = step.as_float("sigma")
    ksize = fm.gaussian_ksize(sigma, step.as_int("ksize"))
    return _with_border(
        image,
        ksize // 2,
        step.as_str("border"),
        lambda img, border: cv2.GaussianBlur(img, (ksize, ksize), sigma, sigmaY=sigma, borderType=border),
    )


def box_blur(image: Image, step: Step) -> Image:
    """Normalised box filter."""
    ksize = step.as_int("ksize")
    return _with_border(
        image,
        ksize // 2,
        step.as_str("border"),
        lambda img, border: cv2.blur(img, (ksize, ksize), borderType=border),
    )


def median(image: Image, step: Step) -> Image:
    """Median of the 3x3 or 5x5 window."""
    return as_image(cv2.medianBlur(image, step.as_int("ksize")))


def unsharp_mask(image: Image, step: Step) -> Image:
    """image + amount * (image - blurred), where |image - blurred| >= threshold."""
    sigma, amount = step.as_float("sigma"), step.as_float("amount")
    ksize = fm.gaussian_ksize(sigma, 0)
    blurred = as_image(cv2.GaussianBlur(image, (ksize, ksize), sigma, borderType=cv2.BORDER_REFLECT_101))
    sharpened = as_image(cv2.addWeighted(image, 1.0 + amount, blurred, -amount, 0.0))
    threshold = step.as_int("threshold")
    if threshold == 0:
        return sharpened
    small = as_image(cv2.absdiff(image, blurred)) < threshold
    return np.where(small, image, sharpened)


def sobel(image: Image, step: Step) -> Image:
    """|dx|, |dy| or sqrt(dx^2 + dy^2) per channel, rounded and saturated."""
    ksize = step.as_int("ksize")
    direction = step.as_str("direction")
    border = cv2.BORDER_REFLECT_101
    # Float work arrays are 4 bytes a sample: every one is computed in place where it can be, so that the step
    # holds two of them at most (registry's working memory for sobel counts them).
    if direction == "magnitude":
        values = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=ksize, borderType=border)
        dy = cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=ksize, borderType=border)
        cv2.magnitude(values, dy, values)
        del dy
    else:
        order = (1, 0) if direction == "x" else (0, 1)
        values = cv2.Sobel(image, cv2.CV_32F, *order, ksize=ksize, borderType=border)
    if image.dtype == np.uint8:
        return as_image(cv2.convertScaleAbs(values))
    np.abs(values, out=values)
    np.rint(values, out=values)
    np.clip(values, 0, 65535, out=values)
    return as_image(values.astype(np.uint16))


def to_grey(image: Image) -> Image:
    """BT.601 grey (for filters that work on one channel)."""
    if image.shape[2] == 1:
        return image
    return grey_of(image, "bt601")


def canny(image: Image, step: Step) -> Image:
    """Canny edges of the grey image."""
    grey = to_grey(image)
    eight = grey if grey.dtype == np.uint8 else (grey >> 8).astype(np.uint8)
    edges = cv2.Canny(
        eight,
        step.as_float("low"),
        step.as_float("high"),
        apertureSize=step.as_int("aperture"),
        L2gradient=step.as_bool("l2_gradient"),
    )
    if image.dtype == np.uint16:
        edges = edges.astype(np.uint16) * 257
    return as_image(edges)


def histogram(channel: Image) -> npt.NDArray[np.int64]:
    """Counts of every sample value of one channel."""
    top = max_value(channel.dtype)
    if channel.dtype == np.uint8:
        return cv2.calcHist([channel], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return np.bincount(channel.ravel(), minlength=top + 1)


def threshold(image: Image, step: Step) -> Image:
    """binary / Otsu / adaptive on the grey image; outputs 0 and the maximum value."""
    grey = to_grey(image)
    top = max_value(grey.dtype)
    invert_out = step.as_bool("invert")
    method = step.as_str("method")
    if method == "adaptive":
        block = step.as_int("block_size")
        if grey.dtype == np.uint8:
            kind = cv2.THRESH_BINARY_INV if invert_out else cv2.THRESH_BINARY
            mean_c = cv2.ADAPTIVE_THRESH_MEAN_C
            return as_image(cv2.adaptiveThreshold(grey, top, mean_c, kind, block, step.as_int("c")))
        mean = as_image(cv2.blur(grey, (block, block), borderType=cv2.BORDER_REPLICATE | cv2.BORDER_ISOLATED))
        above = grey.astype(np.int32) > mean.astype(np.int32) - step.as_int("c")
        if invert_out:
            above = ~above
        return (above * top).astype(grey.dtype)
    value = step.as_float("value") if method == "binary" else float(otsu_level(grey))
    kind = cv2.THRESH_BINARY_INV if invert_out else cv2.THRESH_BINARY
    _, out = cv2.threshold(grey, value, top, kind)
    return as_image(out)


def otsu_level(grey: Image) -> int:
    """Otsu's threshold of a grey image."""
    return fm.otsu_threshold(histogram(grey[:, :, 0]))


INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


def resize(image: Image, step: Step) -> Image:
    """Scale to the step's size with the step's interpolation."""
    height, width = fm.resize_shape(image.shape[0], image.shape[1], step)
    mode = INTERPOLATIONS[step.as_str("interpolation")]
    return as_image(cv2.resize(image, (width, height), interpolation=mode))


def crop(image: Image, step: Step) -> Image:
    """The rectangle (x, y, width, height); 0 sizes run to the edge."""
    bounds = fm.crop_bounds(image.shape[0], image.shape[1], step)
    top, bottom, left, right = bounds
    return np.ascontiguousarray(image[top:bottom, left:right])


ROTATE_CODES = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


def rotate(image: Image, step: Step) -> Image:
    """Right angles by transposition; other angles by an affine warp with zero fill."""
    angle = step.as_float("angle")
    turns = fm.right_angle_turns(angle, image.shape[0], image.shape[1], step.as_bool("expand"))
    if turns is not None:
        return image.copy() if turns == 0 else as_image(cv2.rotate(image, ROTATE_CODES[turns]))
    matrix, out_w, out_h = fm.rotation(image.shape[0], image.shape[1], angle, step.as_bool("expand"))
    mode = cv2.INTER_NEAREST if step.as_str("interpolation") == "nearest" else cv2.INTER_LINEAR
    return as_image(
        cv2.warpAffine(
            image, matrix, (out_w, out_h), flags=mode, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
    )


FLIP_CODES = {"horizontal": 1, "vertical": 0, "both": -1}


def flip(image: Image, step: Step) -> Image:
    """Mirror horizontally, vertically or both."""
    return as_image(cv2.flip(image, FLIP_CODES[step.as_str("direction")]))


def equalize(image: Image, step: Step) -> Image:
    """Global histogram equalisation or CLAHE, per colour channel (alpha kept)."""
    planes: list[Image] = list(cv2.split(image))
    colours = min(len(planes), 3)
    if step.as_str("method") == "clahe":
        tiles = step.as_int("tiles")
        clahe = cv2.createCLAHE(clipLimit=step.as_float("clip_limit"), tileGridSize=(tiles, tiles))
        planes[:colours] = [clahe.apply(plane) for plane in planes[:colours]]
    elif image.dtype == np.uint8:
        planes[:colours] = [cv2.equalizeHist(plane) for plane in planes[:colours]]
    else:
        planes[:colours] = [np.take(fm.equalize_lut(histogram(p), image.dtype), p) for p in planes[:colours]]
    return as_image(cv2.merge(planes))


def convert_color(image: Image, step: Step) -> Image:
    """RGB <-> HSV (8-bit: full 0..255 hue) or a channel swap to BGR."""
    if image.shape[2] == 1:
        raise step.invalid("conversion", "needs an RGB or RGBA image, got one channel")
    conversion = step.as_str("conversion")
    rgb = image[:, :, :3]
    if conversion == "rgb_to_bgr":
        out = np.ascontiguousarray(rgb[:, :, ::-1])
    elif image.dtype == np.uint8:
        code = cv2.COLOR_RGB2HSV_FULL if conversion == "rgb_to_hsv" else cv2.COLOR_HSV2RGB_FULL
        out = cv2.cvtColor(np.ascontiguousarray(rgb), code)
    else:
        out = _convert_16(np.ascontiguousarray(rgb), conversion)
    if image.shape[2] == 4:
        out = np.dstack([out, image[:, :, 3]])
    return as_image(out)


def _convert_16(rgb: Image, conversion: str) -> Image:
    """16-bit HSV through float32 (OpenCV has no 16-bit HSV); hue 0..360 maps to 0..65535. Scaled and rounded in
    place: two float arrays at most at once (registry's working memory for convert_color counts them)."""
    scale = np.float32(1.0 / 65535.0)
    values = rgb.astype(np.float32)
    if conversion == "rgb_to_hsv":
        values *= scale
        converted: Image = cv2.cvtColor(values, cv2.COLOR_RGB2HSV)
        converted *= np.array([65535.0 / 360.0, 65535.0, 65535.0], dtype=np.float32)
    else:
        values *= np.array([360.0 / 65535.0, scale, scale], dtype=np.float32)
        converted = cv2.cvtColor(values, cv2.COLOR_HSV2RGB)
        np.multiply(converted, np.float32(65535.0), out=converted)
    del values
    np.rint(converted, out=converted)
    np.clip(converted, 0, 65535, out=converted)
    return converted.astype(np.uint16)


FilterFn = Callable[[Image, Step], Image]

CPU_FILTERS: dict[str, FilterFn] = {
    "grayscale": grayscale,
    "gaussian_blur": gaussian_blur,
    "box_blur": box_blur,
    "median": median,
    "unsharp_mask": unsharp_mask,
    "sobel": sobel,
    "canny": canny,
    "threshold": threshold,
    "resize": resize,
    "crop": crop,
    "rotate": rotate,
    "flip": flip,
    "adjust": adjust,
    "invert": invert,
    "equalize": equalize,
    "convert_color": convert_color,
}


def apply(image: Image, step: Step) -> Image:
    """Run one step on the CPU."""
    try:
        return CPU_FILTERS[step.filter](image, step)
    except cv2.error as error:
        raise errors.InvalidArgument(
            f"pipeline[{step.index}] ({step.filter}) cannot process a {image.shape[1]}x{image.shape[0]}x"
            f"{image.shape[2]} {image.dtype} image: {error.msg if hasattr(error, 'msg') else error}",
            field_violations=[
                errors.FieldViolation(f"pipeline[{step.index}].filter", "unsupported for this image")
            ],
        ) from None
