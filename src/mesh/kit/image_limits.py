"""The size limits every service that takes images applies, told in the same words (HTTP 413)."""

from __future__ import annotations

from mesh.kit import errors


def too_many_pixels(width: int, height: int, max_pixels: int, field: str) -> errors.PayloadTooLarge:
    """The refusal of a ``width`` x ``height`` image over ``max_pixels``, naming its size, the limit and
    ``field``."""
    return errors.PayloadTooLarge(
        f"{field} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        field_violations=[errors.FieldViolation(field, f"at most {max_pixels} pixels")],
    )


def check_pixels(width: int, height: int, max_pixels: int, field: str) -> None:
    """PayloadTooLarge when ``width`` x ``height`` exceeds ``max_pixels``."""
    if width * height > max_pixels:
        raise too_many_pixels(width, height, max_pixels, field)


def check_bytes(size: int, max_bytes: int, field: str) -> None:
    """PayloadTooLarge when an input of ``size`` bytes exceeds ``max_bytes``."""
    if size > max_bytes:
        raise errors.PayloadTooLarge(
            f"{field} has {size} bytes; the limit is {max_bytes}",
            field_violations=[errors.FieldViolation(field, f"at most {max_bytes} bytes")],
        )
