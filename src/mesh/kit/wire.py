"""A protobuf message serialised around one large bytes field, which is appended rather than copied in.

Assigning a bytes value to a upb message copies it, and serialising copies it again; with the join of an
HTTP body's chunks that is three copies of a 1 MB image on the gateway's hot path, and on the image service
a raw reply's pixels were copied out of their array, into the message and twice more by serialisation. The
wire format makes a message the concatenation of its fields, so the message is serialised without the large
field and the field's encoding is appended: one join, from the chunks (or an array's memory) straight to the
bytes that gRPC sends. A receiver parses the message that protobuf itself would have written.

The receiving side is the mirror image: :meth:`NestedBytesField.parse` walks the wire to the field, parses
the message without it and hands its data over as a view of the received bytes, where upb would copy it once
on parsing and again on every read of the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5

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


M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Parted(Generic[M]):
    """A received message and, when it was left out of the message, the data of its large bytes field as a
    view of the received bytes (None: read the field from the message as usual)."""

    message: M
    data: memoryview | None


@dataclass(frozen=True)
class NestedBytesField(Generic[M]):
    """A bytes field reached through singular message fields (``input.encoded.data`` of a request)."""

    message_type: type[M]
    names: tuple[str, ...]
    numbers: tuple[int, ...]

    @staticmethod
    def of(message_type: type[M], dotted: str) -> NestedBytesField[M]:
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
        return NestedBytesField(message_type, names, tuple(numbers))

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

    def parse(self, payload: bytes) -> Parted[M]:
        """``payload`` parsed as the message type, with this field's data left out of the message and handed
        over as a view of ``payload``.

        Where the path is absent, or occurs more than once at some level (the parser would merge the
        occurrences), the payload is parsed whole and ``data`` is None. A payload that is not well-formed is
        also parsed whole, so that protobuf raises its own DecodeError.
        """
        view = memoryview(payload)
        try:
            cut = _cut(view, self.numbers)
        except _Malformed:
            cut = None
        if cut is not None:
            rest, data = cut
            message = self.message_type.FromString(rest)
            if self._selected(message):
                return Parted(message, data)
            # A later member of a oneof on the path took its place: the field is not what the message holds.
        return Parted(self.message_type.FromString(payload), None)

    def _selected(self, message: Message) -> bool:
        """Whether every message on the path is present and chosen in its oneof, if it is in one."""
        current = message
        for depth, name in enumerate(self.names):
            oneof = current.DESCRIPTOR.fields_by_name[name].containing_oneof
            if oneof is not None and current.WhichOneof(oneof.name) != name:
                return False
            if depth < len(self.names) - 1:
                if not current.HasField(name):
                    return False
                current = getattr(current, name)
        return True

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
class Spliced(Generic[M]):
    """A reply to send with ``field`` holding ``data``, which is appended at serialisation instead of being
    copied into ``message`` (see the module's docstring)."""

    message: M
    field: NestedBytesField[M]
    data: Chunk
    after: Callable[[], None] | None = None
    """Called once the reply is serialised, when ``data`` is no longer needed (to give back what holds it)."""

    def serialize(self) -> bytes:
        try:
            return self.field.serialize(self.message, [self.data])
        finally:
            if self.after is not None:
                self.after()


def serialize_reply(reply: Message | Spliced[Any]) -> bytes:
    """The response serializer of a method whose handler may answer with a :class:`Spliced` message."""
    return reply.serialize() if isinstance(reply, Spliced) else reply.SerializeToString()


class _Malformed(Exception):
    """The bytes are not a well-formed protobuf message."""


def _read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(buffer) or shift > 63:
            raise _Malformed
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _fields(buffer: memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """Each field of a serialised message: number, wire type, start of its tag, start and end of its value."""
    position = 0
    while position < len(buffer):
        start = position
        key, position = _read_varint(buffer, position)
        number, wire_type = key >> 3, key & 7
        value_start = position
        if wire_type == _VARINT:
            _, position = _read_varint(buffer, position)
        elif wire_type == _FIXED64:
            position += 8
        elif wire_type == _LENGTH_DELIMITED:
            length, value_start = _read_varint(buffer, position)
            position = value_start + length
        elif wire_type == _FIXED32:
            position += 4
        else:  # groups: never written by proto3
            raise _Malformed
        if position > len(buffer) or number == 0:
            raise _Malformed
        yield number, wire_type, start, value_start, position


def _cut(buffer: memoryview, numbers: Sequence[int]) -> tuple[bytes, memoryview] | None:
    """``buffer`` without the field at the path ``numbers``, and that field's value; None unless the path
    occurs exactly once at every level."""
    found = [field for field in _fields(buffer) if field[0] == numbers[0]]
    if len(found) != 1 or found[0][1] != _LENGTH_DELIMITED:
        return None
    number, _, start, value_start, end = found[0]
    value = buffer[value_start:end]
    if len(numbers) == 1:
        return b"".join((buffer[:start], buffer[end:])), value
    inner = _cut(value, numbers[1:])
    if inner is None:
        return None
    rest, data = inner
    header = varint(number << 3 | _LENGTH_DELIMITED) + varint(len(rest))
    return b"".join((buffer[:start], header, rest, buffer[end:])), data
