"""The lookups at submit of a job's image and model (ServiceReferences), with stand-ins for the services."""

from __future__ import annotations

import asyncio

import pytest

from mesh.kit import errors
from mesh.services.queue.references import ServiceReferences


class Service:
    """A lookup that finds the names it holds, refuses the rest, or does not answer at all."""

    def __init__(self, known: set[str], *, kind: str, down: bool = False, hang: bool = False) -> None:
        self.known, self.kind, self.down, self.hang = known, kind, down, hang
        self.calls = 0

    async def __call__(self, name: str) -> object:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(60)
        if self.down:
            raise errors.Unavailable("connection refused")
        if name not in self.known:
            raise errors.NotFound(f"{self.kind} {name!r} does not exist")
        return name


def _references(images: Service, models: Service, timeout: float = 1.0) -> ServiceReferences:
    return ServiceReferences(images, models, timeout_seconds=timeout)


async def test_what_exists_passes_and_is_remembered() -> None:
    """An image and a model that exist pass; asked again, neither service is called."""
    images, models = Service({"i"}, kind="image"), Service({"m"}, kind="model")
    references = _references(images, models)
    await references.check("i", "m")
    await references.check("i", "m")
    assert (images.calls, models.calls) == (1, 1)


async def test_each_missing_name_is_one_not_found_with_the_services_words() -> None:
    """A missing image and model are one NotFound naming both fields, with each service's message."""
    references = _references(Service(set(), kind="image"), Service(set(), kind="model"))
    with pytest.raises(errors.NotFound) as caught:
        await references.check("i", "m")
    assert [v.field for v in caught.value.field_violations] == ["image_id", "model"]
    assert caught.value.message == "image 'i' does not exist; model 'm' does not exist"


async def test_a_job_without_a_model_looks_up_only_its_image() -> None:
    """No model named: the inference service is not asked."""
    models = Service(set(), kind="model")
    await _references(Service({"i"}, kind="image"), models).check("i", "")
    assert models.calls == 0


async def test_a_service_that_does_not_answer_lets_jobs_through_and_is_left_alone_a_while() -> None:
    """Down or slower than the deadline: the job passes (its worker checks), and that service is not asked
    again for the next submits, so an outage does not slow each of them by the deadline."""
    down = Service(set(), kind="image", down=True)
    references = _references(down, Service({"m"}, kind="model"))
    await references.check("i", "m")
    await references.check("j", "m")
    assert down.calls == 1
    slow = Service(set(), kind="model", hang=True)
    references = _references(Service({"i"}, kind="image"), slow, timeout=0.05)
    await asyncio.wait_for(references.check("i", "m"), 1.0)
    await references.check("i", "m")
    assert slow.calls == 1
