"""One error type for the whole mesh, carrying its gRPC status, and one mapping to HTTP.

Domain code raises a :class:`MeshError` subclass; the server interceptor turns it into a gRPC status with
``google.rpc`` rich details (ErrorInfo, BadRequest, RetryInfo); clients turn an ``AioRpcError`` back into
the same type with :func:`from_rpc_error`; the gateway maps it to HTTP with :func:`http_status`.

Apart from those, a :class:`StartupError` stops a process that cannot start (exit 2, one line, no traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, TypeAlias

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from mesh.common.v1 import errors_pb2
from mesh.kit.logging import get_logger

log = get_logger(__name__)
ErrorCategory: TypeAlias = errors_pb2.ErrorCategory.ValueType
DOMAIN = "mesh"

# Reasons that pick a more precise HTTP status than the gRPC code alone.
REASON_UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
REASON_PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
REASON_INSUFFICIENT_STORAGE = "INSUFFICIENT_STORAGE"


# A status travels in the call's trailing metadata twice (grpc-message, percent-encoded, and the details,
# in base64), and gRPC refuses trailing metadata over 8 KiB (at random up to its 16 KiB hard limit): the call
# then fails RESOURCE_EXHAUSTED with none of our details. Texts that echo a request (a 10 000-character model
# name) are therefore cut to these UTF-8 sizes on the wire; the error keeps them whole in the process.
WIRE_MESSAGE_BYTES = 1024
WIRE_TEXT_BYTES = 512
"""A field's name, a violation's description, a metadata value."""
WIRE_DETAILS_BYTES = 2048
"""ErrorInfo and BadRequest together; violations past it are summed up in a last one."""


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, with an ellipsis where it was cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "…"


@dataclass(frozen=True)
class FieldViolation:
    """A bad field of a request: which one, and what to fix."""

    field: str
    description: str


def omitted(field: str, count: int) -> FieldViolation:
    """The last violation of a list cut short: it stands for the ``count`` more that were left out."""
    return FieldViolation(field, f"and {count} more problems left out here")


def listing(violations: Sequence[FieldViolation]) -> str:
    """``field: what to fix; field: ...``: a message that names every problem, for clients that show only it."""
    return "; ".join(f"{v.field}: {v.description}" for v in violations)


NO_RETRY_PUSHBACK = "grpc-retry-pushback-ms"
"""The trailing metadata by which a server tells a client's retry policy not to retry a call (a negative value;
gRFC A6)."""


class MeshError(Exception):
    """Base of every expected error; carries its gRPC status code and error category."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    default_category: ClassVar[ErrorCategory] = errors_pb2.ERROR_CATEGORY_SYSTEM
    default_reason: ClassVar[str | None] = None
    """The reason when none is given; None: the code's name. A subclass sets it where the reason picks a more
    precise HTTP status than the code (``_HTTP_BY_REASON``)."""

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        category: ErrorCategory | None = None,
        field_violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
        retry_after_seconds: float | None = None,
        retries_spent: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason or self.code.name
        self.category: ErrorCategory = self.default_category if category is None else category
        self.field_violations = tuple(field_violations)
        self.metadata = dict(metadata or {})
        self.retry_after_seconds = retry_after_seconds
        self.retries_spent = retries_spent
        """The server has already waited out its own retries for this failure (PostgreSQL away for its whole
        pool wait): the caller's channel is told not to try again at once (gRPC's server pushback), which
        would only wait as long once more per attempt. The caller still gets RetryInfo and may retry later."""

    def to_status(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` with ErrorInfo and, where known, BadRequest and RetryInfo, its texts cut
        to what the call's trailing metadata can carry (``WIRE_*``)."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason,
            domain=DOMAIN,
            metadata={
                "category": errors_pb2.ErrorCategory.Name(self.category),
                **{key: clip(value, WIRE_TEXT_BYTES) for key, value in self.metadata.items()},
            },
        )
        details = [_pack(info)]
        if self.field_violations:
            details.append(_pack(self._bad_request(WIRE_DETAILS_BYTES - info.ByteSize())))
        if self.retry_after_seconds is not None:
            delay = duration_pb2.Duration()
            delay.FromTimedelta(timedelta(seconds=self.retry_after_seconds))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status_pb2.Status(
            code=self.code.value[0], message=clip(self.message, WIRE_MESSAGE_BYTES), details=details
        )

    def _bad_request(self, budget: int) -> error_details_pb2.BadRequest:
        """The field violations, in order, as many as ``budget`` bytes hold; the rest summed up in a last one."""
        bad = error_details_pb2.BadRequest()
        for index, violation in enumerate(self.field_violations):
            field = clip(violation.field, WIRE_TEXT_BYTES)
            bad.field_violations.add(field=field, description=clip(violation.description, WIRE_TEXT_BYTES))
            if bad.ByteSize() > budget and index > 0:
                del bad.field_violations[-1]
                left = len(self.field_violations) - index
                more = omitted(field, left)
                bad.field_violations.add(field=more.field, description=more.description)
                break
        return bad

    def grpc_status(self) -> grpc.Status:
        """The status to abort a call with: code, message and the rich status in the trailing metadata (and,
        for an error whose retries are spent, gRPC's pushback that stops the channel's retries)."""
        status: grpc.Status = rpc_status.to_status(self.to_status())
        if self.retries_spent:
            status = status._replace(  # type: ignore[attr-defined]
                trailing_metadata=(*status.trailing_metadata, (NO_RETRY_PUSHBACK, "-1"))
            )
        return status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class InvalidArgument(MeshError):
    """The request is malformed; it can never succeed as given."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_category = errors_pb2.ERROR_CATEGORY_PERMANENT


class InvalidData(InvalidArgument):
    """The data (an image) is unusable: undecodable, truncated, of an absurd shape."""

    default_category = errors_pb2.ERROR_CATEGORY_DATA


class UnsupportedMediaType(InvalidArgument):
    """The bytes are not an image type the mesh accepts (HTTP 415)."""

    default_category = errors_pb2.ERROR_CATEGORY_DATA
    default_reason = REASON_UNSUPPORTED_MEDIA_TYPE


class NotFound(MeshError):
    """The named entity does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_category = errors_pb2.ERROR_CATEGORY_PERMANENT


class AlreadyExists(MeshError):
    """The entity exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_category = errors_pb2.ERROR_CATEGORY_PERMANENT


class FailedPrecondition(MeshError):
    """The system is not in a state that allows the operation (e.g. cancel of a finished job)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_category = errors_pb2.ERROR_CATEGORY_PERMANENT


class Aborted(MeshError):
    """A concurrency conflict; the caller may retry the whole operation."""

    code = grpc.StatusCode.ABORTED
    default_category = errors_pb2.ERROR_CATEGORY_TRANSIENT


class ResourceExhausted(MeshError):
    """A limit was hit: a rate limit, a queue bound, GPU memory."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_category = errors_pb2.ERROR_CATEGORY_TRANSIENT


class PayloadTooLarge(ResourceExhausted):
    """The payload exceeds a size or pixel limit (HTTP 413); sending it again will not help."""

    default_category = errors_pb2.ERROR_CATEGORY_PERMANENT
    default_reason = REASON_PAYLOAD_TOO_LARGE


class StorageFull(ResourceExhausted):
    """A volume the service writes to is full (HTTP 507). gRPC names a full file system as RESOURCE_EXHAUSTED;
    it is not UNAVAILABLE, whose "retry shortly" would not help until someone frees or adds space."""

    default_category = errors_pb2.ERROR_CATEGORY_SYSTEM
    default_reason = REASON_INSUFFICIENT_STORAGE


class Unauthenticated(MeshError):
    """No valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_category = errors_pb2.ERROR_CATEGORY_PERMANENT


class PermissionDenied(MeshError):
    """Credentials are valid but not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_category = errors_pb2.ERROR_CATEGORY_PERMANENT


class Unimplemented(MeshError):
    """The operation is not offered by this server."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_category = errors_pb2.ERROR_CATEGORY_PERMANENT


class Unavailable(MeshError):
    """A dependency is down or the service is draining; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
    default_category = errors_pb2.ERROR_CATEGORY_TRANSIENT


class DeadlineExceeded(MeshError):
    """The call ran out of time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_category = errors_pb2.ERROR_CATEGORY_TRANSIENT


class Cancelled(MeshError):
    """The caller went away or cancelled."""

    code = grpc.StatusCode.CANCELLED
    default_category = errors_pb2.ERROR_CATEGORY_TRANSIENT


class Internal(MeshError):
    """A bug or an unexpected failure of the mesh itself."""

    code = grpc.StatusCode.INTERNAL
    default_category = errors_pb2.ERROR_CATEGORY_SYSTEM


_BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unimplemented,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}

_HTTP_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_HTTP_BY_REASON: dict[str, int] = {
    REASON_UNSUPPORTED_MEDIA_TYPE: 415,
    REASON_PAYLOAD_TOO_LARGE: 413,
    REASON_INSUFFICIENT_STORAGE: 507,
}


def http_status(error: MeshError) -> int:
    """The HTTP status for an error: the reason decides where it is more precise than the code."""
    return _HTTP_BY_REASON.get(error.reason, _HTTP_BY_CODE.get(error.code, 500))


def error_body(error: MeshError) -> dict[str, object]:
    """The REST error body of the contract: ``{"error": {"code", "message", "details"}}``."""
    details: list[dict[str, object]] = [
        {
            "type": "ErrorInfo",
            "reason": error.reason,
            "domain": DOMAIN,
            "category": errors_pb2.ErrorCategory.Name(error.category).removeprefix("ERROR_CATEGORY_"),
            "metadata": error.metadata,
        }
    ]
    if error.field_violations:
        details.append(
            {
                "type": "BadRequest",
                "field_violations": [
                    {"field": v.field, "description": v.description} for v in error.field_violations
                ],
            }
        )
    if error.retry_after_seconds is not None:
        details.append({"type": "RetryInfo", "retry_delay_seconds": error.retry_after_seconds})
    return {"error": {"code": error.code.name, "message": error.message, "details": details}}


def from_status(status: status_pb2.Status) -> MeshError:
    """Rebuild a :class:`MeshError` from a ``google.rpc.Status`` (for example a stream item's error)."""
    code = _code_from_int(status.code)
    cls = _BY_CODE.get(code, Internal)
    reason = ""
    category: ErrorCategory | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            metadata = {k: v for k, v in info.metadata.items() if k != "category"}
            if "category" in info.metadata:
                category = errors_pb2.ErrorCategory.Value(info.metadata["category"])
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    error = cls(
        status.message,
        reason=reason,
        category=category,
        field_violations=violations,
        metadata=metadata,
        retry_after_seconds=retry_after,
    )
    return error


_TRANSPORT_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "the service behind this one is unavailable (restarting or unreachable); retry shortly",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the service behind this one did not answer in time",
    grpc.StatusCode.INTERNAL: "the service behind this one failed; the cause is logged",
    grpc.StatusCode.UNKNOWN: "the service behind this one failed; the cause is logged",
}
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


def from_rpc_error(error: grpc.RpcError) -> MeshError:
    """Turn a failed call's status (with rich details when the server sent them) into a MeshError."""
    call: Any = error  # AioRpcError and the sync Call both have code(), details(), trailing_metadata()
    code: grpc.StatusCode = call.code()
    try:
        status: status_pb2.Status | None = rpc_status.from_call(call)
    except ValueError:  # rich details that contradict the call's own status (a proxy rewrote it): not used
        status = None
    if status is not None:
        return from_status(status)
    # No details: gRPC itself failed the call (or a proxy did), and its text names addresses and sockets
    # ("failed to connect to all addresses; ... ipv4:10.0.3.7:50051: Connection refused"), which callers of
    # the gateway must not see; the text is logged here instead.
    message = _TRANSPORT_MESSAGES.get(code)
    if message is None:
        return _BY_CODE.get(code, Internal)(call.details() or code.name)
    log.warning("call failed without details", code=code.name, details=call.details())
    return _BY_CODE.get(code, Internal)(message, retry_after_seconds=1.0 if code in _RETRYABLE else None)


class StartupError(Exception):
    """A service cannot start until its operator fixes something outside it (a volume's permissions): the
    message names what is wrong and the fix, and :func:`exit_on_startup_error` prints it as one line."""


@contextmanager
def exit_on_startup_error(service: str) -> Iterator[None]:
    """Around a service's start: a :class:`StartupError` ends the process with its message on one stderr
    line and exit status 2, as a bad setting does, rather than a traceback that buries the fix."""
    try:
        yield
    except StartupError as error:
        print(f"{service}: cannot start: {error}", file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Around an outgoing gRPC call (or the iteration of its stream): a failure is raised as the
    matching :class:`MeshError`, with the server's rich details, never as a raw ``RpcError``."""
    try:
        yield
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None


def _code_from_int(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
