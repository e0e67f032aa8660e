"""Protobuf messages to the REST API's JSON shapes and back (enum prefixes dropped, times as RFC 3339)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import get_args

from google.protobuf import timestamp_pb2

from mesh.common.v1 import errors_pb2, image_pb2, params_pb2
from mesh.file.v1 import file_service_pb2
from mesh.image.v1 import image_processing_service_pb2 as image_pb
from mesh.inference.v1 import inference_service_pb2 as inference_pb
from mesh.kit.param_values import ParamScalar, param_value, to_param_value
from mesh.queue.v1 import job_pb2
from mesh.services.gateway import schemas

CONTENT_TYPES = {
    image_pb2.IMAGE_FORMAT_PNG: "image/png",
    image_pb2.IMAGE_FORMAT_JPEG: "image/jpeg",
    image_pb2.IMAGE_FORMAT_WEBP: "image/webp",
}
OUTPUT_FORMATS = {
    "png": image_pb2.IMAGE_FORMAT_PNG,
    "jpeg": image_pb2.IMAGE_FORMAT_JPEG,
    "webp": image_pb2.IMAGE_FORMAT_WEBP,
}


def timestamp(value: timestamp_pb2.Timestamp) -> str | None:
    """RFC 3339 UTC, or None for an unset timestamp."""
    if value.seconds == 0 and value.nanos == 0:
        return None
    return value.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def enum_name(name: str, prefix: str) -> str:
    """``JOB_STATE_QUEUED`` -> ``QUEUED``."""
    return name.removeprefix(prefix)


def device(value: image_pb2.Device.ValueType) -> str:
    """``DEVICE_GPU`` -> ``gpu``."""
    return enum_name(image_pb2.Device.Name(value), "DEVICE_").lower()


def to_params(values: Mapping[str, ParamScalar]) -> dict[str, params_pb2.ParamValue]:
    """A proto params map from JSON."""
    return {name: to_param_value(v) for name, v in values.items()}


def to_pipeline(steps: list[schemas.PipelineStepIn]) -> list[params_pb2.PipelineStep]:
    """Proto pipeline steps from JSON."""
    return [params_pb2.PipelineStep(filter=s.filter, params=to_params(s.params)) for s in steps]


def image(message: file_service_pb2.Image, deduplicated: bool | None = None) -> schemas.ImageOut:
    """An image's metadata."""
    return schemas.ImageOut(
        id=message.id,
        filename=message.filename,
        content_type=message.content_type,
        format=enum_name(image_pb2.ImageFormat.Name(message.format), "IMAGE_FORMAT_"),
        width=message.width,
        height=message.height,
        channels=message.channels,
        bit_depth=message.bit_depth,
        size_bytes=message.size_bytes,
        sha256=message.sha256,
        created_at=timestamp(message.create_time),
        has_thumbnail=message.has_thumbnail,
        labels=dict(message.labels),
        deduplicated=deduplicated,
    )


def filter_spec(spec: image_pb.FilterSpec) -> schemas.FilterOut:
    """One filter."""
    params = [
        schemas.ParamSpecOut(
            name=p.name,
            type=enum_name(image_pb.ParamType.Name(p.type), "PARAM_TYPE_").lower(),
            description=p.description,
            default=param_value(p.default_value),
            min=p.min if p.HasField("min") else None,
            max=p.max if p.HasField("max") else None,
            step=p.step,
            options=list(p.options),
        )
        for p in spec.params
    ]
    return schemas.FilterOut(
        name=spec.name,
        description=spec.description,
        params=params,
        devices=[device(d) for d in spec.devices],
        output_channels=spec.output_channels,
        tolerance=spec.tolerance,
    )


def version_status(status: inference_pb.ModelVersionStatus) -> schemas.VersionStatusOut:
    """One version's load state."""
    return schemas.VersionStatusOut(
        version=status.version, ready=status.ready, state=status.state, reason=status.reason
    )


def model_summary(summary: inference_pb.ModelSummary) -> schemas.ModelOut:
    """A model in the list."""
    return schemas.ModelOut(
        name=summary.name,
        versions=list(summary.versions),
        default_version=summary.default_version,
        ready=summary.ready,
        description=summary.description,
        version_status=[version_status(s) for s in summary.version_status],
    )


def model_detail(meta: inference_pb.GetModelMetadataResponse) -> schemas.ModelDetail:
    """A model's metadata, with the readiness of the version described and of every other."""

    def tensors(specs: list[inference_pb.TensorSpec]) -> list[schemas.TensorSpecOut]:
        return [
            schemas.TensorSpecOut(
                name=t.name, datatype=t.datatype, shape=list(t.shape), description=t.description
            )
            for t in specs
        ]

    return schemas.ModelDetail(
        name=meta.name,
        versions=list(meta.versions),
        version=meta.version,
        platform=meta.platform,
        inputs=tensors(list(meta.inputs)),
        outputs=tensors(list(meta.outputs)),
        parameters={k: param_value(v) for k, v in meta.parameters.items()},
        max_batch_size=meta.max_batch_size,
        device=device(meta.device),
        ready=meta.status.ready,
        default_version=meta.default_version,
        version_status=[version_status(s) for s in meta.version_status],
    )


def _line(line: inference_pb.LineReading) -> schemas.LineOut:
    return schemas.LineOut(
        present=line.present,
        position_px=line.position_px,
        position=line.position,
        intensity=line.intensity,
        center_x=line.center_x,
        center_y=line.center_y,
    )


def prediction(response: inference_pb.PredictResponse) -> schemas.PredictionOut:
    """A prediction."""
    reading: schemas.StripReadingOut | None = None
    if response.HasField("strip_reading"):
        r = response.strip_reading
        window = (
            schemas.WindowOut(
                center_x=r.window.center_x,
                center_y=r.window.center_y,
                length=r.window.length,
                width=r.window.width,
                angle_degrees=r.window.angle_degrees,
            )
            if r.HasField("window")
            else None
        )
        reading = schemas.StripReadingOut(
            verdict=enum_name(inference_pb.Verdict.Name(r.verdict), "VERDICT_"),
            control_line=_line(r.control_line),
            test_line=_line(r.test_line),
            t_to_c_ratio=r.t_to_c_ratio,
            confidence=r.confidence,
            quality_flags=[
                enum_name(inference_pb.QualityFlag.Name(f), "QUALITY_FLAG_") for f in r.quality_flags
            ],
            window=window,
            precheck_only=r.precheck_only,
        )
    return schemas.PredictionOut(
        model_name=response.model_name,
        model_version=response.model_version,
        request_id=response.request_id,
        device=device(response.device),
        queue_seconds=response.queue_seconds,
        compute_seconds=response.compute_seconds,
        batch_size=response.batch_size,
        strip_reading=reading,
    )


def job_state(value: job_pb2.JobState.ValueType) -> str:
    """``JOB_STATE_QUEUED`` -> ``QUEUED``."""
    return enum_name(job_pb2.JobState.Name(value), "JOB_STATE_")


def to_job_state(name: str) -> job_pb2.JobState.ValueType:
    """``QUEUED`` -> ``JOB_STATE_QUEUED``."""
    return job_pb2.JobState.Value(f"JOB_STATE_{name}")


_CONTRACT_STATES: dict[job_pb2.JobState.ValueType, schemas.JobStateName] = {
    to_job_state(name): name for name in get_args(schemas.JobStateName)
}


def contract_state(value: job_pb2.JobState.ValueType) -> schemas.JobStateName:
    """A job's state as the REST API names it: one of the contract's states, which the document declares as an
    enum (a state outside them, UNSPECIFIED, is a KeyError: the queue never sends one for a job)."""
    return _CONTRACT_STATES[value]


def transition(message: job_pb2.JobTransition) -> schemas.JobTransitionOut:
    """One state change; the job's first (into QUEUED at submission) comes from no state: null, never the
    protobuf's UNSPECIFIED, which is no state of the contract."""
    first = message.from_state == job_pb2.JOB_STATE_UNSPECIFIED
    return schemas.JobTransitionOut(
        from_state=None if first else contract_state(message.from_state),
        to_state=contract_state(message.to_state),
        attempt=message.attempt,
        time=timestamp(message.time),
        reason=message.reason,
    )


def job(message: job_pb2.Job) -> schemas.JobOut:
    """A job."""
    error = None
    if message.HasField("error") and (message.error.message or message.error.category):
        error = schemas.JobErrorOut(
            category=enum_name(errors_pb2.ErrorCategory.Name(message.error.category), "ERROR_CATEGORY_"),
            message=message.error.message,
            code=message.error.code,
        )
    result = None
    if message.HasField("result"):
        result = schemas.JobResultOut(
            output_image_id=message.result.output_image_id,
            prediction=prediction(message.result.prediction)
            if message.result.HasField("prediction")
            else None,
        )
    return schemas.JobOut(
        id=message.id,
        state=contract_state(message.state),
        image_id=message.image_id,
        pipeline=[
            schemas.PipelineStepOut(filter=s.filter, params={k: param_value(v) for k, v in s.params.items()})
            for s in message.pipeline
        ],
        model=message.model,
        priority=message.priority,
        idempotency_key=message.idempotency_key,
        attempt=message.attempt,
        max_attempts=message.max_attempts,
        run_attempt=message.run_attempt,
        progress=message.progress,
        stage=message.stage,
        queue_position=message.queue_position,
        error=error,
        result=result,
        created_at=timestamp(message.create_time),
        updated_at=timestamp(message.update_time),
        started_at=timestamp(message.start_time),
        finished_at=timestamp(message.finish_time),
        next_run_at=timestamp(message.next_run_time),
        history=[transition(t) for t in message.history],
        cancel_requested=message.cancel_requested,
    )
