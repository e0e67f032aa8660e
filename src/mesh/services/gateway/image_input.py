"""The image of a process or predict request: a stored image's id, or inline bytes spliced into the wire.

Both requests are sent already serialised (see :mod:`mesh.kit.wire`): a 1 MB image goes from the HTTP
body's chunks (or the decoded base64) into the bytes gRPC sends in one copy, where filling the message
and serialising it would copy it twice more.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh.image.v1 import image_processing_service_pb2 as image_pb
from mesh.inference.v1 import inference_service_pb2 as inference_pb
from mesh.kit import errors
from mesh.kit.wire import NestedBytesField

ImageRequest = image_pb.ProcessImageRequest | inference_pb.PredictRequest

_INLINE_IMAGE = {
    kind: NestedBytesField.of(kind, "input.encoded.data")
    for kind in (image_pb.ProcessImageRequest, inference_pb.PredictRequest)
}


def serialize_with_image(
    message: ImageRequest, image_id: str, inline: Sequence[bytes]
) -> tuple[bytes, dict[str, str | int]]:
    """``message`` serialised with exactly one of a stored image's id and the inline image (the
    concatenation of ``inline``'s chunks); also returns the span attributes that describe the image."""
    if bool(image_id) == any(inline):
        raise errors.InvalidArgument(
            "give exactly one of image_id and image",
            field_violations=[errors.FieldViolation("image_id", "exactly one of image_id and image")],
        )
    if image_id:
        message.input.image_id = image_id
        return message.SerializeToString(), {"mesh.image.id": image_id}
    data = _INLINE_IMAGE[type(message)].serialize(message, inline)
    return data, {"mesh.image.bytes": sum(len(chunk) for chunk in inline)}
