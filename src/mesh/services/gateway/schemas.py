"""The REST API's JSON shapes (request bodies and responses); the OpenAPI document is built from them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from mesh.kit.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from mesh.kit.param_values import ParamScalar
from mesh.kit.text_fields import MAX_IDEMPOTENCY_KEY_CHARS
from mesh.services.image_processing.registry import MAX_PIPELINE_STEPS

# Ids are UUIDs: documented so (clients and fuzzers generate real ones), checked by the services, whose
# refusals say what an id looks like.
UUID_FORMAT: dict[str, Any] = {"format": "uuid"}
ImageIdPath = Annotated[str, Path(description="An image's id (a UUID).", json_schema_extra=UUID_FORMAT)]
JobIdPath = Annotated[str, Path(description="A job's id (a UUID).", json_schema_extra=UUID_FORMAT)]

# Listings page as the gRPC services do (AIP-158): a page size over the maximum is reduced to it, not refused;
# reduced here too, so that no size outside protobuf's int32 reaches the request.
PageSizeQuery = Annotated[
    int,
    Query(
        ge=1,
        description=f"Items per page (default {DEFAULT_PAGE_SIZE}); over {MAX_PAGE_SIZE} is reduced to "
        f"{MAX_PAGE_SIZE}, and next_page_token continues the listing.",
    ),
    AfterValidator(lambda size: min(size, MAX_PAGE_SIZE)),
]
PageTokenQuery = Annotated[
    str, Query(max_length=1000, description="The next_page_token of the previous page; empty for the first.")
]

MAX_PARAMS = 64
"""Parameters of one pipeline step or one prediction; no filter or model declares more than a few."""


def _one_param_error(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    # A value that fits none of the union's members is one problem, not one per member (four violations).
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError("param_type", "must be a boolean, a number or a string") from None


def _at_most_params(value: object) -> object:
    # Counted before the values are validated: pydantic checks a dict's max_length only after validating every
    # item, and 100 000 bad values in a 1 MiB body cost seconds and hundreds of MB in errors.
    if isinstance(value, dict) and len(value) > MAX_PARAMS:
        raise PydanticCustomError(
            "too_many_params",
            "at most {limit} parameters, got {count}",
            {"limit": MAX_PARAMS, "count": len(value)},
        )
    return value


# A parameter from JSON: its integers are bounded to protobuf's int64, and a larger one reads as a number, which
# the service then judges against the parameter's range (ParamValue(int_value=10**23) raised: a 500).
ParamIn = Annotated[
    bool | Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | float | str, WrapValidator(_one_param_error)
]
ParamsIn = Annotated[
    dict[str, ParamIn],
    BeforeValidator(_at_most_params),
    Field(json_schema_extra={"maxProperties": MAX_PARAMS}),
]

JobStateName = Literal["QUEUED", "RUNNING", "RETRY_WAIT", "SUCCEEDED", "FAILED", "DEAD", "CANCELLED"]
"""The contract's job states: an enum in the document, for the list's filter and every state a job shows."""


class Strict(BaseModel):
    """Request bodies refuse unknown fields and wrong types (no ``false`` -> 0), so a typo is a 400.

    ``bytes`` fields arrive as base64 strings and are decoded by pydantic-core while the JSON is parsed:
    for a 1 MB image that is about 1.4 ms against about 8 ms for a ``str`` field decoded afterwards.
    """

    model_config = ConfigDict(extra="forbid", strict=True, val_json_bytes="base64")


class ErrorDetail(BaseModel):
    """The error object of every non-2xx response."""

    code: str = Field(description="gRPC status code name, e.g. INVALID_ARGUMENT.")
    message: str = Field(description="What went wrong, for people.")
    details: list[dict[str, Any]] = Field(description="google.rpc-style details: ErrorInfo, BadRequest, ...")


class ErrorResponse(BaseModel):
    """``{"error": {"code", "message", "details"}}``."""

    error: ErrorDetail


class ImageOut(BaseModel):
    """A stored image's metadata."""

    id: str
    filename: str
    content_type: str
    format: str = Field(description="PNG, JPEG or WEBP.")
    width: int
    height: int
    channels: int
    bit_depth: int
    size_bytes: int
    sha256: str
    created_at: str | None = Field(description="RFC 3339 UTC time of the upload.")
    has_thumbnail: bool
    labels: dict[str, str]
    deduplicated: bool | None = Field(
        default=None, description="On upload: true when the bytes were already stored."
    )


class ImageList(BaseModel):
    """A page of images, newest first."""

    images: list[ImageOut]
    next_page_token: str = Field(description="Pass as page_token for the next page; empty on the last.")


class ParamSpecOut(BaseModel):
    """One parameter of a filter."""

    name: str
    type: Literal["int", "float", "bool", "enum", "unspecified"]
    description: str
    default: ParamScalar | None
    min: float | None
    max: float | None
    step: float
    options: list[str]


class FilterOut(BaseModel):
    """One filter of the image processing service."""

    name: str
    description: str
    params: list[ParamSpecOut]
    devices: list[str] = Field(description="cpu and/or gpu.")
    output_channels: str
    tolerance: str = Field(
        description='How closely the GPU result matches the CPU result for the same input ("exact", "within 1'
        ' LSB", ...).'
    )


class FilterList(BaseModel):
    """The filter catalogue and the device the image service runs on."""

    filters: list[FilterOut]
    device: str


class PipelineStepIn(Strict):
    """One step of a pipeline."""

    filter: str = Field(min_length=1, max_length=200)
    params: ParamsIn = Field(default_factory=dict)


class PipelineStepOut(BaseModel):
    """One step of a job's pipeline."""

    filter: str
    params: dict[str, ParamScalar | None]


EXACTLY_ONE_IMAGE: dict[str, Any] = {"oneOf": [{"required": ["image_id"]}, {"required": ["image"]}]}
INLINE_IMAGE_DESCRIPTION = "Base64 PNG, JPEG or WebP bytes."
InlineImage = Annotated[
    bytes,
    Field(min_length=1, description=INLINE_IMAGE_DESCRIPTION),
    # What the client sends: a base64 string (standard or URL-safe alphabet), not raw binary.
    WithJsonSchema(
        {
            "type": "string",
            "contentEncoding": "base64",
            "minLength": 1,
            "description": INLINE_IMAGE_DESCRIPTION,
        }
    ),
]


class ProcessIn(Strict):
    """Synchronous processing: exactly one of ``image_id`` and ``image`` (base64 file bytes)."""

    model_config = ConfigDict(json_schema_extra=EXACTLY_ONE_IMAGE)

    # Absent is "" (never null), so the document's oneOf says exactly what is accepted.
    image_id: str = Field(default="", min_length=1, max_length=200, json_schema_extra=UUID_FORMAT)
    image: InlineImage = b""
    pipeline: list[PipelineStepIn] = Field(default_factory=list, max_length=MAX_PIPELINE_STEPS)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: int | None = Field(default=None, ge=1, le=100, description="JPEG/WebP quality.")


class StepTimingOut(BaseModel):
    """Time spent in one step."""

    filter: str
    seconds: float


class ProcessOut(BaseModel):
    """The processed image (send ``Accept: image/*`` to get the raw bytes instead)."""

    image: str = Field(description="Base64 bytes of the output image.")
    content_type: str
    width: int
    height: int
    channels: int
    device: str
    timings: list[StepTimingOut]


class VersionStatusOut(BaseModel):
    """The load state of one model version."""

    version: str
    ready: bool = Field(description="True when it serves.")
    state: str = Field(description="LOADING, READY or UNAVAILABLE.")
    reason: str = Field(description='Why it is not ready ("ready" when it is).')


class ModelOut(BaseModel):
    """A model's versions and readiness."""

    name: str
    versions: list[str]
    default_version: str = Field(description="The version used when a request names none.")
    ready: bool = Field(description="True when the default version is ready.")
    description: str
    version_status: list[VersionStatusOut] = Field(description="Every version's load state, ascending.")


class ModelList(BaseModel):
    """Every model."""

    models: list[ModelOut]


class TensorSpecOut(BaseModel):
    """One input or output of a model."""

    name: str
    datatype: str
    shape: list[int]
    description: str


class ModelDetail(BaseModel):
    """A model's metadata and readiness."""

    name: str
    versions: list[str]
    version: str = Field(description="The version described (the default one when the request named none).")
    platform: str
    inputs: list[TensorSpecOut]
    outputs: list[TensorSpecOut]
    parameters: dict[str, ParamScalar | None]
    max_batch_size: int
    device: str
    ready: bool = Field(description="True when the described version is ready.")
    default_version: str = Field(description="The version used when a request names none.")
    version_status: list[VersionStatusOut] = Field(
        description="Every version's load state, ascending: a version that is not ready says why."
    )


class PredictIn(Strict):
    """Synchronous inference: exactly one of ``image_id`` and ``image`` (base64 file bytes)."""

    model_config = ConfigDict(json_schema_extra=EXACTLY_ONE_IMAGE)

    # Absent is "" (never null), so the document's oneOf says exactly what is accepted.
    image_id: str = Field(default="", min_length=1, max_length=200, json_schema_extra=UUID_FORMAT)
    image: InlineImage = b""
    version: str = Field(default="", max_length=100)
    parameters: ParamsIn = Field(default_factory=dict)
    precheck_only: bool = False


class LineOut(BaseModel):
    """A control or test line."""

    present: bool
    position_px: float
    position: float
    intensity: float
    center_x: float
    center_y: float


class WindowOut(BaseModel):
    """Where the strip's read window lies in the image."""

    center_x: float
    center_y: float
    length: float
    width: float
    angle_degrees: float


class StripReadingOut(BaseModel):
    """The strip reader's verdict."""

    verdict: str = Field(description="POSITIVE, NEGATIVE or INVALID.")
    control_line: LineOut
    test_line: LineOut
    t_to_c_ratio: float
    confidence: float
    quality_flags: list[str]
    window: WindowOut | None
    precheck_only: bool


class PredictionOut(BaseModel):
    """One prediction."""

    model_name: str
    model_version: str
    request_id: str = Field(
        description="The request's id: the X-Request-Id header's, or the one the gateway gave it (also in the "
        "response's X-Request-Id header)."
    )
    device: str
    queue_seconds: float = Field(description="Seconds this request waited for its batch to start computing.")
    compute_seconds: float = Field(
        description="Wall seconds of the batch computation this request took part in, shared by the batch_size "
        "requests of that batch (not this request's share)."
    )
    batch_size: int = Field(description="Requests in the batch this one was computed in.")
    strip_reading: StripReadingOut | None


class JobIn(Strict):
    """A job to submit."""

    image_id: str = Field(min_length=1, max_length=200, json_schema_extra=UUID_FORMAT)
    pipeline: list[PipelineStepIn] = Field(default_factory=list, max_length=MAX_PIPELINE_STEPS)
    model: str = Field(
        default="",
        max_length=200,
        description='The model to run after the pipeline: "name" (its default version) or "name/version".',
        examples=["strip-reader", "strip-reader/1"],
    )
    priority: int = Field(default=0, ge=0, le=9)
    idempotency_key: str = Field(default="", max_length=MAX_IDEMPOTENCY_KEY_CHARS)
    max_attempts: int | None = Field(default=None, ge=1, le=100)


class JobErrorOut(BaseModel):
    """Why a job failed."""

    category: str = Field(description="TRANSIENT, SYSTEM, PERMANENT or DATA.")
    message: str
    code: str


class JobResultOut(BaseModel):
    """What a job produced."""

    output_image_id: str
    prediction: PredictionOut | None


class JobTransitionOut(BaseModel):
    """One state change."""

    from_state: JobStateName | None = Field(
        description="The state it left; null for the job's first transition."
    )
    to_state: JobStateName
    attempt: int
    time: str | None
    reason: str


class JobOut(BaseModel):
    """A job."""

    id: str
    state: JobStateName
    image_id: str
    pipeline: list[PipelineStepOut]
    model: str
    priority: int
    idempotency_key: str = Field(
        description="The key given at submit, or the one the gateway gave a submit without one (gateway-<uuid>)"
    )
    attempt: int = Field(description="Attempt number across every run of the job, from 1.")
    max_attempts: int = Field(description="Attempts allowed per run before FAILED.")
    run_attempt: int = Field(
        description="The attempt within the current run, from 1, out of max_attempts; a retry starts a new run."
    )
    progress: float
    stage: str
    queue_position: int = Field(description="1-based position among queued jobs; 0 when not queued.")
    error: JobErrorOut | None
    result: JobResultOut | None
    created_at: str | None
    updated_at: str | None
    started_at: str | None
    finished_at: str | None
    next_run_at: str | None
    history: list[JobTransitionOut] = Field(
        description="State changes, oldest first. Filled by GET /v1/jobs/{job_id}, the events stream and the "
        "answers of :cancel and :retry; empty in the list's and the submit's answers (not loaded there)."
    )
    cancel_requested: bool


class JobList(BaseModel):
    """A page of jobs, newest first."""

    jobs: list[JobOut]
    next_page_token: str


class ComponentHealth(BaseModel):
    """One service or dependency on the health dashboard."""

    name: str
    kind: Literal["service", "dependency", "gateway"]
    status: Literal["ok", "degraded", "failing", "unknown"] = Field(
        description="degraded: failing, but its service still serves (a job worker's connection, RabbitMQ "
        "behind the queue's outbox); only failing counts against readiness."
    )
    latency_ms: float | None
    detail: str
    source: str = Field(description="Who reported it: the gateway or a service's /healthz.")


class QueueHealth(BaseModel):
    """Queue depths from the queue service."""

    jobs_by_state: dict[str, int]
    queues: list[dict[str, Any]]
    oldest_queued_age_seconds: float
    recent_throughput_per_second: float
    dead_letters: int


class HealthOut(BaseModel):
    """The health dashboard's data."""

    status: Literal["ok", "degraded", "failing"] = Field(
        description="failing: the mesh is not ready (as /readyz says); degraded: something fails or degrades "
        "but every required service serves; ok: everything passes."
    )
    checked_at: str
    components: list[ComponentHealth]
    queue: QueueHealth | None


class ReadyOut(BaseModel):
    """Readiness: what is failing, if anything."""

    status: Literal["ready", "not ready"]
    failing: list[ComponentHealth]
