"""Inference serving over gRPC: Predict at batch 1, with dynamic batching (concurrent clients), the pre-check.

The server is ``python -m mesh.services.inference`` in a child process (so that the clients do not share its
interpreter), serving the shipped ``models/`` repository. Inputs are generated strip photos resized to 1080p
and sent as raw RGB pixels ("after decoding"). Each result gives client latency percentiles, throughput, and the
server's own queue and compute time per request (from the response), so the transport's share is visible.
GPU figures need CuPy and a CUDA device; without them the GPU entry says ``{"skipped": "no GPU"}``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import cv2
import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.common.v1 import image_pb2
from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.inference.v1 import inference_service_pb2_grpc as pb_grpc
from mesh.kit.devices import gpu_available
from mesh.kit.runtime import message_limit_options
from mesh.services.inference.settings import SERVICE_NAME
from mesh.services.inference.strip.generator import Overrides, generate_with

MODEL = "strip-reader"
SIZE_1080P = (1920, 1080)
BATCH1_REQUESTS = 40
CONCURRENT_CLIENTS = 16
CONCURRENT_REQUESTS = 160
PRECHECK_REQUESTS = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _images(count: int) -> tuple[list[pb.PredictRequest], list[pb.PredictRequest]]:
    """1080p strip photos of every class, as raw-pixel requests and as JPEG (quality 90) requests."""
    requests, jpegs = [], []
    kinds = ("positive", "negative", "invalid", "positive", "negative")
    for i in range(count):
        sample = generate_with(500 + i, Overrides(cls=kinds[i % len(kinds)]))
        image: npt.NDArray[np.uint8] = sample.image
        if image.ndim == 2:
            image = np.dstack([image] * 3)
        rgb = np.ascontiguousarray(cv2.resize(image[:, :, :3], SIZE_1080P, interpolation=cv2.INTER_AREA))
        raw = image_pb2.RawImage(pixels=rgb.tobytes(), width=rgb.shape[1], height=rgb.shape[0], channels=3)
        requests.append(pb.PredictRequest(model_name=MODEL, input=image_pb2.ImageInput(raw=raw)))
        ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        encoded = image_pb2.EncodedImage(data=jpeg.tobytes(), format=image_pb2.IMAGE_FORMAT_JPEG)
        jpegs.append(pb.PredictRequest(model_name=MODEL, input=image_pb2.ImageInput(encoded=encoded)))
    return requests, jpegs


@contextmanager
def _server(device: str) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "MESH_GRPC_HOST": "127.0.0.1",
        "MESH_GRPC_PORT": str(port),
        "MESH_HTTP_HOST": "127.0.0.1",
        "MESH_HTTP_PORT": str(_free_port()),
        "MESH_DEVICE": device,
        "MESH_LOG_LEVEL": "warning",
        # Serving only: no job worker (it would need a database and could take a running mesh's jobs).
        "MESH_JOB_CONCURRENCY": "0",
    }
    process = subprocess.Popen([sys.executable, "-m", "mesh.services.inference"], env=env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _wait_serving(channel: grpc.aio.Channel, timeout: float = 60) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("the inference server did not become SERVING")


def _summary(
    name: str, latencies: list[float], seconds: float, responses: list[pb.PredictResponse]
) -> dict[str, Any]:
    ordered = sorted(latencies)
    compute = [r.compute_seconds for r in responses]
    queue = [r.queue_seconds for r in responses]
    return {
        "benchmark": name,
        "requests": len(latencies),
        "throughput_rps": round(len(latencies) / seconds, 2),
        "latency_ms_p50": round(1000 * statistics.median(ordered), 2),
        "latency_ms_p95": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        "latency_ms_mean": round(1000 * statistics.fmean(ordered), 2),
        "server_compute_ms_mean": round(1000 * statistics.fmean(compute), 2),
        "server_queue_ms_mean": round(1000 * statistics.fmean(queue), 2),
    }


async def _sequential(
    stub: pb_grpc.InferenceServiceAsyncStub, requests: list[pb.PredictRequest], count: int, *, precheck: bool
) -> tuple[list[float], float, list[pb.PredictResponse]]:
    latencies, responses = [], []
    started = time.perf_counter()
    for i in range(count):
        request = pb.PredictRequest()
        request.CopyFrom(requests[i % len(requests)])
        request.precheck_only = precheck
        sent = time.perf_counter()
        responses.append(await stub.Predict(request))
        latencies.append(time.perf_counter() - sent)
    return latencies, time.perf_counter() - started, responses


async def _concurrent(
    stub: pb_grpc.InferenceServiceAsyncStub, requests: list[pb.PredictRequest]
) -> tuple[list[float], float, list[pb.PredictResponse]]:
    latencies: list[float] = []
    responses: list[pb.PredictResponse] = []
    next_index = iter(range(CONCURRENT_REQUESTS))

    async def client() -> None:
        for i in next_index:
            sent = time.perf_counter()
            responses.append(await stub.Predict(requests[i % len(requests)]))
            latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONCURRENT_CLIENTS)))
    return latencies, time.perf_counter() - started, responses


def _batch_sizes(before: pb.ModelStatistics, after: pb.ModelStatistics) -> dict[str, Any]:
    counts = {
        size: after.batch_size_counts[size] - before.batch_size_counts.get(size, 0)
        for size in after.batch_size_counts
    }
    counts = {size: n for size, n in counts.items() if n}
    items = sum(size * n for size, n in counts.items())
    batches = sum(counts.values())
    return {
        "mean_batch_size": round(items / batches, 2) if batches else 0.0,
        "batch_size_counts": dict(sorted(counts.items())),
    }


async def _statistics(stub: pb_grpc.InferenceServiceAsyncStub) -> pb.ModelStatistics:
    response = await stub.GetModelStatistics(pb.GetModelStatisticsRequest(name=MODEL))
    return response.statistics[0]


async def _measure(
    device: str, requests: list[pb.PredictRequest], jpegs: list[pb.PredictRequest]
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with _server(device) as address:
        async with grpc.aio.insecure_channel(
            address, options=message_limit_options(96 * 1024 * 1024)
        ) as channel:
            await _wait_serving(channel)
            stub: pb_grpc.InferenceServiceAsyncStub = pb_grpc.InferenceServiceStub(channel)
            await _sequential(stub, requests, 5, precheck=False)  # warm the connection and caches

            latencies, seconds, responses = await _sequential(stub, requests, BATCH1_REQUESTS, precheck=False)
            batch1 = _summary(f"inference.predict.batch1.{device}", latencies, seconds, responses)
            batch1["image"] = "1920x1080 RGB raw"
            batch1["transport_and_serving_ms_p50"] = round(
                batch1["latency_ms_p50"] - batch1["server_compute_ms_mean"] - batch1["server_queue_ms_mean"],
                2,
            )
            results.append(batch1)

            latencies, seconds, responses = await _sequential(stub, jpegs, BATCH1_REQUESTS, precheck=False)
            jpeg = _summary(f"inference.predict.batch1_jpeg.{device}", latencies, seconds, responses)
            jpeg["image"] = "1920x1080 JPEG q90, decoded by the server"
            results.append(jpeg)

            before = await _statistics(stub)
            latencies, seconds, responses = await _concurrent(stub, requests)
            batched = _summary(f"inference.predict.dynamic_batching.{device}", latencies, seconds, responses)
            batched.update(_batch_sizes(before, await _statistics(stub)))
            batched["concurrent_clients"] = CONCURRENT_CLIENTS
            batched["speedup_vs_batch1"] = round(batched["throughput_rps"] / batch1["throughput_rps"], 2)
            results.append(batched)

            latencies, seconds, responses = await _sequential(
                stub, requests, PRECHECK_REQUESTS, precheck=True
            )
            precheck = _summary(f"inference.precheck.{device}", latencies, seconds, responses)
            precheck["image"] = "1920x1080 RGB raw"
            results.append(precheck)
    return results


def run() -> list[dict[str, Any]]:
    """Every inference benchmark, CPU first; GPU when CuPy sees a device."""
    requests, jpegs = _images(10)
    results = asyncio.run(_measure("cpu", requests, jpegs))
    if gpu_available()[0]:
        results.extend(asyncio.run(_measure("gpu", requests, jpegs)))
    else:
        results.append({"benchmark": "inference.predict.gpu", "skipped": "no GPU"})
    results.append({"benchmark": "inference.environment", "cpu_cores": os.cpu_count()})
    return results
