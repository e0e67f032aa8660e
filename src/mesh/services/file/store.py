"""The file service's use cases: upload, look up, list, open and delete images.

:class:`ImageStore` ties validation, thumbnails, the blob store and a repository together; it knows
nothing of gRPC or PostgreSQL. The repository owns the consistency between rows and blobs: blob files are
written and removed only while it holds a per-digest lock (see ``postgres.py``), so a concurrent upload and
delete of the same bytes can never leave a row whose blob is gone.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Literal, Protocol

from prometheus_client import Counter

from mesh.kit import errors, pagination
from mesh.kit.labels import check_labels
from mesh.kit.logging import get_logger
from mesh.kit.text_fields import MAX_IDEMPOTENCY_KEY_CHARS, text_problem
from mesh.services.file.blobs import BlobStore
from mesh.services.file.ids import parse_image_id
from mesh.services.file.models import ImageRecord, NewImage, Page
from mesh.services.file.thumbnails import make_thumbnail
from mesh.services.file.validation import DEFAULT_LIMITS, Limits, sanitise_filename, validate_image

log = get_logger(__name__)

IMAGES_SCOPE = "images"
"""The scope of ListImages's page tokens: a job listing's token is refused here, and the other way round."""

UPLOADS = Counter(
    "mesh_file_uploads_total", "Accepted uploads, by whether the bytes were already stored.", ["deduplicated"]
)
UPLOAD_BYTES = Counter("mesh_file_upload_bytes_total", "Bytes of accepted uploads.")
BLOBS_REMOVED = Counter("mesh_file_blobs_removed_total", "Blobs removed because no image referred to them.")


Variant = Literal["original", "thumbnail"]


class ImageRepository(Protocol):
    """Where image records live, and the lock that keeps rows and blob files consistent."""

    async def insert(
        self, image: NewImage, *, store_blobs: Callable[[], Awaitable[bool]]
    ) -> tuple[ImageRecord, bool]:
        """Record ``image``; returns (record, deduplicated).

        ``store_blobs`` is awaited while the image's digests are locked, right before the row is written,
        and returns True when the original's bytes were already stored. When ``image.idempotency_key`` is
        already recorded, that image is returned (deduplicated) and ``store_blobs`` is not called.
        """
        ...

    async def get(self, image_id: uuid.UUID) -> ImageRecord | None:
        """The image, or None."""
        ...

    async def find_by_idempotency_key(self, key: str) -> ImageRecord | None:
        """The image uploaded with ``key``, or None."""
        ...

    async def list_page(self, limit: int, after: pagination.Cursor | None) -> list[ImageRecord]:
        """Up to ``limit`` images older than ``after`` (all when None), newest first."""
        ...

    async def delete(self, image_id: uuid.UUID) -> ImageRecord | None:
        """Delete and commit the row; returns it, or None when there was none."""
        ...

    async def release_blobs(
        self, digests: Sequence[str], *, remove: Callable[[str], Awaitable[bool]]
    ) -> list[str]:
        """Under the digests' locks, call ``remove`` for each digest no row refers to; returns those removed.

        A ``remove`` under way runs to its end, even when the caller is cancelled, before the locks are given up.
        """
        ...


@dataclass(frozen=True)
class UploadRequest:
    """What a client says about an upload."""

    filename: str = ""
    content_type: str = ""
    sha256: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str = ""


@dataclass(frozen=True)
class UploadResult:
    """The stored image and whether its bytes were stored already."""

    image: ImageRecord
    deduplicated: bool


@dataclass(frozen=True)
class OpenedBlob:
    """An image's bytes, opened for reading."""

    image: ImageRecord
    content_type: str
    size_bytes: int
    file: BinaryIO


class ImageStore:
    """Validated, deduplicated, content-addressed image storage."""

    def __init__(
        self,
        repository: ImageRepository,
        blobs: BlobStore,
        *,
        limits: Limits = DEFAULT_LIMITS,
        thumbnail_size: int = 256,
        max_concurrent_decodes: int = 4,
    ) -> None:
        self.repository = repository
        self.blobs = blobs
        self.limits = limits
        self.thumbnail_size = thumbnail_size
        # A 50-megapixel image holds about 200 MB while decoded and thumbnailed; bound how many run at once.
        self._decodes = asyncio.Semaphore(max_concurrent_decodes)

    async def upload(self, data: bytes, request: UploadRequest, *, field: str | None = None) -> UploadResult:
        """Validate and store ``data``; the same idempotency key with the same bytes returns the first image
        (with other bytes, ALREADY_EXISTS). A refusal of the bytes names ``field``, the request field that
        carried them."""
        labels = check_labels(request.labels, "metadata.labels")
        key = _check_idempotency_key(request.idempotency_key)
        if key:
            existing = await self.repository.find_by_idempotency_key(key)
            if existing is not None:
                sha256 = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
                return UploadResult(_same_upload(existing, sha256, key), True)
        async with self._decodes:
            decoded = await asyncio.to_thread(
                validate_image,
                data,
                declared_content_type=request.content_type,
                declared_sha256=request.sha256,
                limits=self.limits,
                field=field,
            )
            thumbnail = await asyncio.to_thread(make_thumbnail, decoded, self.thumbnail_size)
        info = decoded.info
        del decoded  # the decoded pixels are not kept while the blobs and the row are written
        thumbnail_sha256 = hashlib.sha256(thumbnail.data).hexdigest()
        new = NewImage(
            id=uuid.uuid4(),
            filename=sanitise_filename(request.filename, info.format),
            content_type=info.content_type,
            format=info.format,
            width=info.width,
            height=info.height,
            channels=info.channels,
            bit_depth=info.bit_depth,
            size_bytes=info.size_bytes,
            sha256=info.sha256,
            thumbnail_sha256=thumbnail_sha256,
            thumbnail_content_type=thumbnail.content_type,
            labels=labels,
            idempotency_key=key or None,
        )

        async def store_blobs() -> bool:
            try:
                written = await asyncio.to_thread(self.blobs.write, info.sha256, data)
                await asyncio.to_thread(self.blobs.write, thumbnail_sha256, thumbnail.data)
            except OSError as error:
                raise _blob_store_unavailable(error) from error
            return not written

        record, deduplicated = await self.repository.insert(new, store_blobs=store_blobs)
        if record.id != new.id:  # a racing upload with the same key was recorded first
            _same_upload(record, info.sha256, key)
        UPLOADS.labels(str(deduplicated).lower()).inc()
        UPLOAD_BYTES.inc(info.size_bytes)
        log.info(
            "image stored",
            image_id=str(record.id),
            sha256=record.sha256,
            size_bytes=record.size_bytes,
            deduplicated=deduplicated,
        )
        return UploadResult(record, deduplicated)

    async def get(self, image_id: str) -> ImageRecord:
        """The image's record; NotFound when there is none."""
        parsed = parse_image_id(image_id)
        record = await self.repository.get(parsed)
        if record is None:
            raise _not_found(parsed)
        return record

    async def list(self, page_size: int, page_token: str) -> Page:
        """One page, newest first; ``next_page_token`` is empty on the last page."""
        size = pagination.page_size(page_size)
        cursor = pagination.decode_page_token(page_token, IMAGES_SCOPE)
        rows = await self.repository.list_page(size + 1, cursor)
        images = rows[:size]
        token = ""
        if len(rows) > size:
            last = images[-1]
            token = pagination.encode_page_token(pagination.Cursor(last.created_at, last.id, IMAGES_SCOPE))
        return Page(images, token)

    async def open(self, image_id: str, variant: Variant = "original") -> OpenedBlob:
        """The bytes of an image or of its thumbnail, opened for streaming."""
        record = await self.get(image_id)
        if variant == "thumbnail":
            if record.thumbnail_sha256 is None:
                raise errors.NotFound(f"image {record.id} has no thumbnail; download the original instead")
            digest, content_type = record.thumbnail_sha256, record.thumbnail_content_type
        else:
            digest, content_type = record.sha256, record.content_type
        try:
            handle = await asyncio.to_thread(self.blobs.open, digest)
        except FileNotFoundError:
            if await self.repository.get(record.id) is None:  # deleted meanwhile
                raise _not_found(record.id) from None
            log.error("blob missing", image_id=str(record.id), sha256=digest)
            raise errors.Internal(
                f"the stored bytes of image {record.id} are missing from the blob store; "
                "upload the image again to restore them"
            ) from None
        except OSError as error:
            raise _blob_store_unavailable(error) from error
        size = await asyncio.to_thread(_file_size, handle)
        if variant == "original" and size != record.size_bytes:
            # Served as it is, a client got a body short of its Content-Length and no error.
            handle.close()
            log.error(
                "blob damaged", image_id=str(record.id), sha256=digest, size=size, recorded=record.size_bytes
            )
            raise errors.Internal(
                f"the stored bytes of image {record.id} are damaged ({size} bytes in the blob store, "
                f"{record.size_bytes} recorded); upload the image again to restore them"
            )
        return OpenedBlob(record, content_type, size, handle)

    async def delete(self, image_id: str) -> bool:
        """Delete the image; True when its original's blob was removed (no other image used it)."""
        parsed = parse_image_id(image_id)
        record = await self.repository.delete(parsed)
        if record is None:
            raise _not_found(parsed)
        digests = [record.sha256]
        if record.thumbnail_sha256 is not None and record.thumbnail_sha256 != record.sha256:
            digests.append(record.thumbnail_sha256)

        async def remove(digest: str) -> bool:
            try:
                return await asyncio.to_thread(self.blobs.remove, digest)
            except OSError as error:
                # The row is gone already; the blob stays behind as unreferenced space.
                log.warning("blob not removed", sha256=digest, error=str(error))
                return False

        try:
            removed = await self.repository.release_blobs(digests, remove=remove)
        except errors.MeshError as error:
            # The delete is committed: an error now would be retried (UNAVAILABLE is) into NOT_FOUND. The
            # blobs stay behind until the orphan sweep.
            log.warning("blobs not released after a delete", image_id=str(parsed), error=error.message)
            return False
        BLOBS_REMOVED.inc(len(removed))
        log.info("image deleted", image_id=str(parsed), blobs_removed=len(removed))
        return record.sha256 in removed

    async def sweep_orphans(self, *, batch: int = 200, temporary_age_seconds: float = 3600.0) -> int:
        """Remove blobs no image refers to (left by a crash between a delete and its blob removal, or
        by an upload whose row was never committed) and stale temporary files; returns blobs removed.

        Each digest is checked under the same lock uploads take, so a blob being uploaded is never
        taken for an orphan.
        """
        await asyncio.to_thread(self.blobs.remove_stale_temporaries, temporary_age_seconds)
        digests = await asyncio.to_thread(self.blobs.digests)

        async def remove(digest: str) -> bool:
            return await asyncio.to_thread(self.blobs.remove, digest)

        removed = 0
        for start in range(0, len(digests), batch):
            removed += len(await self.repository.release_blobs(digests[start : start + batch], remove=remove))
        if removed:
            BLOBS_REMOVED.inc(removed)
            log.info("orphaned blobs removed", count=removed, scanned=len(digests))
        return removed


def _file_size(handle: BinaryIO) -> int:
    return os.fstat(handle.fileno()).st_size


def _blob_store_unavailable(error: OSError) -> errors.MeshError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.StorageFull(
            f"the blob store is full ({error.strerror}); nothing was stored. Free space on its volume or "
            "enlarge it, then try again"
        )
    return errors.Unavailable(
        f"the blob store is unusable ({type(error).__name__}: {error.strerror or error}); retry shortly",
        retry_after_seconds=1.0,
    )


def _not_found(image_id: uuid.UUID) -> errors.NotFound:
    return errors.NotFound(
        f"image {image_id} does not exist (it was never uploaded or has been deleted)",
        metadata={"image_id": str(image_id)},
    )


def _same_upload(existing: ImageRecord, sha256: str, key: str) -> ImageRecord:
    """``existing``, the image ``key`` names, when this upload holds its bytes: a retry after a lost answer.
    Other bytes are another image under a reused key, which would otherwise be lost while its client holds the
    first image's id as its own: ALREADY_EXISTS."""
    if existing.sha256 != sha256:
        raise errors.AlreadyExists(
            f"idempotency_key {key!r} already names image {existing.id}, whose bytes differ from these "
            f"(sha256 {existing.sha256[:12]}..., these {sha256[:12]}...); upload another image with a new key",
            field_violations=[errors.FieldViolation("metadata.idempotency_key", "names another image")],
            metadata={"image_id": str(existing.id)},
        )
    return existing


def _check_idempotency_key(key: str) -> str:
    problem = text_problem(key, MAX_IDEMPOTENCY_KEY_CHARS)
    if problem:
        raise errors.InvalidArgument(
            f"idempotency_key {problem}",
            field_violations=[errors.FieldViolation("metadata.idempotency_key", problem)],
        )
    return key
