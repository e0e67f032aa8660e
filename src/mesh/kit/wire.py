"""A protobuf request serialised around one large bytes field that arrives in pieces.

Assigning a bytes value to a upb message copies it, and serialising copies it again; with the join of an
HTTP body's chunks that is three copies of a 1 MB image on the gateway's hot path. The wire format makes a
message the concatenation of its fields, so the request is serialised without the large field and the
field's encoding is appended: one join, from the chunks straight to the bytes that gRPC sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_LENGTH_DELIMITED = 2


def varint(value: int) -> bytes:
    """``value`` (non-negative) as a base-128 varint."""
    if value < 0:
        raise ValueError("a length is never negative")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@dataclass(frozen=True)
class NestedBytesField:
    """A bytes field reached through singular message fields (``input.encoded.data`` of a request)."""

    message_type: type[Message]
    names: tuple[str, ...]
    numbers: tuple[int, ...]

    @classmethod
    def of(cls, message_type: type[Message], dotted: str) -> NestedBytesField:
        """The field ``dotted`` of ``message_type``: every field on the way a singular message, the last a
        singular bytes field (ValueError otherwise)."""
        descriptor = message_type.DESCRIPTOR
        names = tuple(dotted.split("."))
        numbers: list[int] = []
        for depth, name in enumerate(names):
            field = descriptor.fields_by_name.get(name)
            last = depth == len(names) - 1
            wanted = FieldDescriptor.TYPE_BYTES if last else FieldDescriptor.TYPE_MESSAGE
            if field is None or field.type != wanted or field.is_repeated:
                kind = "bytes" if last else "message"
                raise ValueError(f"{descriptor.full_name} has no singular {kind} field {name!r}")
            numbers.append(field.number)
            if not last:
                inner = field.message_type
                assert inner is not None  # a message field always has its type
                descriptor = inner
        return cls(message_type, names, tuple(numbers))

    def serialize(self, message: Message, chunks: Sequence[bytes]) -> bytes:
        """``message`` serialised with this field holding the concatenation of ``chunks``.

        ``message`` must leave the outermost field of the path unset: its other fields would be merged with
        the appended ones (and a oneof sibling silently replaced).
        """
        if not isinstance(message, self.message_type):
            raise TypeError(f"expected {self.message_type.__name__}, got {type(message).__name__}")
        if message.HasField(self.names[0]):
            raise ValueError(f"{self.names[0]!r} is already set on the message")
        length = sum(len(chunk) for chunk in chunks)
        headers: list[bytes] = []
        for number in reversed(self.numbers):
            header = varint(number << 3 | _LENGTH_DELIMITED) + varint(length)
            headers.append(header)
            length += len(header)
        return b"".join([message.SerializeToString(), *reversed(headers), *chunks])
