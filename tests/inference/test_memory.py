"""The memory of decoded images: each version's requests hold at most ``max_image_memory_mb`` of them at once,
taken from the header's size before decoding and given back when the request's batch is done."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from mesh.common.v1 import image_pb2
from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.kit.errors import DeadlineExceeded, InvalidData, PayloadTooLarge, ResourceExhausted
from mesh.kit.orientation import ORIENTATION_TAG
from mesh.services.inference.images import ImageDecoder, Pixels
from mesh.services.inference.predictor import HEADER_PREFIX_BYTES, Predictor
from mesh.services.inference.repository import ModelRepository
from tests.inference.fakes import FakeFactory, write_model


class CountingDecoder(ImageDecoder):
    """Counts the images it decodes."""

    def __init__(self) -> None:
        super().__init__(max_pixels=10_000_000)
        self.decoded = 0

    def decode_encoded(self, data: bytes, *args: object, **kwargs: object) -> Pixels:
        self.decoded += 1
        return super().decode_encoded(data, *args, **kwargs)  # type: ignore[arg-type]


def png_request(side: int, value: int = 200) -> pb.PredictRequest:
    """A uniform RGB PNG of ``side`` x ``side`` pixels (``side``² x 3 bytes decoded, a few hundred encoded)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    image = image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=buffer.getvalue()))
    return pb.PredictRequest(model_name="fake", input=image)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Predictor, CountingDecoder, FakeFactory]]:
    """The fake model with 1 MiB for decoded images: one 500x500 RGB image (0.72 MiB) at a time."""
    write_model(tmp_path, max_image_memory_mb=1, max_batch_size=4, max_queue_delay_ms=0)
    factory = FakeFactory()
    repository = ModelRepository(tmp_path, factories={"fake": factory})
    await repository.load()
    decoder = CountingDecoder()
    yield Predictor(repository, decoder), decoder, factory
    await repository.close()


async def test_an_image_larger_than_the_budget_is_refused_before_it_is_decoded(
    served: tuple[Predictor, CountingDecoder, FakeFactory],
) -> None:
    """Its size is read from the header: RESOURCE_EXHAUSTED (413) naming its size and the budget, and not a
    pixel decoded (8 small PNGs of 6300x6300 pixels decoded at once took the service from 0.8 to 4.5 GB)."""
    predictor, decoder, _ = served
    with pytest.raises(
        PayloadTooLarge,
        match=r"input\.encoded\.data \(700x700, 3 channels\) takes 1\.4 MiB decoded; "
        r"fake-v1 holds at most 1\.0 MiB of decoded images at once",
    ):
        await predictor.predict(png_request(700))
    assert decoder.decoded == 0
    assert predictor.repository.get("fake").stats.failures_by_reason == {"RESOURCE_EXHAUSTED": 1}


async def test_an_image_whose_header_is_longer_than_the_prefix_read_on_the_loop_is_sized_too(
    served: tuple[Predictor, CountingDecoder, FakeFactory],
) -> None:
    """A PNG with 100 kB of metadata before its pixels is sized from the whole file (in a thread), and refused
    undecoded as well."""
    request = png_request(700)
    data = request.input.encoded.data
    padding = PngImagePlugin.PngInfo()
    padding.add_text("comment", "x" * 100_000)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format="PNG", pnginfo=padding)
    assert buffer.getvalue().index(b"IDAT") > HEADER_PREFIX_BYTES
    request.input.encoded.data = buffer.getvalue()
    predictor, decoder, _ = served
    with pytest.raises(PayloadTooLarge, match=r"\(700x700, 3 channels\) takes 1\.4 MiB"):
        await predictor.predict(request)
    assert decoder.decoded == 0


async def test_an_exif_turned_image_is_sized_as_the_decoder_turns_it(
    served: tuple[Predictor, CountingDecoder, FakeFactory],
) -> None:
    """A portrait photo stored sideways (800x500, EXIF orientation 6) is described at the 500x800 the decoder
    turns it to, as its pixels will be; the refusal named the stored 800x500."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    buffer = io.BytesIO()
    Image.fromarray(np.full((500, 800, 3), 200, dtype=np.uint8)).save(
        buffer, format="JPEG", exif=exif.tobytes()
    )
    request = png_request(1)
    request.input.encoded.data = buffer.getvalue()
    predictor, decoder, _ = served
    with pytest.raises(PayloadTooLarge, match=r"input\.encoded\.data \(500x800, 3 channels\) takes 1\.1 MiB"):
        await predictor.predict(request)
    assert decoder.decoded == 0


async def test_an_image_that_does_not_fit_waits_undecoded_until_a_batch_gives_memory_back(
    served: tuple[Predictor, CountingDecoder, FakeFactory],
) -> None:
    """While one image's batch computes, a second that does not fit beside it is not decoded; it is, and
    answered, once that batch is done; then every byte is given back."""
    predictor, decoder, factory = served
    gate = factory.built[0].release = threading.Event()
    first = asyncio.ensure_future(predictor.predict(png_request(500)))
    second = asyncio.ensure_future(predictor.predict(png_request(500, 50)))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if factory.built[0].batches:
            break
    await asyncio.sleep(0.05)
    assert decoder.decoded == 1
    _, scheduler = predictor.repository.get("fake").require_ready()
    assert scheduler.memory.held == 500 * 500 * 3
    gate.set()
    answers = await asyncio.gather(first, second)
    assert [a.strip_reading.verdict for a in answers] == [pb.VERDICT_POSITIVE, pb.VERDICT_NEGATIVE]
    assert factory.built[0].batches == [("predict", 1), ("predict", 1)]
    assert scheduler.memory.held == 0


async def test_waiting_for_memory_ends_at_the_deadline(
    served: tuple[Predictor, CountingDecoder, FakeFactory],
) -> None:
    """A request still waiting for memory when its deadline passes gets DEADLINE_EXCEEDED naming what it waited
    for, undecoded; the memory is whole again afterwards, failures included."""
    predictor, decoder, factory = served
    gate = factory.built[0].release = threading.Event()
    first = asyncio.ensure_future(predictor.predict(png_request(500)))
    await asyncio.sleep(0.05)
    with pytest.raises(
        DeadlineExceeded, match=r"waiting for memory to decode input\.encoded\.data \(500x500"
    ):
        await predictor.predict(png_request(500), deadline=time.monotonic() + 0.1)
    assert decoder.decoded == 1
    gate.set()
    await first
    with pytest.raises(InvalidData):  # decoded, then refused: smaller than the model reads
        await predictor.predict(png_request(2))
    _, scheduler = predictor.repository.get("fake").require_ready()
    assert scheduler.memory.held == 0
    assert scheduler.memory.waiting == 0


def raw_request(side: int) -> pb.PredictRequest:
    """A uniform RGB raw frame of ``side`` x ``side`` pixels (``side``² x 3 bytes, carried and decoded alike)."""
    raw = image_pb2.RawImage(
        pixels=bytes([200]) * (side * side * 3),
        width=side,
        height=side,
        channels=3,
        pixel_type=image_pb2.PIXEL_TYPE_UINT8,
    )
    return pb.PredictRequest(model_name="fake", input=image_pb2.ImageInput(raw=raw))


async def test_requests_waiting_for_memory_carry_at_most_half_the_budget_in_their_inputs(
    served: tuple[Predictor, CountingDecoder, FakeFactory],
) -> None:
    """Requests waiting for memory hold their inputs as received (raw frames here): once those reach half the
    version's budget (0.5 MiB of 1 MiB), one more that would wait is shed with RESOURCE_EXHAUSTED and a retry
    delay, before anything of it is decoded; those already waiting are answered."""
    predictor, _, factory = served
    gate = factory.built[0].release = threading.Event()
    _, scheduler = predictor.repository.get("fake").require_ready()
    first = asyncio.ensure_future(predictor.predict(png_request(500)))
    waiting = asyncio.ensure_future(predictor.predict(raw_request(400)))  # 480 000 bytes carried
    for _ in range(200):
        await asyncio.sleep(0.01)
        if scheduler.memory.carried:
            break
    assert scheduler.memory.carried == 400 * 400 * 3
    with pytest.raises(ResourceExhausted, match=r"hold 468\.8 KiB of input already") as shed:
        await predictor.predict(raw_request(300))
    assert shed.value.retry_after_seconds
    gate.set()
    await asyncio.gather(first, waiting)
    assert (scheduler.memory.held, scheduler.memory.carried) == (0, 0)
