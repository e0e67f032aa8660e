"""``/v1/filters`` as the image service's real catalogue reaches it, the pipeline limit of ``/v1/process`` and
``/v1/jobs`` in the document and at the door, and the code of ``/v1/process``'s 406."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest

from mesh.image.v1 import image_processing_service_pb2 as image_pb
from mesh.image.v1 import image_processing_service_pb2_grpc as image_grpc
from mesh.services.image_processing.processor import filter_catalogue
from mesh.services.image_processing.registry import FILTERS, MAX_PIPELINE_STEPS, Device
from tests.gateway.fakes import FakeFileService, FakeImageService, strip_png
from tests.gateway.harness import GatewayFactory
from tests.gateway.test_errors import assert_error_shape, violations_of


class RealCatalogue(FakeImageService):
    """The fake image service answering ListFilters with the image service's real catalogue."""

    async def ListFilters(  # noqa: N802
        self, request: image_pb.ListFiltersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> image_pb.ListFiltersResponse:
        return filter_catalogue(Device.CPU)


@pytest.fixture
async def catalogue_address() -> AsyncIterator[str]:
    """host:port of a RealCatalogue server on a free port."""
    server = grpc.aio.server()
    image_grpc.add_ImageProcessingServiceServicer_to_server(RealCatalogue(FakeFileService()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def _filters(make_client: GatewayFactory, address: str) -> dict[str, dict[str, Any]]:
    client = await make_client(image_service_address=address)
    response = await client.get("/v1/filters")
    assert response.status_code == 200, response.text
    return {spec["name"]: spec for spec in response.json()["filters"]}


async def test_every_filter_of_the_rest_catalogue_carries_its_cpu_gpu_tolerance(
    make_client: GatewayFactory, catalogue_address: str
) -> None:
    """FilterSpec.tolerance reaches /v1/filters for every filter, as the service states it: the gateway's
    FilterOut left it out, though the README counts it as part of the catalogue."""
    filters = await _filters(make_client, catalogue_address)
    assert set(filters) == set(FILTERS)
    for name, definition in FILTERS.items():
        assert filters[name]["tolerance"] == definition.tolerance.describe(), name
    assert filters["gaussian_blur"]["tolerance"].startswith("within 1 LSB on 99.9% of samples")


async def test_the_rest_catalogue_tells_a_page_that_gaussian_ksize_is_zero_or_odd(
    make_client: GatewayFactory, catalogue_address: str
) -> None:
    """A client of /v1/filters (the web page shows a parameter's description on its field) is told that
    gaussian_blur.ksize takes 0 or an odd size, where min 0 and step 1 alone advertise every integer."""
    (ksize,) = [
        p
        for p in (await _filters(make_client, catalogue_address))["gaussian_blur"]["params"]
        if p["name"] == "ksize"
    ]
    assert (ksize["min"], ksize["max"], ksize["step"], ksize["default"]) == (0, 129, 1, 0)
    assert "or an odd number from 1 to 129 (even sizes are refused)" in ksize["description"]


async def test_the_document_says_tolerance_and_the_services_pipeline_limit(client: httpx.AsyncClient) -> None:
    """FilterOut lists tolerance as a required string, and ProcessIn's and JobIn's pipeline allow the steps
    the image service takes (MAX_PIPELINE_STEPS, 32), not 64."""
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    assert schemas["FilterOut"]["properties"]["tolerance"]["type"] == "string"
    assert "tolerance" in schemas["FilterOut"]["required"]
    for body in ("ProcessIn", "JobIn"):
        assert schemas[body]["properties"]["pipeline"]["maxItems"] == MAX_PIPELINE_STEPS == 32, body


@pytest.mark.parametrize("path", ["/v1/process", "/v1/jobs"])
async def test_a_pipeline_longer_than_the_service_takes_is_a_400_naming_the_limit(
    client: httpx.AsyncClient, path: str
) -> None:
    """One step more than MAX_PIPELINE_STEPS is refused by the gateway's schema, naming ``pipeline`` and the
    limit; MAX_PIPELINE_STEPS steps pass it."""
    body = {"image_id": "x", "pipeline": [{"filter": "grayscale"}] * (MAX_PIPELINE_STEPS + 1)}
    response = await client.post(path, json=body)
    assert response.status_code == 400, response.text
    (violation,) = violations_of(assert_error_shape(response.json(), "INVALID_ARGUMENT"))
    assert violation["field"] == "pipeline"
    assert f"at most {MAX_PIPELINE_STEPS} items" in violation["description"]
    inline = {"image": base64.b64encode(strip_png()).decode(), "pipeline": [{"filter": "grayscale"}] * 32}
    assert (await client.post("/v1/process", json=inline)).status_code == 200


@pytest.mark.parametrize(("accept", "output_format"), [("image/gif", None), ("image/webp", "png")])
async def test_a_406_says_not_acceptable_not_invalid_argument(
    client: httpx.AsyncClient, accept: str, output_format: str | None
) -> None:
    """negotiate()'s 406 carries UNIMPLEMENTED with reason NOT_ACCEPTABLE (as the 405 carries UNIMPLEMENTED
    and METHOD_NOT_ALLOWED): INVALID_ARGUMENT is the code of a 400, and the request itself was valid."""
    body: dict[str, object] = {"image": base64.b64encode(strip_png()).decode()}
    if output_format is not None:
        body["output_format"] = output_format
    response = await client.post("/v1/process", json=body, headers={"accept": accept})
    assert response.status_code == 406, response.text
    error = assert_error_shape(response.json(), "UNIMPLEMENTED")
    (info,) = [d for d in error["details"] if d["type"] == "ErrorInfo"]
    assert info["reason"] == "NOT_ACCEPTABLE"
    assert error["message"].startswith(f"Accept asks for {accept}")
