"""The processor names the request's own fields in what it refuses about an input, whatever the input holds."""

from __future__ import annotations

import pytest

from mesh.common.v1 import image_pb2
from mesh.image.v1 import image_processing_service_pb2 as pb
from mesh.kit import errors
from mesh.services.image_processing import codec
from mesh.services.image_processing.cpu_backend import CpuBackend
from mesh.services.image_processing.processor import Processor
from tests.file.corpus import png_declaring
from tests.image_processing.fakes import MemoryStore

LIMITS = codec.Limits(max_pixels=1_000_000, max_bytes=8 * 1024 * 1024)


@pytest.mark.parametrize("where", ["input", "frame.image"], ids=["ProcessImage", "StreamProcess frame"])
async def test_a_malformed_image_id_is_named_as_the_requests_field_and_never_sent_on(where: str) -> None:
    """An image id that is no UUID, in ProcessImage's ``input`` or a stream frame's ``image``, was sent on to
    the file service, whose answer named its own field (``image_id``); it is refused here, naming
    ``input.image_id`` or ``frame.image.image_id``, and the file service is not called."""
    store = MemoryStore()
    processor = Processor(CpuBackend(), store=store, limits=LIMITS)
    try:
        with pytest.raises(errors.InvalidArgument) as info:
            await processor.process(image_pb2.ImageInput(image_id="abc"), [], pb.OutputSpec(), where=where)
    finally:
        processor.close()
    field = f"{where}.image_id"
    assert info.value.message.startswith(f"{field} 'abc' is not an image id; image ids are UUIDs")
    assert [v.field for v in info.value.field_violations] == [field]
    assert store.timeouts == []  # no call reached the file service


async def test_a_png_declaring_no_pixels_is_told_so_not_that_it_is_cut_off() -> None:
    """A whole PNG whose header declares 0x0 pixels was "truncated or damaged: its header cannot be read ...
    send the whole file"; it is told that it has no pixels, in the file service's words, naming
    ``input.encoded.data``."""
    processor = Processor(CpuBackend(), store=None, limits=LIMITS)
    source = image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=png_declaring(0, 0)))
    try:
        with pytest.raises(errors.InvalidData) as info:
            await processor.process(source, [], pb.OutputSpec())
    finally:
        processor.close()
    assert info.value.message.startswith("the PNG declares a size of 0x0 pixels; it has no pixels")
    assert [v.field for v in info.value.field_violations] == ["input.encoded.data"]
