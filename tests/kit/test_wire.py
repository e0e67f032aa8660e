"""mesh.kit.wire: a request serialised around a large bytes field parses as protobuf's own message."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.common.v1 import image_pb2, params_pb2
from mesh.image.v1 import image_processing_service_pb2 as image_pb
from mesh.inference.v1 import inference_service_pb2 as inference_pb
from mesh.kit.wire import NestedBytesField, Parted, Spliced, serialize_reply, varint

IMAGE_DATA = NestedBytesField.of(inference_pb.PredictRequest, "input.encoded.data")


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (2**21, b"\x80\x80\x80\x01"),
    ],
)
def test_varint_is_base_128_little_endian(value: int, encoded: bytes) -> None:
    """Lengths and tags are encoded as protobuf's varints."""
    assert varint(value) == encoded


def test_varint_refuses_a_negative_length() -> None:
    """A negative length is a bug in the caller, not something to encode."""
    with pytest.raises(ValueError, match="negative"):
        varint(-1)


def test_the_path_is_read_from_the_descriptors() -> None:
    """Field numbers come from the generated descriptors: input = 3, encoded = 2, data = 1."""
    assert IMAGE_DATA.numbers == (3, 2, 1)
    assert NestedBytesField.of(image_pb.ProcessImageRequest, "input.encoded.data").names == (
        "input",
        "encoded",
        "data",
    )


@pytest.mark.parametrize(
    ("dotted", "why"),
    [
        ("input.encoded.nope", "no singular bytes field 'nope'"),
        ("model_name", "no singular bytes field 'model_name'"),
        ("input.image_id.data", "no singular message field 'image_id'"),
        ("parameters.data", "no singular message field 'parameters'"),
    ],
)
def test_a_path_that_does_not_end_in_a_bytes_field_is_refused(dotted: str, why: str) -> None:
    """Only singular messages down to a singular bytes field can be spliced."""
    with pytest.raises(ValueError, match=why):
        NestedBytesField.of(inference_pb.PredictRequest, dotted)


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=70_000),
    cuts=st.lists(st.integers(min_value=0, max_value=70_000), max_size=4),
    model=st.text(max_size=20),
    precheck=st.booleans(),
)
def test_spliced_request_parses_as_the_filled_message(
    data: bytes, cuts: list[int], model: str, precheck: bool
) -> None:
    """Whatever the image and however it is chunked, the receiver parses the message it would have got
    had the field been filled and the message serialised by protobuf."""
    bounds = sorted({0, len(data), *(min(cut, len(data)) for cut in cuts)})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    message = inference_pb.PredictRequest(model_name=model, request_id="r-1", precheck_only=precheck)
    message.parameters["min_confidence"].number_value = 0.5
    expected = inference_pb.PredictRequest()
    expected.CopyFrom(message)
    expected.input.encoded.data = data

    parsed = inference_pb.PredictRequest.FromString(IMAGE_DATA.serialize(message, chunks))

    assert parsed == expected
    assert parsed.input.WhichOneof("source") == "encoded"


def test_a_megabyte_image_crosses_the_two_byte_and_three_byte_length_boundaries() -> None:
    """Lengths of 1 MB need multi-byte varints at every level of nesting."""
    data = bytes(range(256)) * 4096
    message = image_pb.ProcessImageRequest(output=image_pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_PNG))
    field = NestedBytesField.of(image_pb.ProcessImageRequest, "input.encoded.data")

    parsed = image_pb.ProcessImageRequest.FromString(field.serialize(message, [data[:1000], data[1000:]]))

    assert parsed.input.encoded.data == data
    assert parsed.output.format == image_pb2.IMAGE_FORMAT_PNG


def test_a_message_that_already_names_an_image_is_refused() -> None:
    """Splicing an inline image after an image_id would leave the receiver to pick one silently."""
    message = inference_pb.PredictRequest(input=image_pb2.ImageInput(image_id="abc"))
    with pytest.raises(
        ValueError, match=r"'input.image_id' is already set; 'input.encoded.data' would replace it"
    ):
        IMAGE_DATA.serialize(message, [b"png"])


def test_a_message_of_another_type_is_refused() -> None:
    """The field numbers belong to one message type; another type would be corrupted silently."""
    with pytest.raises(TypeError, match="expected PredictRequest"):
        IMAGE_DATA.serialize(image_pb.ProcessImageRequest(), [b"png"])


def test_a_reply_merges_the_appended_pixels_with_the_fields_it_holds() -> None:
    """A raw reply keeps its width, height and channels in the message and its pixels beside it: protobuf
    merges the two occurrences of ``raw``, so the client parses one whole RawImage."""
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    message = image_pb.ProcessImageResponse(
        width=3, height=2, raw=image_pb2.RawImage(width=3, height=2, channels=3)
    )
    reply = Spliced(
        message, NestedBytesField.of(image_pb.ProcessImageResponse, "raw.pixels"), pixels.data.cast("B")
    )

    parsed = image_pb.ProcessImageResponse.FromString(serialize_reply(reply))

    expected = image_pb.ProcessImageResponse()
    expected.CopyFrom(message)
    expected.raw.pixels = pixels.tobytes()
    assert parsed == expected
    assert serialize_reply(message) == message.SerializeToString()


def test_appending_over_data_already_in_the_field_is_refused() -> None:
    """Two values for one bytes field would leave the receiver with the last one, silently."""
    message = image_pb.ProcessImageResponse(raw=image_pb2.RawImage(pixels=b"old"))
    with pytest.raises(ValueError, match=r"'raw\.pixels' already holds data"):
        NestedBytesField.of(image_pb.ProcessImageResponse, "raw.pixels").serialize(message, [b"new"])


RAW_INPUT = NestedBytesField.of(image_pb.ProcessImageRequest, "input.raw.pixels")


def _whole(parted: Parted[image_pb.ProcessImageRequest]) -> image_pb.ProcessImageRequest:
    message = image_pb.ProcessImageRequest()
    message.CopyFrom(parted.message)
    if parted.data is not None:
        message.input.raw.pixels = bytes(parted.data)
    return message


@settings(max_examples=80, deadline=None)
@given(
    pixels=st.binary(min_size=1, max_size=5_000),  # empty bytes are not on the wire at all
    width=st.integers(min_value=0, max_value=2**31 - 1),
    steps=st.lists(st.sampled_from(["invert", "grayscale", "flip"]), max_size=4),
    quality=st.integers(min_value=0, max_value=100),
    raw_first=st.booleans(),
)
def test_a_parted_request_is_the_message_protobuf_parses(
    pixels: bytes, width: int, steps: list[str], quality: int, raw_first: bool
) -> None:
    """Whatever the fields around them, the pixels come out as a view of the received bytes, and the
    message with them put back is the one protobuf parses from the same bytes."""
    raw = image_pb2.RawImage(pixels=pixels, width=width, height=3, channels=3)
    message = image_pb.ProcessImageRequest(
        pipeline=[params_pb2.PipelineStep(filter=name) for name in steps],
        output=image_pb.OutputSpec(quality=quality),
    )
    rest = message.SerializeToString()
    inner = image_pb.ProcessImageRequest(input=image_pb2.ImageInput(raw=raw)).SerializeToString()
    payload = inner + rest if raw_first else rest + inner

    parted = RAW_INPUT.parse(payload)

    assert parted.data is not None
    assert parted.data.obj is payload
    assert bytes(parted.data) == pixels
    assert not parted.message.input.raw.pixels
    assert parted.message.input.WhichOneof("source") == "raw"
    assert _whole(parted) == image_pb.ProcessImageRequest.FromString(payload)


@pytest.mark.parametrize(
    "payload",
    [
        image_pb.ProcessImageRequest(input=image_pb2.ImageInput(image_id="abc")).SerializeToString(),
        image_pb.ProcessImageRequest(
            input=image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=b"png"))
        ).SerializeToString(),
        # Two occurrences of input: protobuf merges them (the later raw wins over the image_id).
        image_pb.ProcessImageRequest(input=image_pb2.ImageInput(image_id="abc")).SerializeToString()
        + image_pb.ProcessImageRequest(
            input=image_pb2.ImageInput(raw=image_pb2.RawImage(pixels=b"\x01\x02\x03"))
        ).SerializeToString(),
        b"",
    ],
    ids=["image_id", "encoded", "input twice", "empty"],
)
def test_a_request_without_one_clear_raw_input_is_parsed_whole(payload: bytes) -> None:
    """Without the path, or with it more than once at some level, nothing is cut out: the message is the one
    protobuf parses (merges included) and ``data`` is None."""
    parted = RAW_INPUT.parse(payload)
    assert parted.data is None
    assert parted.message == image_pb.ProcessImageRequest.FromString(payload)


def test_malformed_bytes_raise_protobuf_s_own_error() -> None:
    """A truncated message is left to protobuf, which raises DecodeError as for any bad request."""
    payload = image_pb.ProcessImageRequest(
        input=image_pb2.ImageInput(raw=image_pb2.RawImage(pixels=b"x" * 100))
    ).SerializeToString()
    with pytest.raises(DecodeError):
        RAW_INPUT.parse(payload[:-10])


def test_a_raw_input_overridden_by_a_later_oneof_member_is_not_cut_out() -> None:
    """Within one ``input``, a raw image followed by an encoded one is the encoded one (the last member of a
    oneof wins): the pixels are not handed over as the input, and the message is protobuf's own. Found by
    fuzzing the parser against upb on mutated requests."""
    raw = image_pb2.ImageInput(raw=image_pb2.RawImage(pixels=b"\x01\x02\x03", width=1)).SerializeToString()
    encoded = image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=b"png")).SerializeToString()
    inner = raw + encoded
    number = image_pb.ProcessImageRequest.DESCRIPTOR.fields_by_name["input"].number
    payload = varint(number << 3 | 2) + varint(len(inner)) + inner  # one occurrence of input
    parted = RAW_INPUT.parse(payload)
    assert parted.data is None
    assert parted.message == image_pb.ProcessImageRequest.FromString(payload)
    assert parted.message.input.WhichOneof("source") == "encoded"


_FUZZ_BASE = image_pb.ProcessImageRequest(
    input=image_pb2.ImageInput(raw=image_pb2.RawImage(pixels=bytes(range(120)), width=10, channels=3)),
    pipeline=[params_pb2.PipelineStep(filter="invert")],
    output=image_pb.OutputSpec(quality=5),
).SerializeToString()


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, len(_FUZZ_BASE) - 1),
            st.sampled_from(["set", "cut", "put"]),
            st.binary(min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_parse_agrees_with_protobuf_on_mangled_bytes(edits: list[tuple[int, str, bytes]]) -> None:
    """On any bytes, parse gives protobuf's message (the handed-over pixels put back) or protobuf's
    DecodeError. A sample of mutated requests per run; the oneof case above took 200,000 mutations to turn
    up, so it has a test of its own."""
    payload = bytearray(_FUZZ_BASE)
    for position, edit, data in edits:
        position = min(position, len(payload))
        if edit == "set":
            payload[position : position + len(data)] = data
        elif edit == "cut":
            del payload[position : position + len(data)]
        else:
            payload[position:position] = data
    try:
        expected = image_pb.ProcessImageRequest.FromString(bytes(payload))
    except DecodeError:
        with pytest.raises(DecodeError):
            RAW_INPUT.parse(bytes(payload))
        return
    parted = RAW_INPUT.parse(bytes(payload))
    if parted.data is not None:
        assert not parted.message.input.raw.pixels
        assert parted.message.input.WhichOneof("source") == "raw"
    assert _whole(parted) == expected
    assert _whole(parted).input.WhichOneof("source") == expected.input.WhichOneof("source")
