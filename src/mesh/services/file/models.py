"""The file service's records, independent of gRPC and PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, kw_only=True)
class NewImage:
    """An accepted upload, ready to be recorded."""

    id: uuid.UUID
    filename: str
    content_type: str
    format: str
    width: int
    height: int
    channels: int
    bit_depth: int
    size_bytes: int
    sha256: str
    thumbnail_sha256: str | None
    thumbnail_content_type: str
    labels: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None


@dataclass(frozen=True, kw_only=True)
class ImageRecord(NewImage):
    """A stored image."""

    created_at: datetime

    @property
    def has_thumbnail(self) -> bool:
        """Whether a thumbnail blob is stored."""
        return self.thumbnail_sha256 is not None


@dataclass(frozen=True)
class Page:
    """One page of a listing, newest first."""

    images: list[ImageRecord]
    next_page_token: str
