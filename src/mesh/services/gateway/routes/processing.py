"""``/v1/filters`` and ``/v1/process``: the filter catalogue and synchronous processing."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request, Response
from starlette.exceptions import HTTPException

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


_FORMATS_BY_TYPE = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
_JSON_RANGES = ("application/json", "application/*", "*/*")


def negotiate(accept: str, output_format: str, *, format_given: bool) -> str | None:
    """The format to answer with as image bytes, or None for JSON, from ``Accept`` (by q, then order).

    ``image/*`` takes ``output_format``; a named image type is honoured when the body names no other format.
    Accept ranges that name only image types the mesh cannot make, or that contradict the body's
    ``output_format``, are 406: answering PNG to ``Accept: image/webp`` breaks the client that asked.
    Ranges that name nothing the route makes (``text/html``) get JSON, as a browser's address bar expects."""
    ranges: list[tuple[float, int, str]] = []
    for order, part in enumerate(accept.split(",")):
        media, *params = (piece.strip() for piece in part.split(";"))
        weight = next((p.removeprefix("q=") for p in params if p.startswith("q=")), "1")
        try:
            q = float(weight)
        except ValueError:
            q = 1.0
        if media and q > 0:
            ranges.append((-q, order, media.lower()))
    images: list[str] = []
    for _, _, media in sorted(ranges):
        if media in _JSON_RANGES:
            return None
        if media == "image/*":
            return output_format
        made = _FORMATS_BY_TYPE.get(media)
        if made is not None and (not format_given or made == output_format):
            return made
        if media.startswith("image/"):
            images.append(media)
    if images:
        offered = f"image/{output_format}" if format_given else ", ".join(_FORMATS_BY_TYPE)
        raise HTTPException(
            406,
            f"Accept asks for {', '.join(images)}; this request can answer {offered} "
            "(output_format picks among image/png, image/jpeg and image/webp) or JSON",
        )
    return None


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
    responses={
        200: {"content": _IMAGE_RESPONSES},
        406: {
            "model": schemas.ErrorResponse,
            "description": "Not Acceptable: Accept names no image this request can answer",
        },
        **ERRORS,
    },
    openapi_extra=json_request_body(schemas.ProcessIn),
    summary="Process an image synchronously",
)
async def process(request: Request, ctx: Context, _: Caller) -> Response:
    """Run a pipeline on a stored (``image_id``) or inline (``image``, base64) image.

    Returns JSON with the output as base64 by default; with ``Accept: image/png``, ``image/jpeg``,
    ``image/webp`` or ``image/*`` the body is the output image's bytes in that format (``image/*``: in
    ``output_format``), and its size and device come in ``X-Image-Width``, ``X-Image-Height`` and
    ``X-Device`` headers. An Accept that asks only for another image type, or for one that contradicts
    ``output_format``, is 406.
    """
    body = await json_body(request, schemas.ProcessIn)
    as_image = negotiate(
        request.headers.get("accept", ""),
        body.output_format,
        format_given="output_format" in body.model_fields_set,
    )
    output_format = as_image or body.output_format
    request_message = image_pb.ProcessImageRequest(
        pipeline=convert.to_pipeline(body.pipeline),
        output=image_pb.OutputSpec(format=convert.OUTPUT_FORMATS[output_format], quality=body.quality or 0),
    )
    serialized, image = serialize_with_image(request_message, body.image_id, [body.image])
    annotate(
        {
            "mesh.filters": [step.filter for step in body.pipeline],
            "mesh.output_format": output_format,
            **image,
        }
    )
    result = await rpc(ctx.backends.process_image(serialized))
    if result.WhichOneof("result") != "encoded":
        raise errors.Internal("the image service returned no encoded image")
    content_type = convert.CONTENT_TYPES.get(result.encoded.format, f"image/{output_format}")
    device = convert.device(result.device)
    if as_image is not None:
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
