"""MeshError <-> gRPC status with rich details, through grpcio-status."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

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
    """A proxy that rewrites the status but passes the trailers on: the call's own code wins, with a message of
    our own (the details' "not found" is not believed)."""
    rich = errors.NotFound("image 1 not found").grpc_status()

    error = errors.from_rpc_error(
        FailedCall(grpc.StatusCode.UNAVAILABLE, "upstream connect error", tuple(rich.trailing_metadata))
    )
    assert isinstance(error, errors.Unavailable)
    assert "unavailable" in error.message
    assert "not found" not in error.message


async def test_an_error_echoing_a_huge_request_still_arrives_as_itself() -> None:
    """An error whose message, metadata and violations echo a huge request (100 000-character names, 500 bad
    fields, non-ASCII text) reaches a real client with its own code and details, its texts cut to what the
    trailing metadata can carry; whole, gRPC failed the call RESOURCE_EXHAUSTED ("metadata size exceeds
    hard limit") without any of them."""
    name = "é" * 100_000
    sent = errors.NotFound(
        f"model {name!r} does not exist",
        field_violations=[errors.FieldViolation(f"steps[{i}].{name}", name) for i in range(500)],
        metadata={"model": name},
    )

    async def fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        status = sent.grpc_status()  # aborted as the servers' interceptor does
        await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
        raise AssertionError("abort returned")

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("t.T", {"Call": grpc.unary_unary_rpc_method_handler(fail)})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary("/t.T/Call", request_serializer=None, response_deserializer=None)(
                    b""
                )
    finally:
        await server.stop(0)
    received = errors.from_rpc_error(failed.value)
    assert isinstance(received, errors.NotFound)
    assert received.message.startswith("model 'éé")
    assert received.message.endswith("…")
    assert len(received.message.encode()) <= errors.WIRE_MESSAGE_BYTES
    assert received.metadata["model"].endswith("…")
    assert 1 <= len(received.field_violations) < 500
    assert received.field_violations[-1].description.endswith("more problems left out here")


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, errors.Internal),
    ],
)
def test_grpcs_own_failure_text_is_not_passed_on(code: grpc.StatusCode, kind: type[errors.MeshError]) -> None:
    """A call gRPC itself failed (no details) names addresses and sockets; callers get the failure's kind with
    a message of our own, and the text stays in the log."""
    raw = "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.3.7:50051: Connection refused"
    error = errors.from_rpc_error(FailedCall(code, raw, ()))
    assert isinstance(error, kind)
    assert "10.0.3.7" not in error.message
    assert "service behind this one" in error.message


@pytest.mark.parametrize(
    ("kind", "reason", "status"),
    [
        (errors.UnsupportedMediaType, errors.REASON_UNSUPPORTED_MEDIA_TYPE, 415),
        (errors.PayloadTooLarge, errors.REASON_PAYLOAD_TOO_LARGE, 413),
        (errors.StorageFull, errors.REASON_INSUFFICIENT_STORAGE, 507),
    ],
)
def test_an_error_with_a_precise_http_status_has_its_reason_by_default(
    kind: type[errors.MeshError], reason: str, status: int
) -> None:
    """415, 413 and 507 come from a default reason of their own; a reason given explicitly still wins, and the
    other keywords still reach MeshError."""
    error = kind("too much", retry_after_seconds=2.0)
    assert (error.reason, errors.http_status(error), error.retry_after_seconds) == (reason, status, 2.0)
    assert kind("x", reason="OTHER").reason == "OTHER"
    assert errors.InvalidArgument("x").reason == "INVALID_ARGUMENT"


def test_a_startup_error_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A StartupError around a service's start ends the process with status 2 and its message on one stderr
    line, no traceback."""
    with pytest.raises(SystemExit) as exited, errors.exit_on_startup_error("file"):
        raise errors.StartupError("the blob directory is not writable")
    assert exited.value.code == 2
    assert capsys.readouterr().err == "file: cannot start: the blob directory is not writable\n"


def test_other_errors_pass_through_the_startup_guard() -> None:
    """Only a StartupError is turned into exit 2: a bug still raises as itself, with its traceback."""
    with pytest.raises(RuntimeError, match="a bug"), errors.exit_on_startup_error("file"):
        raise RuntimeError("a bug")
