"""Wiring of the file service: database, blob store, store, servicer and the kit's runtime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from mesh.file.v1 import file_service_pb2_grpc
from mesh.kit.db import PostgresCheck, create_pool
from mesh.kit.health import Degrading, DirectoryCheck, FreeSpaceCheck
from mesh.kit.logging import describe, get_logger
from mesh.kit.migrations import SchemaMigrations
from mesh.kit.runtime import ServiceRuntime, sleep_unless_stopping
from mesh.services.file.blobs import MARKER, BlobStore
from mesh.services.file.postgres import PostgresImageRepository
from mesh.services.file.servicer import FileServicer
from mesh.services.file.settings import SERVICE_NAME, FileSettings
from mesh.services.file.store import ImageStore
from mesh.services.file.validation import Limits

MIGRATIONS = "mesh.services.file.migrations"

SERVER_OPTIONS = [("grpc.http2.bdp_probe", 0)]
"""gRPC server options of the file service. Without BDP probing, the HTTP/2 window that a stream's client may
fill before the service reads it stays at gRPC's 64 KiB, rather than growing with the connection's measured
bandwidth-delay product: the bytes of an upload waiting for a slot (``max_concurrent_uploads``) then stay with
its client, as the wait means them to. With probing, 48 concurrent 22.4 MiB uploads on one connection took the
process to 1504-1514 MiB (each waiting one held most of its file in gRPC's buffers); without it, to 582 MiB, and
100 to 595 MiB. A stream being read still gets each requested message's size as its window, so one upload on
localhost is as fast without it (0.30-0.35 s stored, 370-560 MiB/s over the bare transport, either way)."""

log = get_logger(__name__)


def limits_from(settings: FileSettings) -> Limits:
    """Upload limits from settings."""
    return Limits(
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_image_pixels,
        max_aspect_ratio=settings.max_aspect_ratio,
    )


async def sweep_periodically(
    store: ImageStore, migrations: SchemaMigrations, stopping: asyncio.Event, interval: float
) -> None:
    """Remove orphaned blobs now and every ``interval`` seconds until ``stopping`` is set."""
    while not stopping.is_set():
        if migrations.applied.is_set():
            try:
                await store.sweep_orphans()
            except Exception as error:  # a failed sweep is retried at the next interval
                log.warning("blob sweep failed", error=describe(error))
        await sleep_unless_stopping(stopping, interval if migrations.applied.is_set() else 5.0)


@contextlib.asynccontextmanager
async def file_service(settings: FileSettings) -> AsyncIterator[ServiceRuntime]:
    """A ready-to-run file service: open pool, servicer and health checks registered.

    The schema is migrated before this returns when PostgreSQL answers within
    ``startup_migration_seconds``; otherwise the service starts NOT_SERVING, answers UNAVAILABLE, and
    migrates in the background (:class:`~mesh.kit.migrations.SchemaMigrations`).
    The blob directory and its marker are created here when missing, first of all, so that a misconfigured
    volume stops the start at once (no probe will create them later): a directory this process may not write
    to raises :class:`~mesh.kit.errors.StartupError`, any other OSError as it is.

    ``await runtime.run()`` inside the block serves until SIGTERM (or ``runtime.stopping`` is set).
    """
    blobs = await asyncio.to_thread(BlobStore.opened, settings.blob_dir)
    migrations = SchemaMigrations(settings.database_url, "file", MIGRATIONS)
    migrated = await migrations.try_once(timeout=settings.startup_migration_seconds)
    pool = create_pool(
        settings.database_url,
        name="file",
        max_size=settings.db_pool_max_size,
        reconnect_timeout=settings.db_reconnect_seconds,
    )
    async with pool:
        store = ImageStore(
            PostgresImageRepository(pool),
            blobs,
            limits=limits_from(settings),
            thumbnail_size=settings.thumbnail_size,
            max_concurrent_decodes=settings.max_concurrent_decodes,
        )
        runtime = ServiceRuntime(
            "file",
            settings,
            service_names=[SERVICE_NAME],
            checks=[
                PostgresCheck(pool),
                DirectoryCheck("blob_store", settings.blob_dir, marker=MARKER),
                # Low space degrades: downloads, lists and gets still work, and an upload that does not fit
                # is refused with 507, so the pods stay in rotation.
                Degrading(FreeSpaceCheck("blob_space", settings.blob_dir)),
                migrations,
            ],
            interceptors=[migrations.gate([SERVICE_NAME])],
            options=SERVER_OPTIONS,
        )
        if not migrated:
            runtime.add_background(lambda: migrations.run_until_applied(runtime.stopping))
        if settings.blob_sweep_interval_seconds > 0:
            runtime.add_background(
                lambda: sweep_periodically(
                    store, migrations, runtime.stopping, settings.blob_sweep_interval_seconds
                )
            )
        servicer = FileServicer(
            store,
            default_chunk_bytes=settings.download_chunk_bytes,
            max_concurrent_uploads=settings.max_concurrent_uploads,
            max_waiting_uploads=settings.max_waiting_uploads,
        )
        file_service_pb2_grpc.add_FileServiceServicer_to_server(servicer, runtime.server)
        yield runtime
