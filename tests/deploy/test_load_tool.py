"""The load tool's pieces: payloads, statistics, the bounded runner, the CLI's pre-checks, the ghz configs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, json_format
from PIL import Image

import mesh.tools.load as load_tool
from mesh.file.v1 import file_service_pb2
from mesh.kit.settings import MeshSettings
from mesh.services.inference.strip import StripReader
from mesh.services.inference.strip.types import Verdict
from mesh.tools.load import main, payloads
from mesh.tools.load.mesh import Mesh, is_loopback
from mesh.tools.load.runner import run_scenario
from mesh.tools.load.scenarios import SCENARIOS, Scenario
from mesh.tools.load.stats import Recorder, percentile

from .conftest import REPO

LOAD_DIR = REPO / "deploy" / "load"
# The runner only hands the mesh to the scenario; these scenarios do not touch it.
NO_MESH = cast("Mesh", object())


def test_photo_is_a_1080p_jpeg_and_strip_photo_is_deterministic() -> None:
    """The payloads are a 1920x1080 JPEG and a JPEG strip photo, byte-identical from run to run."""
    photo = Image.open(io.BytesIO(payloads.photo_1080p()))
    assert (photo.format, photo.size) == ("JPEG", (1920, 1080))
    assert payloads.strip_photo() == payloads.strip_photo()
    assert Image.open(io.BytesIO(payloads.strip_photo())).format == "JPEG"


def test_the_strip_photo_reads_positive() -> None:
    """The load test's strip photo is read POSITIVE with its drawn T/C (0.15 / 0.6), so inference scenarios
    time a whole reading. Without a frame around its window the reader took it for a bare strip and read
    INVALID (no control line), which times a shortcut."""
    photo = np.asarray(Image.open(io.BytesIO(payloads.strip_photo())).convert("RGB"))
    reading = StripReader().read(photo)
    assert reading.verdict == Verdict.POSITIVE
    assert reading.t_to_c_ratio == pytest.approx(0.25, abs=0.05)


def test_comment_changes_the_hash_but_not_the_pixels() -> None:
    """A unique upload differs in SHA-256 from the original and decodes to the same pixels."""
    original = payloads.strip_photo()
    unique = payloads.with_comment(original, "load 1")
    assert hashlib.sha256(unique).digest() != hashlib.sha256(original).digest()
    assert Image.open(io.BytesIO(unique)).tobytes() == Image.open(io.BytesIO(original)).tobytes()


def test_ghz_upload_stream_reassembles_the_photo() -> None:
    """The ghz client stream is metadata first, then chunks that add up to the photo, then `end`."""
    photo, strip = payloads.photo_1080p(), payloads.strip_photo()
    stream = payloads.ghz_requests(photo, strip, {"photo_image_id": "p"})["upload-image.json"]
    assert "metadata" in stream[0]
    assert b"".join(base64.b64decode(part["chunk"]) for part in stream[1:-1]) == photo
    messages = [json_format.ParseDict(part, file_service_pb2.UploadImageRequest()) for part in stream]
    assert messages[-1].WhichOneof("part") == "end"


def test_percentiles_and_report_shape() -> None:
    """Nearest-rank percentiles, and a ghz-shaped report with errors grouped by status code."""
    assert percentile([10, 20, 30, 40], 50) == 20
    assert percentile([10, 20, 30, 40], 99) == 40
    assert percentile([], 50) == 0
    recorder = Recorder("x", "pkg.Service.Method")
    for latency in (1_000_000, 2_000_000, 3_000_000):
        recorder.add(latency)
    recorder.add(4_000_000, "UNAVAILABLE", "down")
    report = recorder.report(2_000_000_000, {"concurrency": 1})
    assert report["count"] == 4
    assert report["rps"] == 2.0
    assert report["average"] == 2_500_000
    assert report["statusCodeDistribution"] == {"OK": 3, "UNAVAILABLE": 1}
    assert report["errors"] == 1
    assert report["latency_ms"]["p50"] == 2.0
    assert {"percentage": 90, "latency": 4_000_000} in report["latencyDistribution"]


def _scenario(run: Callable[[Mesh], Awaitable[None]]) -> Scenario:
    return Scenario("test", "pkg.Service.Method", frozenset(), run)


async def test_runner_stops_at_count_and_records_status_codes() -> None:
    """The runner starts at most --count calls and records a failed call under its gRPC code."""
    calls = 0

    async def flaky(_: Mesh) -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "busy", None
            )

    recorder, _ = await run_scenario(_scenario(flaky), NO_MESH, concurrency=3, duration=30, count=10)
    assert calls == 10
    assert recorder.statuses == {"OK": 5, "RESOURCE_EXHAUSTED": 5}


async def test_runner_stops_at_duration() -> None:
    """With a large count, the run ends when its duration is over."""

    async def slow(_: Mesh) -> None:
        await asyncio.sleep(0.05)

    recorder, total_ns = await run_scenario(
        _scenario(slow), NO_MESH, concurrency=2, duration=0.3, count=10**6
    )
    assert 4 <= recorder.count <= 20
    assert total_ns < 1_000_000_000


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("localhost:50051", True),
        ("127.0.0.1:1", True),
        ("[::1]:5", True),
        ("10.0.0.1:50051", False),
        ("db:1", False),
    ],
)
def test_loopback_detection(address: str, loopback: bool) -> None:
    """Only this machine's addresses count as loopback."""
    assert is_loopback(address) is loopback


def test_cli_says_clearly_when_the_mesh_is_down(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Against a port where nothing listens, the tool exits 2 and names the service that is down."""
    monkeypatch.setenv("MESH_INFERENCE_SERVICE_ADDRESS", "127.0.0.1:9")
    assert main(["--scenario", "inference.model_ready", "--payload-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the mesh is not up" in err
    assert "inference service at 127.0.0.1:9: UNAVAILABLE" in err
    assert "make up" in err


def test_cli_refuses_remote_targets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The load tool only loads a mesh on loopback."""
    monkeypatch.setenv("MESH_QUEUE_SERVICE_ADDRESS", "queue.example.com:50054")
    assert main(["--scenario", "queue.list"]) == 2
    assert "refusing non-loopback targets (queue=queue.example.com:50054)" in capsys.readouterr().err


def test_mesh_settings_default_to_loopback() -> None:
    """With no environment, every service address is on loopback."""
    mesh_settings = MeshSettings()
    for address in (
        mesh_settings.file_service_address,
        mesh_settings.image_service_address,
        mesh_settings.inference_service_address,
        mesh_settings.queue_service_address,
    ):
        assert is_loopback(address)


def test_ghz_configs_cover_every_scenario_and_name_real_methods() -> None:
    """Each gRPC scenario has a ghz config with the same call; the method exists with the streaming shape the data
    has; protos and data files resolve inside the repository."""
    import mesh.file.v1.file_service_pb2
    import mesh.image.v1.image_processing_service_pb2
    import mesh.inference.v1.inference_service_pb2
    import mesh.queue.v1.queue_service_pb2  # noqa: F401  (registers the descriptors)

    pool = descriptor_pool.Default()
    written = payloads.ghz_requests(b"photo", b"strip", {})
    configs = {p.stem: json.loads(p.read_text()) for p in LOAD_DIR.glob("*.json")}
    assert set(configs) == {name for name in SCENARIOS if not name.startswith("gateway.")}
    for name, config in configs.items():
        assert config["call"] == SCENARIOS[name].call, name
        assert (REPO / config["proto"]).is_file(), name
        assert config["insecure"] is True, name
        assert config["host"].startswith("localhost:"), name
        assert "duration" not in config, "ghz ignores total when duration is set; use max-duration"
        service_name, method_name = config["call"].rsplit(".", 1)
        method = pool.FindServiceByName(service_name).methods_by_name[method_name]
        if "data-file" in config:
            relative = Path(config["data-file"]).relative_to("deploy/load/payloads")
            body = written[str(relative)]
        else:
            body = config["data"]
        assert isinstance(body, list) == method.client_streaming, name


async def test_calls_in_flight_at_the_end_are_cut_off_after_the_grace() -> None:
    """A call that outlives the run's end by more than the grace is cancelled and recorded as CLIENT_TIMEOUT."""

    async def hangs(_: Mesh) -> None:
        await asyncio.sleep(60)

    recorder, total_ns = await run_scenario(
        _scenario(hangs), NO_MESH, concurrency=2, duration=0.1, count=10, grace=0.2
    )
    assert recorder.statuses == {"CLIENT_TIMEOUT": 2}
    assert total_ns < 2_000_000_000


class _SeededMesh:
    """A mesh that is up and seeds two images, for the tool's own flow (no services)."""

    def __init__(self, settings: MeshSettings, gateway_url: str) -> None:
        self.ids: dict[str, str] = {}
        self.warnings: list[str] = []
        self.uploaded = ["image-1", "image-2"]
        self.deleted: list[str] = []
        self.closed = False

    async def check_up(self, services: set[str]) -> None:
        pass

    async def seed(self, services: set[str]) -> None:
        pass

    async def delete_uploaded(self) -> int:
        self.deleted, self.uploaded = self.uploaded, []
        return len(self.deleted)

    async def close(self) -> None:
        self.closed = True


async def test_an_interrupted_run_says_so_and_deletes_the_images_it_uploaded(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Ctrl-C in the middle of a scenario (asyncio.run cancels the tool's task): one line says it was
    interrupted, and the seeded images are deleted as after a normal run (they stayed behind before)."""
    meshes: list[_SeededMesh] = []

    def make_mesh(settings: MeshSettings, gateway_url: str) -> _SeededMesh:
        meshes.append(_SeededMesh(settings, gateway_url))
        return meshes[-1]

    async def endless(*args: object, **kwargs: object) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(load_tool, "Mesh", make_mesh)
    monkeypatch.setattr(load_tool, "run_scenario", endless)
    args = load_tool.parse_args(["--scenario", "queue.list", "--payload-dir", str(tmp_path)])
    task = asyncio.ensure_future(load_tool.run(args, MeshSettings()))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert meshes[0].deleted == ["image-1", "image-2"]
    assert meshes[0].closed
    err = capsys.readouterr().err
    assert "load: interrupted" in err
    assert "load: deleted 2 uploaded image(s)" in err


def test_ctrl_c_ends_the_tool_with_status_130_and_no_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio.run raises KeyboardInterrupt after the run has cleaned up: the tool exits 130, as a shell
    reports an interrupted command, instead of printing a traceback."""

    def interrupted(coroutine: Awaitable[int]) -> int:
        cast(Any, coroutine).close()
        raise KeyboardInterrupt

    monkeypatch.setattr("mesh.tools.load.asyncio.run", interrupted)
    assert main(["--scenario", "queue.list"]) == 130
