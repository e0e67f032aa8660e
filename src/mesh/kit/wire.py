"""A protobuf message serialised around one large bytes field, which is appended rather than copied in.

Assigning a bytes value to a upb message copies it, and serialising copies it again; with the join of an
HTTP body's chunks that is three copies of a 1 MB image on the gateway's hot path, and on the image service
a raw reply's pixels were copied out of their array, into the message and twice more by serialisation. The
wire format makes a message the concatenation of its fields, so the message is serialised without the large
field and the field's encoding is appended: one join, from the chunks (or an array's memory) straight to the
bytes that gRPC sends. A receiver parses the message that protobuf itself would have written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_LENGTH_DELIMITED = 2

# What a chunk may be: bytes, or a one-dimensional byte view of other memory (an array's, via cast("B")).
Chunk: TypeAlias = bytes | memoryview


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

    @property
    def dotted(self) -> str:
        return ".".join(self.names)

    def serialize(self, message: Message, chunks: Sequence[Chunk]) -> bytes:
        """``message`` serialised with this field holding the concatenation of ``chunks``.

        Messages on the path that ``message`` already holds keep their other fields: protobuf merges two
        occurrences of a message field, so a reply's ``raw`` keeps its width and height beside the appended
        pixels. Refused (ValueError) where the receiver would silently get something else: the bytes field
        already holding data, or another member of a oneof on the path set (the appended one replaces it).
        """
        if not isinstance(message, self.message_type):
            raise TypeError(f"expected {self.message_type.__name__}, got {type(message).__name__}")
        self._check_room(message)
        length = sum(len(chunk) for chunk in chunks)
        headers: list[bytes] = []
        for number in reversed(self.numbers):
            header = varint(number << 3 | _LENGTH_DELIMITED) + varint(length)
            headers.append(header)
            length += len(header)
        return b"".join([message.SerializeToString(), *reversed(headers), *chunks])

    def _check_room(self, message: Message) -> None:
        current = message
        for depth, name in enumerate(self.names):
            field = current.DESCRIPTOR.fields_by_name[name]
            oneof = field.containing_oneof
            chosen = current.WhichOneof(oneof.name) if oneof is not None else None
            if chosen not in (None, name):
                taken = ".".join((*self.names[:depth], str(chosen)))
                raise ValueError(f"{taken!r} is already set; {self.dotted!r} would replace it")
            if depth == len(self.names) - 1:
                if getattr(current, name):
                    raise ValueError(f"{self.dotted!r} already holds data")
            elif not current.HasField(name):
                return
            else:
                current = getattr(current, name)


@dataclass(frozen=True)
class Spliced:
    """A reply to send with ``field`` holding ``data``, which is appended at serialisation instead of being
    copied into ``message`` (see the module's docstring)."""

    message: Message
    field: NestedBytesField
    data: Chunk

    def serialize(self) -> bytes:
        return self.field.serialize(self.message, [self.data])


def serialize_reply(reply: Message | Spliced) -> bytes:
    """The response serializer of a method whose handler may answer with a :class:`Spliced` message."""
    return reply.serialize() if isinstance(reply, Spliced) else reply.SerializeToString()
