"""The pinned upload buffer: allocated once, reused while requests fit, replaced when one outgrows it."""

from __future__ import annotations

import types

import numpy as np

from mesh.kit.pinned import MAX_BYTES, MIN_BYTES, PinnedBuffer


def _fake_cupy(allocations: list[int]) -> types.ModuleType:
    def alloc_pinned_memory(size: int) -> bytearray:
        allocations.append(size)
        return bytearray(size)

    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(alloc_pinned_memory=alloc_pinned_memory)  # type: ignore[attr-defined]
    return module


def test_buffer_is_reused_until_a_request_outgrows_it() -> None:
    """Small requests share one allocation of at least MIN_BYTES; a larger one replaces it, sized to fit."""
    allocations: list[int] = []
    buffer = PinnedBuffer(_fake_cupy(allocations))
    first = buffer.array(100)
    second = buffer.array(MIN_BYTES)
    assert allocations == [MIN_BYTES]
    assert first is not None
    assert second is not None
    assert (first.size, second.size) == (100, MIN_BYTES)
    big = buffer.array(3 * MIN_BYTES + 7)
    assert allocations == [MIN_BYTES, 3 * MIN_BYTES + 7]
    assert big is not None
    assert big.size == 3 * MIN_BYTES + 7


def test_nothing_is_pinned_beyond_the_cap() -> None:
    """A request over MAX_BYTES gets None (the caller copies from pageable memory) and pins nothing."""
    allocations: list[int] = []
    buffer = PinnedBuffer(_fake_cupy(allocations))
    assert buffer.array(MAX_BYTES + 1) is None
    assert allocations == []
    assert buffer.array(MAX_BYTES) is not None


def test_buffer_is_writable_bytes() -> None:
    """The array is uint8 and writable, so an image can be copied into it."""
    buffer = PinnedBuffer(_fake_cupy([]))
    staged = buffer.array(12)
    assert staged is not None
    np.copyto(staged, np.arange(12, dtype=np.uint8))
    assert staged.dtype == np.uint8
    again = buffer.array(12)
    assert again is not None
    assert again.tolist() == list(range(12))
