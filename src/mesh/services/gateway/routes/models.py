"""``/v1/models``: the models, their metadata, and synchronous prediction (``:predict``)."""

from __future__ import annotations

import uuid

import grpc
from fastapi import APIRouter

from mesh.inference.v1 import inference_service_pb2 as inference_pb
from mesh.services.gateway import convert, schemas
from mesh.services.gateway.backends import rpc
from mesh.services.gateway.context import Caller, Context
from mesh.services.gateway.routes.images import ERRORS
from mesh.services.gateway.routes.processing import image_input
from mesh.services.gateway.spans import annotate

router = APIRouter(prefix="/v1/models", tags=["models"])


# Declared before "/{name}" so the colon route wins; Starlette would otherwise still match it by method.
@router.post(
    "/{name}:predict", response_model=schemas.PredictionOut, responses=ERRORS, summary="Run a prediction"
)
async def predict(name: str, body: schemas.PredictIn, ctx: Context, _: Caller) -> schemas.PredictionOut:
    """Run the model on a stored (``image_id``) or inline (``image``, base64) image."""
    source = image_input(body.image_id or None, body.image or None)
    annotate(
        {
            "mesh.model": name,
            **(
                {"mesh.image.id": source.image_id}
                if source.image_id
                else {"mesh.image.bytes": len(source.encoded.data)}
            ),
        }
    )
    response = await rpc(
        ctx.backends.inference_stub.Predict(
            inference_pb.PredictRequest(
                model_name=name,
                model_version=body.version,
                input=source,
                request_id=str(uuid.uuid4()),
                parameters=convert.to_params(body.parameters),
                precheck_only=body.precheck_only,
            )
        )
    )
    return convert.prediction(response)


@router.get("", response_model=schemas.ModelList, responses=ERRORS, summary="List models")
async def list_models(ctx: Context, _: Caller) -> schemas.ModelList:
    """Every model with its versions and readiness."""
    response = await rpc(ctx.backends.inference_stub.ListModels(inference_pb.ListModelsRequest()))
    return schemas.ModelList(models=[convert.model_summary(m) for m in response.models])


@router.get("/{name}", response_model=schemas.ModelDetail, responses=ERRORS, summary="A model's metadata")
async def get_model(name: str, ctx: Context, _: Caller, version: str = "") -> schemas.ModelDetail:
    """Versions, inputs, outputs, parameters and readiness of one model."""
    stub = ctx.backends.inference_stub
    meta = await rpc(stub.GetModelMetadata(inference_pb.GetModelMetadataRequest(name=name, version=version)))
    try:
        ready = (await stub.ModelReady(inference_pb.ModelReadyRequest(name=name, version=version))).ready
    except grpc.aio.AioRpcError:
        ready = False  # metadata answered, readiness did not: report not ready rather than fail the call
    return convert.model_detail(meta, ready)
