"""Wiring of the file service: database, blob store, store, servicer and the kit's runtime."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mesh.file.v1 import file_service_pb2_grpc
from mesh.kit.db import PostgresCheck, create_pool, prepare_database
from mesh.kit.health import DirectoryCheck
from mesh.kit.runtime import ServiceRuntime
from mesh.services.file.blobs import BlobStore
from mesh.services.file.postgres import PostgresImageRepository
from mesh.services.file.servicer import SERVICE_NAME, FileServicer
from mesh.services.file.settings import FileSettings
from mesh.services.file.store import ImageStore
from mesh.services.file.validation import Limits

MIGRATIONS = "mesh.services.file.migrations"


def limits_from(settings: FileSettings) -> Limits:
    """Upload limits from settings."""
    return Limits(
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_image_pixels,
        max_aspect_ratio=settings.max_aspect_ratio,
    )


@contextlib.asynccontextmanager
async def file_service(settings: FileSettings) -> AsyncIterator[ServiceRuntime]:
    """A ready-to-run file service: migrated database, open pool, servicer and health checks registered.

    ``await runtime.run()`` inside the block serves until SIGTERM (or ``runtime.stopping`` is set).
    """
    await prepare_database(settings.database_url, "file", MIGRATIONS)
    pool = create_pool(settings.database_url, name="file", max_size=settings.db_pool_max_size)
    async with pool:
        blobs = BlobStore(settings.blob_dir)
        store = ImageStore(
            PostgresImageRepository(pool),
            blobs,
            limits=limits_from(settings),
            thumbnail_size=settings.thumbnail_size,
        )
        runtime = ServiceRuntime(
            "file",
            settings,
            service_names=[SERVICE_NAME],
            checks=[PostgresCheck(pool), DirectoryCheck("blob_store", settings.blob_dir)],
        )
        servicer = FileServicer(store, default_chunk_bytes=settings.download_chunk_bytes)
        file_service_pb2_grpc.add_FileServiceServicer_to_server(servicer, runtime.server)
        yield runtime
