"""``/v1/models``: the models, their metadata, and synchronous prediction (``:predict``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from mesh.inference.v1 import inference_service_pb2 as inference_pb
from mesh.kit import errors
from mesh.kit.image_bytes import declared_image_type
from mesh.services.gateway import convert, schemas
from mesh.services.gateway.backends import rpc
from mesh.services.gateway.bodies import json_request_body, media_type, parse_json
from mesh.services.gateway.context import Caller, Context
from mesh.services.gateway.image_input import serialize_with_image
from mesh.services.gateway.request_ids import OPENAPI_PARAMETER, RequestId, with_request_id_header
from mesh.services.gateway.routes.images import ACCEPTED_TYPES, ERRORS
from mesh.services.gateway.spans import annotate

router = APIRouter(prefix="/v1/models", tags=["models"])


_BINARY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_BODY = json_request_body(
    schemas.PredictIn, **{t: _BINARY for t in (*ACCEPTED_TYPES, "application/octet-stream")}
)
PREDICT_BODY["requestBody"]["description"] = (
    "JSON naming a stored image or carrying one in base64, or the raw image bytes. `version` and"
    " `precheck_only` may come from the query with either body; with JSON, also from the body (a version given"
    " in both must be the same)."
)
# Read by the RequestId dependency itself (so that its refusal names the header), hence declared here.
PREDICT_BODY["parameters"] = [OPENAPI_PARAMETER]


async def _predict_input(request: Request) -> schemas.PredictIn | list[bytes]:
    """The JSON body, or the raw image's chunks as they arrived (no base64 and JSON to pay for, and no copy
    before the one into the outgoing request)."""
    kind = media_type(request)
    if kind == "application/json":
        return await parse_json(request, schemas.PredictIn)
    declared_image_type(kind)  # any image type, or none: the service reads the format from the bytes
    chunks = [chunk async for chunk in request.stream() if chunk]
    if not chunks:
        raise errors.InvalidData(
            "the image is empty", field_violations=[errors.FieldViolation("body", "empty")]
        )
    return chunks


# Declared before "/{name}" so the colon route wins; Starlette would otherwise still match it by method.
@router.post(
    "/{name}:predict",
    response_model=schemas.PredictionOut,
    responses=with_request_id_header({**ERRORS, 200: {}}),
    openapi_extra=PREDICT_BODY,
    summary="Run a prediction",
)
async def predict(
    name: str,
    request: Request,
    ctx: Context,
    # Before the caller's check: a 401 or 429 then names the request too.
    request_id: RequestId,
    _: Caller,
    version: Annotated[
        str,
        Query(
            max_length=100,
            description="The model version; the default if empty, the highest ready one for `latest`.",
        ),
    ] = "",
    precheck_only: Annotated[bool, Query(description="Only the fast quality pre-check.")] = False,
) -> schemas.PredictionOut:
    """Run the model on a stored (``image_id``) or inline (``image``, base64) image, or on raw image bytes. The
    request's id (``X-Request-Id``, or one made up) comes back in that header and in an error's ErrorInfo
    metadata; not on a 400 refusing that header, nor on a 413 refused by Content-Length before the body is
    read."""
    given = await _predict_input(request)
    message = inference_pb.PredictRequest(model_name=name, request_id=request_id)
    if isinstance(given, list):
        image_id, inline = "", given
        message.model_version, message.precheck_only = version, precheck_only
    else:
        # The query's values hold for a JSON body too: a client that put them there must not get another
        # version, or a full reading, without a word.
        if version and given.version and version != given.version:
            raise errors.InvalidArgument(
                f"the query asks for version {version!r} and the body for {given.version!r}; give it once",
                field_violations=[errors.FieldViolation("version", "the query and the body disagree")],
            )
        image_id, inline = given.image_id, [given.image]
        message.model_version = given.version or version
        message.precheck_only = given.precheck_only or precheck_only
        for key, value in convert.to_params(given.parameters).items():
            message.parameters[key].CopyFrom(value)
    serialized, image = serialize_with_image(message, image_id, inline)
    annotate({"mesh.model": name, **image})
    return convert.prediction(await rpc(ctx.backends.predict(serialized)))


@router.get("", response_model=schemas.ModelList, responses=ERRORS, summary="List models")
async def list_models(ctx: Context, _: Caller) -> schemas.ModelList:
    """Every model with its versions and readiness."""
    response = await rpc(ctx.backends.inference_stub.ListModels(inference_pb.ListModelsRequest()))
    return schemas.ModelList(models=[convert.model_summary(m) for m in response.models])


@router.get(
    "/{name:name}", response_model=schemas.ModelDetail, responses=ERRORS, summary="A model's metadata"
)
async def get_model(name: str, ctx: Context, _: Caller, version: str = "") -> schemas.ModelDetail:
    """Versions, inputs, outputs, parameters and readiness of one model: of the version described and, with the
    reason of one that is not ready, of every other; and which version is the default."""
    request = inference_pb.GetModelMetadataRequest(name=name, version=version)
    # One answer holds every version's state: readiness and metadata cannot disagree, as two calls could.
    return convert.model_detail(await rpc(ctx.backends.inference_stub.GetModelMetadata(request)))
