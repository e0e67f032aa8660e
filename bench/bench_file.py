"""File service throughput over gRPC: streamed upload (validation, thumbnail, blob write, row insert)
and streamed download, against a server in this process on the local PostgreSQL.

Also reports validation alone and a small-image upload latency, so a regression can be placed, and the memory a
burst of large uploads takes (more at once than the service receives and lets wait).
Needs PostgreSQL at ``MESH_BENCH_ADMIN_DATABASE_URL`` (default ``postgresql://localhost/postgres``);
a scratch database is created and dropped.
"""

from __future__ import annotations

import asyncio
import io
import os
import statistics
import struct
import tempfile
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import psycopg
from PIL import Image
from psycopg import sql
from psycopg.conninfo import make_conninfo

from mesh.kit import errors
from mesh.kit.logging import configure_logging
from mesh.kit.settings import FileServiceAddress
from mesh.services.file.client import FileClient
from mesh.services.file.server import file_service
from mesh.services.file.settings import FileSettings
from mesh.services.file.validation import validate_image

ADMIN_URL = os.environ.get("MESH_BENCH_ADMIN_DATABASE_URL", "postgresql://localhost/postgres")
MIB = 1024 * 1024


def _noise_png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
        buffer, "PNG", compress_level=1
    )
    return buffer.getvalue()


def _tagged(png: bytes, tag: str) -> AsyncIterator[bytes]:
    """``png`` made distinct by a tEXt chunk after its header (so dedup does not store it once), in 1 MiB
    pieces as they are sent: the client holds one file, not one per upload."""

    async def pieces() -> AsyncIterator[bytes]:
        text = b"bench\0" + tag.encode()
        chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
        yield png[:33] + chunk  # the signature and IHDR take 33 bytes
        for start in range(33, len(png), MIB):
            yield png[start : start + MIB]

    return pieces()


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _burst(client: FileClient, settings: FileSettings, count: int) -> dict[str, object]:
    """``count`` distinct ~22 MiB PNGs uploaded at once on one channel: how many were stored or refused as busy
    (RESOURCE_EXHAUSTED, or UNAVAILABLE where gRPC lost that answer: see FileClient.upload), and how far the
    process's peak RSS rose (service and client share it)."""
    png = _noise_png(3200, 2446, 7)
    _reset_peak_rss()  # so the peak is this burst's
    before = _peak_rss_mib()
    outcomes: list[str] = []

    async def one(index: int) -> None:
        try:
            await client.upload(
                _tagged(png, f"{index}-{uuid.uuid4().hex}"), filename="burst.png", timeout=300
            )
            outcomes.append("stored")
        except errors.MeshError as error:
            outcomes.append(error.code.name)

    started = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(count)))
    return {
        "benchmark": "file_upload_burst_memory",
        "uploads": count,
        "bytes_each": len(png),
        "received_at_once": settings.max_concurrent_uploads,
        "may_wait": settings.max_waiting_uploads,
        "stored": outcomes.count("stored"),
        "refused_to_retry": outcomes.count("RESOURCE_EXHAUSTED") + outcomes.count("UNAVAILABLE"),
        "other_errors": len(
            [o for o in outcomes if o not in ("stored", "RESOURCE_EXHAUSTED", "UNAVAILABLE")]
        ),
        "peak_rss_rise_mib": round(_peak_rss_mib() - before),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = ((x + y + rng.integers(0, 8, (height, width))) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([base, base[::-1], base[:, ::-1]])).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


async def _measure(blob_dir: Path, database_url: str) -> list[dict[str, object]]:
    settings = FileSettings(
        database_url=database_url,
        blob_dir=blob_dir,
        grpc_host="127.0.0.1",
        grpc_port=0,
        http_host="127.0.0.1",
        http_port=0,
        grace_seconds=1,
        # Fewer than the default may wait, so that the burst of 48 has some refused as well as stored.
        max_waiting_uploads=32,
    )
    results: list[dict[str, object]] = []
    async with file_service(settings) as runtime:
        task = asyncio.create_task(runtime.run())
        await asyncio.wait_for(runtime.started.wait(), 30)
        client = FileClient.connect(FileServiceAddress(file_service_address=f"127.0.0.1:{runtime.grpc_port}"))
        try:
            large = [_noise_png(1600, 1200, seed) for seed in range(4)]  # ~5.5 MiB each
            total = sum(len(d) for d in large)
            started = time.perf_counter()
            ids = [(await client.upload(d, filename="bench.png")).image.id for d in large]
            upload_s = time.perf_counter() - started
            results.append(
                {
                    "benchmark": "file_upload_large_png",
                    "images": len(large),
                    "bytes_each": total // len(large),
                    "mib_per_s": round(total / MIB / upload_s, 1),
                    "seconds_per_image": round(upload_s / len(large), 3),
                }
            )
            started = time.perf_counter()
            for _ in range(3):
                for image_id in ids:
                    await client.download(image_id)
            download_s = time.perf_counter() - started
            results.append(
                {
                    "benchmark": "file_download_large_png",
                    "bytes": 3 * total,
                    "mib_per_s": round(3 * total / MIB / download_s, 1),
                }
            )
            started = time.perf_counter()
            for data in large:
                validate_image(data)
            validate_s = time.perf_counter() - started
            results.append(
                {
                    "benchmark": "file_validate_large_png",
                    "mib_per_s": round(total / MIB / validate_s, 1),
                    "note": "validation alone (container walk, SHA-256, full decode), no gRPC",
                }
            )
            small = [_jpeg(640, 480, seed) for seed in range(40)]
            latencies = []
            for data in small:
                began = time.perf_counter()
                await client.upload(data, filename="small.jpg")
                latencies.append(time.perf_counter() - began)
            latencies.sort()
            results.append(
                {
                    "benchmark": "file_upload_small_jpeg_latency",
                    "images": len(small),
                    "bytes_each": sum(len(d) for d in small) // len(small),
                    "p50_ms": round(statistics.median(latencies) * 1000, 2),
                    "p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))] * 1000, 2),
                }
            )
            if os.access("/proc/self/clear_refs", os.W_OK):  # Linux's resettable peak RSS
                results.append(await _burst(client, settings, 48))
        finally:
            await client.close()
            runtime.stopping.set()
            await asyncio.wait_for(task, 15)
    return results


def run() -> list[dict[str, object]]:
    """Run the file service benchmarks on a scratch database and blob directory."""
    configure_logging("bench", level="warning", fmt="console")
    name = f"mesh_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with tempfile.TemporaryDirectory(prefix="mesh-bench-blobs-") as blob_dir:
            return asyncio.run(_measure(Path(blob_dir), make_conninfo(ADMIN_URL, dbname=name)))
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
