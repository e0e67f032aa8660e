"""The gateway's cost: REST upload, process and predict against direct gRPC to the same services, and the
cost of tracing (the same REST load with tracing off, on without export, and on with every span exported).

Every process is separate, as in production: the gateway (``python -m mesh.services.gateway``) and the real
file, image processing and inference services as subprocesses on free ports. A service that cannot start
here (no PostgreSQL for the file service, say) is replaced by the test suite's in-process fakes, served from
their own subprocess, and every result names its backend (``real`` or ``fake``). The client is this process:
aiohttp for REST and grpc.aio for direct calls, both doing their per-request work in native code, so that the
difference is the gateway's (httpx, pure Python, adds about 1 ms of its own to every request here). Images
are ~1 MB PNGs sent inline (base64 in JSON for REST, bytes for gRPC); process asks for raw bytes back
(``Accept: image/png``); upload (multipart) and predict are also measured with the raw image as the body
(``Content-Type: image/png``), which skips multipart, base64 and JSON.

A minimal proxy (``PROXY_SERVER``: uvicorn, Starlette, one route, the kit's channel, nothing else) answers the
predict calls beside the gateway: its added latency is the floor of this Python stack on this machine.

Latency (p50, p90) comes from sequential requests, REST and gRPC interleaved so that drift hits both;
throughput from 8 concurrent callers for a fixed time. On a small shared machine the client, the gateway and
the service compete for the same cores, so ratios matter more than absolute numbers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import psycopg
from PIL import Image, ImageDraw
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench import processes
from mesh.common.v1 import image_pb2
from mesh.image.v1 import image_processing_service_pb2 as image_pb
from mesh.image.v1 import image_processing_service_pb2_grpc as image_grpc
from mesh.inference.v1 import inference_service_pb2 as inference_pb
from mesh.inference.v1 import inference_service_pb2_grpc as inference_grpc
from mesh.kit.channels import open_channel
from mesh.kit.memory import tune_allocator
from mesh.kit.settings import FileServiceAddress
from mesh.services.file.client import FileClient

ROOT = Path(__file__).resolve().parent.parent
SEQUENTIAL = int(os.environ.get("MESH_BENCH_GATEWAY_REQUESTS", "100"))
CONCURRENCY = 8
THROUGHPUT_SECONDS = float(os.environ.get("MESH_BENCH_GATEWAY_SECONDS", "4"))
START_TIMEOUT = 60.0
# Services to serve from the fakes without trying the real one (comma-separated keys of REAL_SERVICES): "file"
# on a machine without PostgreSQL, where the real file service would retry its database for a minute first.
FAKED = {key for key in os.environ.get("MESH_BENCH_GATEWAY_FAKES", "").split(",") if key}
OPERATIONS = ("upload", "process", "predict", "process_by_id", "predict_by_id")
# The operations to measure (comma-separated, default all): "predict" alone takes a fifth of the time, for a
# lent machine's short budget.
MEASURED = [
    op for op in os.environ.get("MESH_BENCH_GATEWAY_OPERATIONS", ",".join(OPERATIONS)).split(",") if op
]
DATABASE_URL = os.environ.get("MESH_BENCH_GATEWAY_DATABASE_URL", "postgresql://localhost/mesh_bench_gateway")

Call = Callable[[], Awaitable[None]]


def strip_photo(target_bytes: int = 1024 * 1024) -> bytes:
    """A noisy photo of a lateral-flow strip (T and C lines) encoded as a PNG of about ``target_bytes``."""
    rng = np.random.default_rng(7)
    width, height = 1200, 400
    image = Image.new("RGB", (width, height), (236, 232, 226))
    draw = ImageDraw.Draw(image)
    for x, strength in ((int(width * 0.42), 90), (int(width * 0.68), 150)):
        draw.rectangle(
            (x - 6, 40, x + 6, height - 40), fill=(236 - strength // 2, 232 - strength, 226 - strength // 2)
        )
    pixels = np.asarray(image, dtype=np.int16)
    sigma = 4.0
    while True:
        noisy = np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, "PNG", compress_level=1)
        if buffer.tell() >= target_bytes or sigma > 64:
            return buffer.getvalue()
        sigma *= 1.5


ECHO_SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

async def echo(request):
    await request.body()
    return Response(b"{}", media_type="application/json")

app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Process:
    """A child process of the benchmark."""

    name: str
    popen: subprocess.Popen[bytes]

    def stop(self) -> None:
        processes.stop(self.popen)


def _spawn(
    name: str, args: list[str], env: dict[str, str], stdout: int | None = subprocess.DEVNULL
) -> Process:
    # The caller's own path stays after ours (the device check installs its wheels into a --target folder).
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, "MESH_LOG_LEVEL": "warning", **env}
    popen = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env, stdout=stdout)
    return Process(name, popen)


# The least a Python REST proxy can do for a predict: uvicorn and Starlette, one route, no middleware, auth,
# tracing, metrics or validation; the kit's channel and allocator tuning, as the gateway has. Its added latency
# is the floor of this stack on this machine, measured beside the gateway's.
PROXY_SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from mesh.inference.v1 import inference_service_pb2 as pb, inference_service_pb2_grpc as pb_grpc
from mesh.kit.channels import open_channel
from mesh.kit.memory import tune_allocator
from mesh.kit.settings import CallerSettings

stubs = []

async def predict(request):
    if not stubs:
        channel = open_channel(sys.argv[2], CallerSettings(), service="mesh.inference.v1.InferenceService")
        stubs.append(pb_grpc.InferenceServiceStub(channel))
    message = pb.PredictRequest(model_name="strip-reader")
    if request.headers.get("content-type") == "application/json":
        message.input.image_id = (await request.json())["image_id"]
    else:
        message.input.encoded.data = await request.body()
    reading = (await stubs[0].Predict(message)).strip_reading
    return JSONResponse({"verdict": reading.verdict, "t_to_c_ratio": reading.t_to_c_ratio})

async def healthz(request):
    return JSONResponse({})

tune_allocator()
app = Starlette(
    routes=[Route("/v1/models/strip-reader:predict", predict, methods=["POST"]), Route("/healthz", healthz)]
)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


@contextlib.contextmanager
def minimal_proxy(backends: Backends) -> Iterator[str]:
    """PROXY_SERVER in front of the inference service."""
    port = _free_port()
    process = _spawn("proxy", ["-c", PROXY_SERVER, str(port), backends.addresses["inference"]], {})
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, process)
        yield url
    finally:
        process.stop()


def _wait_healthy(url: str, process: Process) -> None:
    """Wait until ``url``/healthz answers 200 (RuntimeError when the process dies or time runs out)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        if process.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} did not start")
        time.sleep(0.2)


async def _serving(address: str, service: str, process: Process, timeout: float = START_TIMEOUT) -> bool:
    """Wait until ``service`` at ``address`` answers SERVING (False when the process dies or time runs out)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and process.popen.poll() is None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            await asyncio.sleep(0.3)
    return False


@dataclass
class Backends:
    """Where each service runs, and whether it is the real one."""

    addresses: dict[str, str]
    kinds: dict[str, str]
    processes: list[Process]

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


REAL_SERVICES = {
    "file": ("mesh.services.file", "mesh.file.v1.FileService"),
    "image": ("mesh.services.image_processing", "mesh.image.v1.ImageProcessingService"),
    "inference": ("mesh.services.inference", "mesh.inference.v1.InferenceService"),
}


async def start_backends(blob_dir: Path) -> Backends:
    """The real services where they start, the fakes for the rest (and for those in ``FAKED`` from the start,
    in which case the fakes' file service is the one the real services fetch stored images from)."""
    addresses: dict[str, str] = {}
    kinds: dict[str, str] = {}
    processes: list[Process] = []
    fakes_address: str | None = None

    async def start_fakes() -> str:
        fakes = _spawn(
            "fakes",
            [
                "-c",
                "import asyncio; from tests.gateway.harness import serve_fakes_forever as s; asyncio.run(s())",
            ],
            {"OTEL_SDK_DISABLED": "true"},
            stdout=subprocess.PIPE,
        )
        port = await asyncio.to_thread(_fakes_port, fakes)
        processes.append(fakes)
        return f"127.0.0.1:{port}"

    missing = sorted(FAKED & REAL_SERVICES.keys())
    if missing:
        fakes_address = await start_fakes()
    grpc_ports = {key: _free_port() for key in REAL_SERVICES}
    file_address = fakes_address if "file" in missing else f"127.0.0.1:{grpc_ports['file']}"
    starting = {}
    for key, (module, service) in REAL_SERVICES.items():
        if key in missing:
            continue
        grpc_port = grpc_ports[key]
        env = {
            "MESH_GRPC_PORT": str(grpc_port),
            # Image processing and inference fetch stored images (``image_id``) from the file service.
            "MESH_FILE_SERVICE_ADDRESS": str(file_address),
            "MESH_HTTP_PORT": str(_free_port()),
            "MESH_DATABASE_URL": DATABASE_URL,
            "MESH_BLOB_DIR": str(blob_dir),
            # Serving only: a job worker here could take the jobs of a mesh running beside the benchmark.
            "MESH_JOB_CONCURRENCY": "0",
            "OTEL_SDK_DISABLED": "true",
        }
        process = _spawn(key, ["-m", module], env)
        starting[key] = (f"127.0.0.1:{grpc_port}", service, process)
    results = await asyncio.gather(*(_serving(a, s, p) for a, s, p in starting.values()))
    failed = []
    for (key, (address, _, process)), ok in zip(starting.items(), results, strict=True):
        if ok:
            addresses[key], kinds[key] = address, "real"
            processes.append(process)
        else:
            process.stop()
            failed.append(key)
    if failed and fakes_address is None:
        fakes_address = await start_fakes()
    for key in (*missing, *failed):
        addresses[key], kinds[key] = str(fakes_address), "fake"
    return Backends(addresses, kinds, processes)


def _fakes_port(fakes: Process) -> int:
    """The gRPC port the fakes print (``PORTS <grpc> <http>``); their later output is drained in the background,
    since a full pipe would block them mid-request."""
    stdout = fakes.popen.stdout
    assert stdout is not None
    for line in stdout:
        if line.startswith(b"PORTS "):
            threading.Thread(target=stdout.read, daemon=True).start()
            return int(line.split()[1])
    raise RuntimeError("the fakes exited before printing their ports")


@contextlib.contextmanager
def gateway(backends: Backends, tracing: str) -> Iterator[str]:
    """A gateway process in front of ``backends``; ``tracing`` is off, on (no export) or exported."""
    port = _free_port()
    env = {
        "MESH_HTTP_PORT": str(port),
        "MESH_HTTP_HOST": "127.0.0.1",
        "MESH_FILE_SERVICE_ADDRESS": backends.addresses["file"],
        "MESH_IMAGE_SERVICE_ADDRESS": backends.addresses["image"],
        "MESH_INFERENCE_SERVICE_ADDRESS": backends.addresses["inference"],
        "MESH_QUEUE_SERVICE_ADDRESS": backends.addresses["file"],
        "MESH_RATE_LIMIT_ENABLED": "false",
        "MESH_AUTH_MODE": "off",
    }
    if tracing == "off":
        env["OTEL_SDK_DISABLED"] = "true"
    elif tracing == "exported":
        # Every span serialised and written out (to /dev/null): the full cost short of a network hop.
        env["OTEL_TRACES_EXPORTER"] = "console"
        env["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    process = _spawn("gateway", ["-m", "mesh.services.gateway"], env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        yield url
    finally:
        process.stop()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latencies(calls: dict[str, Call], count: int) -> dict[str, list[float]]:
    """Sequential timings of each call, interleaved round-robin (after a warm-up of each)."""
    for call in calls.values():
        for _ in range(3):
            await call()
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(count):
        for name, call in calls.items():
            started = time.perf_counter()
            await call()
            timings[name].append(time.perf_counter() - started)
    return timings


async def throughputs(calls: dict[str, Call], seconds: float, rounds: int = 8) -> dict[str, float]:
    """Completed calls per second of each call with CONCURRENCY callers, in alternating short windows
    (``rounds`` windows each) so that load from elsewhere on the machine hits every call alike."""
    done = dict.fromkeys(calls, 0)
    spent = dict.fromkeys(calls, 0.0)
    window = seconds / rounds
    for _ in range(rounds):
        for name, call in calls.items():
            deadline = time.perf_counter() + window

            async def worker(name: str = name, call: Call = call, deadline: float = deadline) -> None:
                while time.perf_counter() < deadline:
                    await call()
                    done[name] += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            spent[name] += time.perf_counter() - started
    return {name: done[name] / spent[name] for name in calls}


async def _post(
    http: aiohttp.ClientSession,
    path: str,
    data: bytes | aiohttp.FormData,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    status: int = 200,
) -> None:
    """POST and read the whole response; a status other than ``status`` fails the benchmark."""
    async with http.post(path, data=data, headers=headers, params=params) as response:
        body = await response.read()
        if response.status != status:
            raise RuntimeError(f"POST {path}: {response.status} {body[:300]!r}")


@dataclass
class Clients:
    """The REST and direct gRPC callables of every operation."""

    rest: dict[str, Call]
    grpc: dict[str, Call]


def make_calls(
    http: aiohttp.ClientSession, backends: Backends, settings: FileServiceAddress, photo: bytes, image_id: str
) -> tuple[Clients, list[Any]]:
    """Upload, process and predict by REST and by direct gRPC, with the same image: inline, and stored
    (``image_id``: the service fetches the bytes from the file service, so no image crosses the gateway)."""
    inline = base64.b64encode(photo).decode()
    # Bodies encoded once: the client's JSON encoding is not the gateway's cost.
    process_body = json.dumps({"image": inline, "output_format": "png"}).encode()
    predict_body = json.dumps({"image": inline}).encode()
    json_headers = {"content-type": "application/json"}
    png_headers = {"content-type": "image/png"}
    files = FileClient.connect(settings)
    image_channel = open_channel(
        backends.addresses["image"], settings, service="mesh.image.v1.ImageProcessingService"
    )
    inference_channel = open_channel(
        backends.addresses["inference"], settings, service="mesh.inference.v1.InferenceService"
    )
    image_stub = image_grpc.ImageProcessingServiceStub(image_channel)
    inference_stub = inference_grpc.InferenceServiceStub(inference_channel)
    encoded = image_pb2.ImageInput(encoded=image_pb2.EncodedImage(data=photo))
    stored = image_pb2.ImageInput(image_id=image_id)
    process_ref_body = json.dumps({"image_id": image_id, "output_format": "png"}).encode()
    predict_ref_body = json.dumps({"image_id": image_id}).encode()

    async def rest_upload() -> None:
        form = aiohttp.FormData()
        form.add_field("file", photo, filename="strip.png", content_type="image/png")
        await _post(http, "/v1/images", form, status=201)

    async def rest_upload_raw() -> None:
        await _post(
            http, "/v1/images", photo, params={"filename": "strip.png"}, headers=png_headers, status=201
        )

    async def rest_process() -> None:
        await _post(http, "/v1/process", process_body, headers={**json_headers, "accept": "image/png"})

    async def rest_predict() -> None:
        await _post(http, "/v1/models/strip-reader:predict", predict_body, headers=json_headers)

    async def rest_predict_raw() -> None:
        await _post(http, "/v1/models/strip-reader:predict", photo, headers=png_headers)

    async def rest_process_ref() -> None:
        await _post(http, "/v1/process", process_ref_body, headers={**json_headers, "accept": "image/png"})

    async def rest_predict_ref() -> None:
        await _post(http, "/v1/models/strip-reader:predict", predict_ref_body, headers=json_headers)

    async def grpc_process_ref() -> None:
        await image_stub.ProcessImage(
            image_pb.ProcessImageRequest(
                input=stored, output=image_pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_PNG)
            )
        )

    async def grpc_predict_ref() -> None:
        await inference_stub.Predict(inference_pb.PredictRequest(model_name="strip-reader", input=stored))

    async def grpc_upload() -> None:
        await files.upload(photo, filename="strip.png", content_type="image/png")

    async def grpc_process() -> None:
        await image_stub.ProcessImage(
            image_pb.ProcessImageRequest(
                input=encoded, output=image_pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_PNG)
            )
        )

    async def grpc_predict() -> None:
        await inference_stub.Predict(inference_pb.PredictRequest(model_name="strip-reader", input=encoded))

    clients = Clients(
        rest={
            "upload": rest_upload,
            "upload_raw": rest_upload_raw,
            "process": rest_process,
            "predict": rest_predict,
            "predict_raw": rest_predict_raw,
            "process_by_id": rest_process_ref,
            "predict_by_id": rest_predict_ref,
        },
        grpc={
            "upload": grpc_upload,
            "process": grpc_process,
            "predict": grpc_predict,
            "process_by_id": grpc_process_ref,
            "predict_by_id": grpc_predict_ref,
        },
    )
    return clients, [files, image_channel, inference_channel]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def _run(backends: Backends, photo: bytes) -> list[dict[str, Any]]:
    settings = FileServiceAddress(file_service_address=backends.addresses["file"], rpc_timeout_seconds=60.0)
    common = {"image_bytes": len(photo), "concurrency": CONCURRENCY}
    files = FileClient.connect(settings)
    try:
        image_id = (await files.upload(photo, filename="strip.png", content_type="image/png")).image.id
    finally:
        await files.close()
    with contextlib.ExitStack() as stack:
        # Three gateways at once (tracing on, off, exported), so their requests can be interleaved.
        urls = {
            tracing: stack.enter_context(gateway(backends, tracing)) for tracing in ("on", "off", "exported")
        }
        # Only its predict routes are called.
        urls["minimal_proxy"] = stack.enter_context(minimal_proxy(backends))
        async with contextlib.AsyncExitStack() as closing:
            clients: dict[str, Clients] = {}
            for tracing, url in urls.items():
                http = await closing.enter_async_context(
                    aiohttp.ClientSession(
                        url,
                        timeout=aiohttp.ClientTimeout(total=60),
                        connector=aiohttp.TCPConnector(limit=CONCURRENCY * 2),
                    )
                )
                clients[tracing], closables = make_calls(http, backends, settings, photo, image_id)
                for closable in closables:
                    closing.push_async_callback(closable.close)
            return await _measure(clients, backends, common)
    raise AssertionError("unreachable")


async def _transport_floor(common: dict[str, Any]) -> dict[str, Any]:
    """The bare HTTP hop the gateway adds: the same client posting a predict-sized JSON body to a Starlette
    app on uvicorn that only reads it. Part of every REST call's added latency that no gateway code causes."""
    port = _free_port()
    process = _spawn("echo", ["-c", ECHO_SERVER, str(port)], {})
    body = json.dumps({"image": base64.b64encode(bytes(common["image_bytes"])).decode()}).encode()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            for _ in range(100):
                with contextlib.suppress(aiohttp.ClientError):
                    await _post(http, "/echo", b"{}")
                    break
                await asyncio.sleep(0.1)
            json_headers = {"content-type": "application/json"}

            async def post() -> None:
                await _post(http, "/echo", body, headers=json_headers)

            async def post_empty() -> None:
                await _post(http, "/echo", b"{}", headers=json_headers)

            timings = await latencies({"echo": post, "empty": post_empty}, SEQUENTIAL)
    finally:
        process.stop()
    return {
        "benchmark": "gateway_http_transport_floor",
        "backend": "none",
        **common,
        "body_bytes": len(body),
        "p50_ms": _ms(statistics.median(timings["echo"])),
        "p90_ms": _ms(_percentile(timings["echo"], 0.9)),
        "empty_body_p50_ms": _ms(statistics.median(timings["empty"])),
        "note": "aiohttp -> uvicorn (httptools) on loopback, a body read and dropped: the HTTP hop alone;"
        " empty_body: the same hop with a 2-byte body (the floor under requests by image_id)",
    }


MINIMAL_PROXY_CALLS = {"predict": "predict_raw", "predict_by_id": "predict_by_id"}
"""The REST call the minimal proxy answers for an operation (the gateway's own is ``rest`` or ``rest_raw``)."""


def _backend_of(operation: str) -> str:
    return {"upload": "file", "process": "image", "predict": "inference"}[operation.removesuffix("_by_id")]


async def _measure(
    clients: dict[str, Clients], backends: Backends, common: dict[str, Any]
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    results.append(await _transport_floor(common))
    for operation in MEASURED:
        calls = {"grpc": clients["on"].grpc[operation], "rest": clients["on"].rest[operation]}
        if operation in ("upload", "predict"):
            calls["rest_raw"] = clients["on"].rest[f"{operation}_raw"]
        if operation in MINIMAL_PROXY_CALLS:
            calls["minimal_proxy"] = clients["minimal_proxy"].rest[MINIMAL_PROXY_CALLS[operation]]
        with_tracing_cost = operation in ("process", "predict")
        if with_tracing_cost:
            calls["rest_tracing_off"] = clients["off"].rest[operation]
            calls["rest_tracing_exported"] = clients["exported"].rest[operation]
        timings = await latencies(calls, SEQUENTIAL)
        rates = await throughputs(calls, THROUGHPUT_SECONDS)
        p50 = {name: statistics.median(values) for name, values in timings.items()}
        results.append(
            {
                "benchmark": f"gateway_{operation}_rest_vs_grpc",
                "backend": backends.kinds[_backend_of(operation)],
                **common,
                "rest_rps": round(rates["rest"], 2),
                "grpc_rps": round(rates["grpc"], 2),
                "rest_fraction_of_grpc_throughput": round(rates["rest"] / rates["grpc"], 3),
                "rest_p50_ms": _ms(p50["rest"]),
                "grpc_p50_ms": _ms(p50["grpc"]),
                "added_p50_ms": _ms(p50["rest"] - p50["grpc"]),
                "rest_p90_ms": _ms(_percentile(timings["rest"], 0.9)),
                "grpc_p90_ms": _ms(_percentile(timings["grpc"], 0.9)),
                "target": ">= 0.6 of gRPC throughput, <= 2 ms added p50",
                **(
                    {
                        "rest_raw_body_rps": round(rates["rest_raw"], 2),
                        "rest_raw_body_fraction_of_grpc_throughput": round(
                            rates["rest_raw"] / rates["grpc"], 3
                        ),
                        "rest_raw_body_added_p50_ms": _ms(p50["rest_raw"] - p50["grpc"]),
                    }
                    if "rest_raw" in rates
                    else {}
                ),
                **(
                    {
                        "minimal_proxy_call": MINIMAL_PROXY_CALLS[operation],
                        "minimal_proxy_fraction_of_grpc_throughput": round(
                            rates["minimal_proxy"] / rates["grpc"], 3
                        ),
                        "minimal_proxy_added_p50_ms": _ms(p50["minimal_proxy"] - p50["grpc"]),
                    }
                    if "minimal_proxy" in rates
                    else {}
                ),
            }
        )
        if not with_tracing_cost:
            continue
        off, on, exported = rates["rest_tracing_off"], rates["rest"], rates["rest_tracing_exported"]
        results.append(
            {
                "benchmark": f"gateway_{operation}_tracing_cost",
                "backend": backends.kinds[_backend_of(operation)],
                **common,
                "tracing_off_rps": round(off, 2),
                "tracing_on_rps": round(on, 2),
                "tracing_exported_rps": round(exported, 2),
                "throughput_cost_on": round(1 - on / off, 3),
                "throughput_cost_exported": round(1 - exported / off, 3),
                "tracing_off_p50_ms": _ms(p50["rest_tracing_off"]),
                "tracing_on_p50_ms": _ms(p50["rest"]),
                "tracing_exported_p50_ms": _ms(p50["rest_tracing_exported"]),
                "note": "the gateway's tracing only; on = spans made and sampled, not exported;"
                " exported = every span through the batch processor to a console exporter on /dev/null",
                "target": "<= 5 % of throughput",
            }
        )
    return results


def run() -> list[dict[str, Any]]:
    """Start the services and the gateway, measure, stop everything."""
    unknown = sorted(set(MEASURED) - set(OPERATIONS))
    if unknown:  # before any process starts
        raise ValueError(f"MESH_BENCH_GATEWAY_OPERATIONS: unknown {unknown}; the operations are {OPERATIONS}")
    # The client gets the allocator tuning that the services and the gateway have: serialising a 1 MB gRPC
    # request would otherwise pay page faults that the REST client, which sends the bytes as they are, does
    # not, and the direct path would look slower than it is.
    tune_allocator()
    photo = strip_photo()
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as blob_dir:

        async def main() -> list[dict[str, Any]]:
            backends = await start_backends(Path(blob_dir))
            try:
                return await _run(backends, photo)
            finally:
                backends.stop()
                _drop_scratch_database()

        return asyncio.run(main())


def _drop_scratch_database() -> None:
    """Drop the file service's scratch database (when it was created)."""
    params = conninfo_to_dict(DATABASE_URL)
    admin = make_conninfo(DATABASE_URL, dbname="postgres")
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn,
    ):
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(str(params["dbname"])))
        )
