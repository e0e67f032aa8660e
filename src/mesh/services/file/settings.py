"""The file service's settings (``MESH_*`` environment variables)."""

from __future__ import annotations

from pydantic import Field

from mesh.file.v1 import file_service_pb2
from mesh.kit.settings import BlobSettings, ServerSettings

SERVICE_NAME = file_service_pb2.DESCRIPTOR.services_by_name["FileService"].full_name
"""The file service's gRPC (and health) name, from the .proto so that it cannot drift."""


class FileSettings(BlobSettings, ServerSettings):
    """Settings of the file service process."""

    grpc_port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port of the file service."""

    http_port: int = Field(default=9101, ge=0, le=65535)
    """HTTP port for /metrics and /healthz."""

    max_upload_bytes: int = Field(default=25 * 1024 * 1024, gt=0)
    """Largest accepted upload; a stream is cut off as soon as it passes this."""

    max_image_pixels: int = Field(default=50_000_000, gt=0)
    """Largest accepted width x height; larger images (and decompression bombs) are refused unread."""

    max_aspect_ratio: float = Field(default=100.0, ge=1.0)
    """Largest accepted ratio of the longer side to the shorter one (refuses shapes like 1 x 100000)."""

    thumbnail_size: int = Field(default=256, ge=16, le=4096)
    """Longest side of the thumbnail made at upload, in pixels."""

    download_chunk_bytes: int = Field(default=1024 * 1024, ge=1024, le=4 * 1024 * 1024)
    """Chunk size of a download stream when the request names none."""

    db_pool_max_size: int = Field(default=10, ge=1)
    """Most PostgreSQL connections the service holds."""

    db_reconnect_seconds: float = Field(default=8.0, gt=0)
    """How long one PostgreSQL reconnection attempt backs off before a new one starts afresh."""

    startup_migration_seconds: float = Field(default=10.0, ge=0)
    """How long start-up waits for PostgreSQL to migrate; after that it serves NOT_SERVING and keeps trying."""

    blob_sweep_interval_seconds: float = Field(default=3600.0, ge=0)
    """How often unreferenced blobs (left by crashes) are looked for and removed; 0 turns it off."""

    max_concurrent_uploads: int = Field(default=8, ge=1)
    """How many streamed uploads are received at once, each holding up to ``max_upload_bytes`` until it is
    stored (twice that while its parts are joined). Further ones wait (up to ``max_waiting_uploads``), their
    bytes unread: gRPC's flow control keeps them at the client, within their deadline. Unbounded, a burst of large
    uploads took the process past its memory limit (12 concurrent 22 MiB uploads: 831 MiB held, from 190)."""

    max_waiting_uploads: int = Field(default=256, ge=0)
    """How many streamed uploads may wait, unread, for one of the ``max_concurrent_uploads``; a further one is
    refused at once, nothing of it read, with RESOURCE_EXHAUSTED and a retry delay (HTTP 429 at the gateway).
    A waiting upload holds about 0.1 MiB (its call, and the 64 KiB its client may send ahead), so many may wait:
    with 32, a load test's 50 callers uploading a small photo each saw 77 % of their calls refused (the waits of
    small uploads are short). Large ones that wait longer than their deadline end DEADLINE_EXCEEDED (eight
    received and 32 waiting 22 MiB uploads were all stored within 11 s on 2 cores)."""

    max_concurrent_decodes: int = Field(default=4, ge=1)
    """How many uploads may be decoded at once: a 50-megapixel image holds about 200 MB while it is decoded and
    thumbnailed (4 bytes a pixel; the thumbnail adds about 10 MB), besides its upload's bytes."""
