"""Image ids: what the file service accepts as one, for itself and for the services that take an image id in
their own requests (they check it before asking, so that an error names their field, ``input.image_id``, not
the file service's). Nothing here pulls in the file service's storage or metrics."""

from __future__ import annotations

import uuid

from mesh.kit import errors


def parse_image_id(value: str, field_name: str = "image_id") -> uuid.UUID:
    """The UUID in ``value``; InvalidArgument naming the field when it is not one."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError):
        raise errors.InvalidArgument(
            f"{field_name} {value[:80]!r} is not an image id; image ids are UUIDs "
            "such as 0b6f1d2e-6c1a-4c55-9d0e-3f2a1b4c5d6e",
            field_violations=[errors.FieldViolation(field_name, "must be a UUID")],
        ) from None
