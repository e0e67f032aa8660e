"""The server bootstrap: health, reflection, error mapping, metrics and graceful drain."""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as reflection_pb
from pydantic import ValidationError

from mesh.kit import errors
from mesh.kit.channels import open_channel
from mesh.kit.errors import StartupError
from mesh.kit.health import Degrading
from mesh.kit.runtime import (
    HTTP_STOP_SECONDS,
    LIVENESS_SERVICE,
    RESTARTING,
    BackgroundTaskCrashed,
    ServiceRuntime,
    pause_unless_stopping,
    sleep_unless_stopping,
    until_stopping,
)
from mesh.kit.settings import CallerSettings, ServerSettings

SERVICE = "test.v1.EchoService"


@dataclass
class SwitchCheck:
    """A dependency check the test turns on and off."""

    up: bool = True
    name: str = "switch"

    async def check(self) -> str:
        if not self.up:
            raise ConnectionError("switch is off")
        return "on"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    if request == b"bad":
        raise errors.InvalidArgument(
            "payload is bad", field_violations=[errors.FieldViolation("payload", "must not be 'bad'")]
        )
    if request == b"crash":
        raise RuntimeError("secret internals")
    if request == b"huge":
        raise errors.InvalidArgument(f"no parameter {'k' * 1_000_000!r}")
    if request == b"slow":
        await asyncio.sleep(0.5)
    return request


async def _stream(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    for i in range(3):
        yield request + bytes([i])
    raise errors.NotFound("no more")


def _identity(x: bytes) -> bytes:
    return x


@pytest.fixture
async def runtime() -> AsyncIterator[tuple[ServiceRuntime, SwitchCheck, asyncio.Task[None]]]:
    settings = ServerSettings(grpc_port=0, http_port=0, grace_seconds=2, health_interval_seconds=0.05)
    switch = SwitchCheck()
    rt = ServiceRuntime("echo", settings, service_names=[SERVICE], checks=[switch])

    async def watch(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        while True:  # a watch of something that never ends, polled
            yield request
            await pause_unless_stopping(rt.stopping, 0.05)

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo, _identity, _identity),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream, _identity, _identity),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, _identity, _identity),
    }
    rt.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    task = asyncio.create_task(rt.run())
    await asyncio.wait_for(rt.started.wait(), 10)
    yield rt, switch, task
    rt.stopping.set()
    await asyncio.wait_for(task, 10)


async def _health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        return int(response.status)


async def test_health_follows_dependency_checks(runtime: Any) -> None:
    """A failing dependency turns every service name NOT_SERVING; recovery turns it back, no restart."""
    rt, switch, _ = runtime
    assert await _health(rt.grpc_port, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    switch.up = False
    await asyncio.sleep(0.2)
    assert await _health(rt.grpc_port, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await _health(rt.grpc_port, "") == health_pb2.HealthCheckResponse.NOT_SERVING
    switch.up = True
    await asyncio.sleep(0.2)
    assert await _health(rt.grpc_port, SERVICE) == health_pb2.HealthCheckResponse.SERVING


async def test_a_degrading_dependency_is_reported_but_the_service_keeps_serving(runtime: Any) -> None:
    """A check wrapped in Degrading (RabbitMQ behind the queue's outbox, a job worker's connections) that
    fails leaves every name SERVING and /healthz 200, with the check reported ``degraded``; an essential
    check failing beside it still turns the service NOT_SERVING."""
    rt, switch, _ = runtime
    optional = SwitchCheck(up=False, name="optional")
    rt.monitor.add_check(Degrading(optional))
    await asyncio.sleep(0.2)
    assert await _health(rt.grpc_port, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    async with httpx.AsyncClient(base_url=f"http://localhost:{rt.http_port}") as client:
        health = await client.get("/healthz")
        assert health.status_code == 200
        statuses = {c["name"]: c["status"] for c in health.json()["checks"]}
        assert statuses == {"switch": "ok", "optional": "degraded"}
        switch.up = False
        await asyncio.sleep(0.2)
        assert await _health(rt.grpc_port, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        statuses = {c["name"]: c["status"] for c in (await client.get("/healthz")).json()["checks"]}
        assert statuses == {"switch": "failing", "optional": "degraded"}


async def test_liveness_ignores_dependencies(runtime: Any) -> None:
    """The liveness name stays SERVING while a dependency is down, so probes do not restart the pod."""
    rt, switch, _ = runtime
    switch.up = False
    await asyncio.sleep(0.2)
    assert await _health(rt.grpc_port, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await _health(rt.grpc_port, LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING


async def test_mesh_error_becomes_rich_status(runtime: Any) -> None:
    """A MeshError reaches the client with its code, message and field violations."""
    rt, _, _ = runtime
    channel = open_channel(f"localhost:{rt.grpc_port}", CallerSettings(), service=SERVICE)
    call = channel.unary_unary(f"/{SERVICE}/Echo", None, None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"bad")
    error = errors.from_rpc_error(info.value)
    assert isinstance(error, errors.InvalidArgument)
    assert error.message == "payload is bad"
    assert error.field_violations == (errors.FieldViolation("payload", "must not be 'bad'"),)
    assert errors.http_status(error) == 400
    await channel.close(None)


async def test_unexpected_exception_is_internal_without_internals(runtime: Any) -> None:
    """A crash answers INTERNAL and does not leak the exception text."""
    rt, _, _ = runtime
    async with grpc.aio.insecure_channel(f"localhost:{rt.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(f"/{SERVICE}/Echo", None, None)(b"crash")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (info.value.details() or "")


async def test_stream_error_after_items(runtime: Any) -> None:
    """A server stream delivers its items, then the mapped error."""
    rt, _, _ = runtime
    async with grpc.aio.insecure_channel(f"localhost:{rt.grpc_port}") as channel:
        call = channel.unary_stream(f"/{SERVICE}/Stream", None, None)(b"x")
        items = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for item in call:
                items.append(item)
    assert items == [b"x\x00", b"x\x01", b"x\x02"]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_metrics_and_healthz_on_http_port(runtime: Any) -> None:
    """The HTTP port serves Prometheus metrics with per-RPC counts and a JSON /healthz."""
    rt, _, _ = runtime
    async with grpc.aio.insecure_channel(f"localhost:{rt.grpc_port}") as channel:
        await channel.unary_unary(f"/{SERVICE}/Echo", None, None)(b"ok")
    port = _http_port(rt)
    async with httpx.AsyncClient(base_url=f"http://localhost:{port}") as client:
        metrics = (await client.get("/metrics/")).text
        health = await client.get("/healthz")
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="Echo"' in metrics
    assert health.status_code == 200
    assert health.json()["checks"][0]["name"] == "switch"


async def test_sigterm_drains_in_flight_calls(runtime: Any) -> None:
    """Stopping lets an in-flight call finish and turns health NOT_SERVING first."""
    rt, _, task = runtime
    async with grpc.aio.insecure_channel(f"localhost:{rt.grpc_port}") as channel:
        slow = asyncio.ensure_future(channel.unary_unary(f"/{SERVICE}/Echo", None, None)(b"slow"))
        await asyncio.sleep(0.1)
        rt.stopping.set()
        assert await slow == b"slow"
    await asyncio.wait_for(task, 10)


async def test_the_drain_refuses_new_calls_at_once_and_has_one_deadline() -> None:
    """From the stop on, the server turns new calls away (they were let in while background tasks drained),
    and calls in flight and background tasks share one grace: a call and a task that both outlast it are cut
    at the grace, not one grace after the other (twice the grace and more, past the kubelet's SIGKILL).
    /healthz still answers during the drain, 503 NOT_SERVING."""
    grace = 1.0
    settings = ServerSettings(grpc_port=0, http_port=0, grace_seconds=grace, health_interval_seconds=0.05)
    rt = ServiceRuntime("drain", settings, service_names=[SERVICE])

    async def hold(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await asyncio.sleep(30)
        return request

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo, _identity, _identity),
        "Hold": grpc.unary_unary_rpc_method_handler(hold, _identity, _identity),
    }
    rt.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])

    async def stubborn() -> None:  # ignores ``stopping``: cancelled at the end of the grace
        await asyncio.sleep(30)

    rt.add_background(stubborn)
    task = asyncio.create_task(rt.run())
    await asyncio.wait_for(rt.started.wait(), 10)
    address = f"localhost:{rt.grpc_port}"
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(address) as channel:
        held = asyncio.ensure_future(channel.unary_unary(f"/{SERVICE}/Hold", None, None)(b"held"))
        await asyncio.sleep(0.2)
        started = loop.time()
        rt.stopping.set()
        await asyncio.sleep(0.2)
        async with grpc.aio.insecure_channel(address) as late:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await late.unary_unary(f"/{SERVICE}/Echo", None, None)(b"late", timeout=2)
        async with httpx.AsyncClient(base_url=f"http://localhost:{rt.http_port}") as client:
            health = await client.get("/healthz")
        with pytest.raises(grpc.aio.AioRpcError):
            await held
        await asyncio.wait_for(task, 10)
    stopped = loop.time() - started
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (health.status_code, health.json()["status"]) == (503, "NOT_SERVING")
    assert grace <= stopped < grace + HTTP_STOP_SECONDS / 2


async def test_a_watch_ends_unavailable_when_stopping_and_the_drain_does_not_wait_for_it(
    runtime: Any,
) -> None:
    """A call that pauses with pause_unless_stopping ends UNAVAILABLE ("restarting; retry") as soon as the
    service starts stopping, so the drain ends without waiting out its grace (2 s here), during which the
    server turns new calls away."""
    rt, _, task = runtime
    async with grpc.aio.insecure_channel(f"localhost:{rt.grpc_port}") as channel:
        call = channel.unary_stream(f"/{SERVICE}/Watch", None, None)(b"w")
        assert await call.read() == b"w"
        started = asyncio.get_running_loop().time()
        rt.stopping.set()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while True:
                await call.read()
        ended = asyncio.get_running_loop().time() - started
    await asyncio.wait_for(task, 10)
    stopped = asyncio.get_running_loop().time() - started
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAVAILABLE, RESTARTING)
    assert ended < 0.5
    assert stopped < 1.5


async def test_sleep_unless_stopping_waits_the_interval_when_the_service_does_not_stop() -> None:
    """With ``stopping`` never set, sleep_unless_stopping waits the whole interval and answers False."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await sleep_unless_stopping(asyncio.Event(), 0.1) is False
    assert loop.time() - started >= 0.09


async def test_sleep_unless_stopping_ends_when_stopping_is_set_mid_wait() -> None:
    """``stopping`` set during the wait ends it at once with True, not after the interval (60 s here)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, stopping.set)
    started = loop.time()
    assert await asyncio.wait_for(sleep_unless_stopping(stopping, 60), 5) is True
    assert loop.time() - started < 1


async def test_sleep_unless_stopping_answers_at_once_when_already_stopping() -> None:
    """A service already stopping is not waited for: True without a wait, however long the interval."""
    stopping = asyncio.Event()
    stopping.set()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(sleep_unless_stopping(stopping, 60), 5) is True
    assert loop.time() - started < 0.5


async def test_metrics_answer_at_their_path_without_a_redirect(runtime: Any) -> None:
    """/metrics, the path scrape configs and the pods' annotations name, answers 200 itself (it answered a
    307 to /metrics/, which curl and simple probes take for the answer); /metrics/ still works."""
    rt, _, _ = runtime
    async with httpx.AsyncClient(base_url=f"http://localhost:{_http_port(rt)}") as client:
        plain = await client.get("/metrics")
        slash = await client.get("/metrics/")
    assert (plain.status_code, slash.status_code) == (200, 200)
    assert plain.headers["content-type"].startswith("text/plain")
    assert "grpc_server_started_total" in plain.text


def _http_port(rt: ServiceRuntime) -> int:
    return rt.http_port


async def test_rpc_errors_raise_mesh_errors(runtime: Any) -> None:
    """Around a call, rpc_errors() turns the failure into the server's MeshError with its details."""
    rt, _, _ = runtime
    async with grpc.aio.insecure_channel(f"localhost:{rt.grpc_port}") as channel:
        with pytest.raises(errors.InvalidArgument) as info, errors.rpc_errors():
            await channel.unary_unary(f"/{SERVICE}/Echo", None, None)(b"bad")
    assert info.value.field_violations[0].field == "payload"


async def test_a_call_the_client_cancels_gets_its_access_line_and_count(
    runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A call cancelled by its client is logged like every other call ("rpc", code CANCELLED, duration) and
    counted; it was counted but left no line, so a client's giving up showed nowhere in the logs."""
    rt, _, _ = runtime
    with caplog.at_level(logging.INFO, logger="mesh.kit.interceptors"):
        async with grpc.aio.insecure_channel(f"localhost:{rt.grpc_port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/Echo", None, None)(b"slow")
            await asyncio.sleep(0.1)
            call.cancel()
            for _ in range(50):
                lines = [
                    r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == "rpc"
                ]
                if lines:
                    break
                await asyncio.sleep(0.02)
    assert [(line["rpc"], line["code"]) for line in lines] == [(f"{SERVICE}/Echo", "CANCELLED")]
    assert lines[0]["duration_ms"] >= 50
    async with httpx.AsyncClient(base_url=f"http://localhost:{_http_port(rt)}") as client:
        exposed = (await client.get("/metrics/")).text
    assert f'grpc_code="CANCELLED",grpc_method="Echo",grpc_service="{SERVICE}"' in exposed


async def test_the_rpc_failed_line_of_a_huge_error_is_capped_and_says_so(
    runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An error whose message echoes a 1 MB request (a parameter's name) is logged with its first 2 000
    characters and its full length: the ``rpc failed`` line held all of it, twice over when rendered."""
    rt, _, _ = runtime
    with caplog.at_level(logging.INFO, logger="mesh.kit.interceptors"):
        async with grpc.aio.insecure_channel(f"localhost:{rt.grpc_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary(f"/{SERVICE}/Echo", None, None)(b"huge")
    [line] = [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == "rpc failed"]
    assert line["code"] == "INVALID_ARGUMENT"
    assert line["error"].startswith("no parameter 'kkk")
    assert line["error"].endswith("… (cut from 1000015 characters)")
    assert len(json.dumps(line)) < 2500


def test_configure_logging_is_remembered_for_child_processes() -> None:
    """A worker process replays the server's logging setup (service, level, format) from current_logging()."""
    from mesh.kit.logging import LoggingSetup, configure_logging, current_logging

    previous = current_logging()
    configure_logging("inference", level="warning", fmt="console")
    try:
        assert current_logging() == LoggingSetup("inference", "warning", "console")
    finally:
        (previous or LoggingSetup("tests", "info", "json")).apply()


def test_a_configured_process_exposes_no_created_series() -> None:
    """After configure_observability, counters and histograms expose their samples without the extra
    `_created` gauge per series that prometheus-client adds by default."""
    script = (
        "from prometheus_client import Counter, Histogram, generate_latest\n"
        "from mesh.kit.runtime import configure_observability\n"
        "configure_observability('probe')\n"
        "Counter('probe_calls_total', 'calls', ['code']).labels('OK').inc()\n"
        "Histogram('probe_seconds', 'time').observe(0.1)\n"
        "print(generate_latest().decode())\n"
    )
    exposed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert 'probe_calls_total{code="OK"} 1.0' in exposed
    assert "probe_seconds_count 1.0" in exposed
    assert "_created" not in exposed


def test_a_service_starts_from_its_environment_or_exits_naming_the_bad_variable() -> None:
    """start_service reads the settings from the environment, sets up logging in the service's name and
    exports ``mesh_build_info`` naming the service; a bad variable ends the process with status 2 and a message
    naming it, before anything else runs."""
    script = (
        "from prometheus_client import REGISTRY, generate_latest\n"
        "from mesh.kit.logging import get_logger\n"
        "from mesh.kit.runtime import start_service\n"
        "from mesh.kit.settings import ServerSettings\n"
        "settings = start_service('probe', ServerSettings, large_messages=True)\n"
        "print([l for l in generate_latest(REGISTRY).decode().splitlines() if l.startswith('mesh_build_info')])\n"
        "get_logger('probe').info('up', grpc_port=settings.grpc_port)\n"
    )
    env = {**os.environ, "MESH_GRPC_PORT": "50999", "MESH_LOG_FORMAT": "json"}
    started = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 0, started.stderr
    line = json.loads((started.stdout + started.stderr).strip().splitlines()[-1])
    assert (line["event"], line["service"], line["grpc_port"]) == ("up", "probe", 50999)
    version = importlib.metadata.version("mesh")
    assert f'[\'mesh_build_info{{service="probe",version="{version}"}} 1.0\']' in started.stdout
    refused = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "MESH_GRPC_PORT": "not-a-port"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "MESH_GRPC_PORT" in refused.stderr


async def test_the_http_port_starts_without_uvicorn_s_own_lines(caplog: pytest.LogCaptureFixture) -> None:
    """A service's start says "service started" with both ports; uvicorn's "Uvicorn running on ... (Press
    CTRL+C to quit)" and its other start and stop lines, wrong under `make up` and Kubernetes, are not logged."""
    settings = ServerSettings(grpc_port=0, http_port=0, grace_seconds=1, health_interval_seconds=0.05)
    rt = ServiceRuntime("quiet", settings, service_names=[SERVICE])
    with caplog.at_level(logging.INFO):
        task = asyncio.create_task(rt.run())
        await asyncio.wait_for(rt.started.wait(), 10)
        rt.stopping.set()
        await asyncio.wait_for(task, 10)
    uvicorn_lines = [
        r for r in caplog.records if r.name.startswith("uvicorn") and r.levelno < logging.WARNING
    ]
    assert uvicorn_lines == []
    assert any(isinstance(r.msg, dict) and r.msg.get("event") == "service started" for r in caplog.records)


def test_every_method_is_exported_at_zero_before_its_first_call() -> None:
    """Each method of a described service has its series at 0 for every status code before any call, so that
    ``rate()`` sees the first failure after a restart (a series born at 1 has no earlier sample)."""
    from prometheus_client import REGISTRY, generate_latest

    from mesh.image.v1 import image_processing_service_pb2
    from mesh.kit.interceptors import preinitialise_metrics

    service = image_processing_service_pb2.DESCRIPTOR.services_by_name["ImageProcessingService"].full_name
    preinitialise_metrics([service, SERVICE])  # SERVICE has no descriptor: skipped, not an error
    exposed = generate_latest(REGISTRY).decode()
    for method, kind in (("ListFilters", "unary"), ("StreamProcess", "bidi_stream")):
        for code in ("OK", "INTERNAL", "UNAVAILABLE"):
            series = (
                f'grpc_server_handled_total{{grpc_code="{code}",grpc_method="{method}",'
                f'grpc_service="{service}",grpc_type="{kind}"}}'
            )
            assert series in exposed, series
        started = (
            f'grpc_server_started_total{{grpc_method="{method}",grpc_service="{service}",grpc_type="{kind}"}}'
        )
        assert started in exposed


async def test_a_background_task_that_crashes_stops_the_service_with_its_error_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job worker or sweep that raises stops the service (run() raises, so the process exits 1 for its
    supervisor to restart it), and its error is logged when it happens; before, the service served on, healthy and idle, and the error was
    swallowed at shutdown."""
    settings = ServerSettings(grpc_port=0, http_port=0, grace_seconds=1, health_interval_seconds=0.05)
    rt = ServiceRuntime("crashy", settings, service_names=[SERVICE])

    class Worker:
        async def consume(self) -> None:
            raise RuntimeError("PRECONDITION_FAILED inequivalent arg 'x-delivery-limit'")

    rt.add_background(lambda: Worker().consume())
    with caplog.at_level(logging.ERROR), pytest.raises(BackgroundTaskCrashed) as stopped:
        await asyncio.wait_for(rt.run(), 20)
    assert isinstance(stopped.value.__cause__, RuntimeError)
    crashed = [
        r.msg
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "background task crashed; stopping"
    ]
    assert len(crashed) == 1
    assert crashed[0]["task"].endswith("Worker.consume")
    assert "x-delivery-limit" in repr(crashed[0]["exc_info"])


@pytest.mark.parametrize(
    ("cls", "variable", "value"),
    [
        (CallerSettings, "rpc_timeout_seconds", "inf"),
        (CallerSettings, "rpc_timeout_seconds", "1e7"),
        (ServerSettings, "health_interval_seconds", "inf"),
    ],
)
def test_settings_refuse_infinite_or_huge_times(
    cls: type[CallerSettings | ServerSettings], variable: str, value: str
) -> None:
    """inf and nan passed every gt=0 bound (health frozen at its first answer), and a deadline of 10**6 s or
    more was written 1e+06s, which gRPC refuses, failing every call."""
    with pytest.raises(ValidationError):
        cls.model_validate({variable: value})


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
async def test_reflection_answers_under_v1_and_v1alpha(runtime: Any, version: str) -> None:
    """grpcurl and Postman ask ``grpc.reflection.v1`` first and a v1-only client found nothing (UNIMPLEMENTED):
    both names list the services and describe a symbol the same way."""
    rt, _, _ = runtime
    async with grpc.aio.insecure_channel(f"localhost:{rt.grpc_port}") as channel:
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb.ServerReflectionRequest(list_services=""),
            reflection_pb.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
        ]
        listed, described = [reply async for reply in info(iter(requests))]
    names = {service.name for service in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


async def _requests(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


async def test_until_stopping_passes_every_request_of_a_stream_the_client_ends() -> None:
    """Until the service stops, the stream's requests pass through unchanged, and its end ends the reading."""
    stopping = asyncio.Event()
    assert [r async for r in until_stopping(_requests("a", "b", "c"), stopping)] == ["a", "b", "c"]


async def _held_open(read_cancelled: asyncio.Event, *items: str) -> AsyncIterator[str]:
    """A client stream that sends ``items``, then stays open without sending; ``read_cancelled`` is set when the
    read waiting on it is cancelled."""
    for item in items:
        yield item
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        read_cancelled.set()
        raise
    yield "never"


async def test_until_stopping_ends_a_stream_left_open_unavailable_when_the_service_stops() -> None:
    """A client that keeps its stream open without sending: the reading ends UNAVAILABLE (``RESTARTING``) as
    soon as ``stopping`` is set, after the requests already received, and the read in progress is cancelled."""
    stopping = asyncio.Event()
    read_cancelled = asyncio.Event()
    reading = until_stopping(_held_open(read_cancelled, "a", "b"), stopping)
    assert [await anext(reading), await anext(reading)] == ["a", "b"]
    pending = asyncio.ensure_future(anext(reading))
    await asyncio.sleep(0.05)
    assert not pending.done()
    stopping.set()
    with pytest.raises(errors.Unavailable) as info:
        await asyncio.wait_for(pending, 1)
    assert info.value.message == RESTARTING
    assert read_cancelled.is_set()


async def test_until_stopping_leaves_no_read_waiting_when_its_reader_is_cancelled() -> None:
    """A handler cancelled with its call while it waits for the next request (the client went away) takes
    the read in progress with it, rather than leaving a task that nothing collects."""
    read_cancelled = asyncio.Event()

    async def handler() -> None:
        async for _ in until_stopping(_held_open(read_cancelled), asyncio.Event()):
            pass

    task = asyncio.ensure_future(handler())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert read_cancelled.is_set()


async def test_until_stopping_collects_a_read_that_ended_as_its_reader_was_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client's stream ends in the very moment its handler is cancelled (a deadline, a client gone): the
    read's end is collected, not left to asyncio's "Task exception was never retrieved" ERROR line."""

    class Requests:
        def __init__(self) -> None:
            self.read: asyncio.Future[str] | None = asyncio.get_running_loop().create_future()

        def __aiter__(self) -> Requests:
            return self

        async def __anext__(self) -> str:
            assert self.read is not None
            return await self.read

    requests = Requests()

    async def handler() -> None:
        async for _ in until_stopping(requests, asyncio.Event()):
            pass

    task = asyncio.ensure_future(handler())
    await asyncio.sleep(0.01)
    assert requests.read is not None
    requests.read.set_exception(StopAsyncIteration())  # the stream ends...
    task.cancel()  # ...as its call is cancelled, in the same turn of the loop
    with pytest.raises(asyncio.CancelledError):
        await task
    requests.read = None
    del task
    await asyncio.sleep(0.01)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
        await asyncio.sleep(0.01)
    assert "never retrieved" not in caplog.text


async def test_a_grpc_port_in_use_stops_the_start_naming_it() -> None:
    """gRPC only logs that it could not bind and answers port 0: a service whose port another process held ran
    on with no gRPC port, healthy on its HTTP port (seen under `make up` right after another mesh stopped).
    The start now fails naming the port."""
    for host in ("0.0.0.0", "127.0.0.1"):  # gRPC answers 0 on a wildcard address, raises its own error on one
        with socket.socket() as holder:
            holder.bind((host, 0))
            holder.listen()
            port = holder.getsockname()[1]
            settings = ServerSettings(grpc_host=host, grpc_port=port, http_port=0, grace_seconds=1)
            runtime = ServiceRuntime("test", settings, service_names=[SERVICE])
            with pytest.raises(StartupError, match=f"gRPC port {host}:{port} could not be bound"):
                await asyncio.wait_for(runtime.run(), 10)


async def test_an_http_port_in_use_stops_the_start_naming_it_and_stops_the_grpc_server() -> None:
    """uvicorn exits (SystemExit) when it cannot bind: that reached the process as a bare exit status 3, with
    the started gRPC server never stopped ("coroutine 'AioServer.shutdown' was never awaited"). The start now
    fails naming the port, and the gRPC port is free again for the next start."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = ServerSettings(
            grpc_host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=port, grace_seconds=1
        )
        runtime = ServiceRuntime("test", settings, service_names=[SERVICE])
        with pytest.raises(StartupError, match=f"HTTP port 127.0.0.1:{port} could not be bound"):
            await asyncio.wait_for(runtime.run(), 10)
    assert runtime.grpc_port
    with socket.socket() as again:
        again.bind(("127.0.0.1", runtime.grpc_port))
