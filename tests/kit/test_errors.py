"""MeshError <-> gRPC status with rich details, through grpcio-status."""

from __future__ import annotations

from typing import Any

import grpc

from mesh.kit import errors


class FailedCall(grpc.RpcError):
    """What a client sees of a failed call: its code, details and trailing metadata."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str | bytes], ...]
    ) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    @classmethod
    def of(cls, status: grpc.Status) -> FailedCall:
        return cls(status.code, status.details, tuple(status.trailing_metadata))

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:  # (key, value) pairs at run time; grpc-stubs declares other objects
        return self._trailing


def test_a_mesh_error_crosses_the_wire_with_its_details() -> None:
    """The status a server aborts with carries the rich details, and a client turns it back into the same
    error: type, message, reason, field violations and retry delay."""
    sent = errors.InvalidArgument(
        "page_size is bad", field_violations=[errors.FieldViolation("page_size", "must be positive")]
    )
    status = sent.grpc_status()
    assert (status.code, status.details) == (grpc.StatusCode.INVALID_ARGUMENT, "page_size is bad")
    received = errors.from_rpc_error(FailedCall.of(status))
    assert isinstance(received, errors.InvalidArgument)
    assert received.message == sent.message
    assert received.reason == sent.reason
    assert received.field_violations == sent.field_violations

    busy = errors.from_rpc_error(
        FailedCall.of(errors.ResourceExhausted("busy", retry_after_seconds=2).grpc_status())
    )
    assert isinstance(busy, errors.ResourceExhausted)
    assert busy.retry_after_seconds == 2


def test_details_that_contradict_the_calls_status_are_not_believed() -> None:
    """A proxy that rewrites the status but passes the trailers on: the call's own code and message win."""
    rich = errors.NotFound("image 1 not found").grpc_status()

    error = errors.from_rpc_error(
        FailedCall(grpc.StatusCode.UNAVAILABLE, "upstream connect error", tuple(rich.trailing_metadata))
    )
    assert isinstance(error, errors.Unavailable)
    assert error.message == "upstream connect error"
