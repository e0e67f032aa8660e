"""``/v1/filters`` and ``/v1/process``: the filter catalogue and synchronous processing."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request, Response

from mesh.image.v1 import image_processing_service_pb2 as image_pb
from mesh.kit import errors
from mesh.services.gateway import convert, schemas
from mesh.services.gateway.backends import rpc
from mesh.services.gateway.bodies import json_body, json_request_body
from mesh.services.gateway.context import Caller, Context
from mesh.services.gateway.image_input import serialize_with_image
from mesh.services.gateway.routes.images import ERRORS
from mesh.services.gateway.spans import annotate

router = APIRouter(prefix="/v1", tags=["processing"])

_IMAGE_RESPONSES = {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/webp": {"schema": {"type": "string", "format": "binary"}},
}


def wants_image(request: Request) -> bool:
    """True when the client asks for raw image bytes (``Accept: image/*``) rather than JSON."""
    accept = request.headers.get("accept", "")
    return any(part.split(";")[0].strip().startswith("image/") for part in accept.split(","))


@router.get("/filters", response_model=schemas.FilterList, responses=ERRORS, summary="The filter catalogue")
async def list_filters(ctx: Context, _: Caller) -> schemas.FilterList:
    """Every filter with its parameters (name, type, default, min, max, options) and devices."""
    response = await rpc(ctx.backends.image_stub.ListFilters(image_pb.ListFiltersRequest()))
    return schemas.FilterList(
        filters=[convert.filter_spec(f) for f in response.filters], device=convert.device(response.device)
    )


@router.post(
    "/process",
    response_model=schemas.ProcessOut,
    responses={200: {"content": _IMAGE_RESPONSES}, **ERRORS},
    openapi_extra=json_request_body(schemas.ProcessIn),
    summary="Process an image synchronously",
)
async def process(request: Request, ctx: Context, _: Caller) -> Response:
    """Run a pipeline on a stored (``image_id``) or inline (``image``, base64) image.

    Returns JSON with the output as base64 by default; with ``Accept: image/png`` (or any ``image/*``) the
    body is the output image's bytes, and its size and device come in ``X-Image-Width``,
    ``X-Image-Height`` and ``X-Device`` headers.
    """
    body = await json_body(request, schemas.ProcessIn)
    request_message = image_pb.ProcessImageRequest(
        pipeline=convert.to_pipeline(body.pipeline),
        output=image_pb.OutputSpec(
            format=convert.OUTPUT_FORMATS[body.output_format], quality=body.quality or 0
        ),
    )
    serialized, image = serialize_with_image(request_message, body.image_id, [body.image])
    annotate(
        {
            "mesh.filters": [step.filter for step in body.pipeline],
            "mesh.output_format": body.output_format,
            **image,
        }
    )
    result = await rpc(ctx.backends.process_image(serialized))
    if result.WhichOneof("result") != "encoded":
        raise errors.Internal("the image service returned no encoded image")
    content_type = convert.CONTENT_TYPES.get(result.encoded.format, f"image/{body.output_format}")
    device = convert.device(result.device)
    if wants_image(request):
        return Response(
            result.encoded.data,
            media_type=content_type,
            headers={
                "X-Image-Width": str(result.width),
                "X-Image-Height": str(result.height),
                "X-Device": device,
            },
        )
    out = schemas.ProcessOut(
        image=base64.b64encode(result.encoded.data).decode(),
        content_type=content_type,
        width=result.width,
        height=result.height,
        channels=result.channels,
        device=device,
        timings=[schemas.StepTimingOut(filter=t.filter, seconds=t.seconds) for t in result.timings],
    )
    # Serialised by pydantic-core: FastAPI's generic path re-validates and re-encodes a 1 MB base64 string.
    return Response(out.model_dump_json(), media_type="application/json")
