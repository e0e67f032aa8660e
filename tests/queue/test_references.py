"""The lookups at submit of a job's image and model (ServiceReferences), with stand-ins for the services."""

from __future__ import annotations

import asyncio

import pytest

from mesh.kit import errors
from mesh.services.queue.references import ServiceReferences


class Service:
    """A lookup that finds the names it holds, refuses the rest, or does not answer at all."""

    def __init__(
        self,
        known: set[str],
        *,
        kind: str,
        down: bool = False,
        hang: bool = False,
        refuse: errors.MeshError | None = None,
    ) -> None:
        self.known, self.kind, self.down, self.hang, self.refuse = known, kind, down, hang, refuse
        self.calls = 0

    async def __call__(self, name: str) -> object:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(60)
        if self.down:
            raise errors.Unavailable("connection refused")
        if self.refuse is not None:
            raise self.refuse
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


async def test_a_name_the_service_refuses_is_the_clients_error_and_the_next_ones_are_still_checked() -> None:
    """The inference service's INVALID_ARGUMENT (a version over its 64 characters) is INVALID_ARGUMENT on the
    field ``model`` with the service's words, not "no answer": the job is refused, and the next submit's model is
    looked up (it was let through, and every model went unchecked for 5 s)."""
    too_long = "a version has at most 64 characters"
    models = Service({"m"}, kind="model", refuse=errors.InvalidArgument(f"model 'm': {too_long}"))
    references = _references(Service({"i"}, kind="image"), models)
    with pytest.raises(errors.InvalidArgument) as refused:
        await references.check("i", "m/" + "1" * 65)
    assert refused.value.message == f"model 'm': {too_long}"
    assert [(v.field, v.description) for v in refused.value.field_violations] == [
        ("model", f"model 'm': {too_long}")
    ]
    models.refuse = None
    with pytest.raises(errors.NotFound):
        await references.check("i", "nope")
    assert models.calls == 2


@pytest.mark.parametrize(
    "failure", [errors.Internal("model loading crashed"), errors.ResourceExhausted("too many requests")]
)
async def test_a_service_that_fails_lets_that_job_through_but_is_asked_about_the_next(
    failure: errors.MeshError,
) -> None:
    """A service that answers with a failure of its own (INTERNAL, RESOURCE_EXHAUSTED) says nothing against the
    client's name: that job passes (its worker checks). Only no answer at all (UNAVAILABLE, DEADLINE_EXCEEDED,
    the deadline) leaves the service alone a while; after any other answer the next name is looked up."""
    models = Service(set(), kind="model", refuse=failure)
    references = _references(Service({"i"}, kind="image"), models)
    await references.check("i", "m")
    models.refuse = None
    with pytest.raises(errors.NotFound):
        await references.check("i", "nope")
    assert models.calls == 2


async def test_a_fresh_check_asks_again_and_a_missing_answer_is_not_remembered_as_found() -> None:
    """``fresh`` (RetryJob) looks up an image found a moment ago, so an image deleted since is NOT_FOUND; then
    a plain check (a submit) does not take it for found any more either."""
    images = Service({"i"}, kind="image")
    references = _references(images, Service({"m"}, kind="model"))
    await references.check("i", "m")
    images.known.clear()  # deleted
    await references.check("i", "m")  # a submit within remember_seconds: still remembered
    with pytest.raises(errors.NotFound) as gone:
        await references.check("i", "m", fresh=True)
    assert [v.field for v in gone.value.field_violations] == ["image_id"]
    with pytest.raises(errors.NotFound):
        await references.check("i", "m")
    assert images.calls == 3
