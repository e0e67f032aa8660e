"""``/v1/images``: upload (multipart or raw body), list, metadata, bytes (streamed), delete."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from mesh.file.v1 import file_service_pb2
from mesh.kit import errors
from mesh.kit.image_bytes import IMAGE_CONTENT_TYPES, declared_image_type, extension_of
from mesh.kit.pagination import DEFAULT_PAGE_SIZE
from mesh.services.gateway import convert, idempotency, schemas
from mesh.services.gateway.bodies import media_type
from mesh.services.gateway.context import Caller, Context
from mesh.services.gateway.spans import annotate

router = APIRouter(prefix="/v1/images", tags=["images"])

ACCEPTED_TYPES = IMAGE_CONTENT_TYPES
_BINARY = {"schema": {"type": "string", "format": "binary"}}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "A multipart form with the image in the field `file`, or the raw image bytes.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            **{t: _BINARY for t in ACCEPTED_TYPES},
            "application/octet-stream": {
                **_BINARY,
                "description": "Any of the image types, detected from the bytes (also without a Content-Type).",
            },
        },
    },
    "parameters": [
        {
            "name": "filename",
            "in": "query",
            "required": False,
            "description": "The name stored with a raw body (a form's file carries its own); made safe and cut "
            "to 200 characters by the file service.",
            "schema": {"type": "string"},
        },
        {
            **idempotency.OPENAPI_PARAMETER,
            "description": "The same key and bytes again return the first image; other bytes under it are 409.",
        },
    ],
}
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": schemas.ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 429, 500, 503, 504)
}
# An upload writes to the blob store, which answers 507 when its volume is full.
UPLOAD_ERRORS: dict[int | str, dict[str, object]] = {
    **ERRORS,
    507: {"model": schemas.ErrorResponse, "description": "The blob store's volume is full"},
}


@dataclass
class Upload:
    """An uploaded file on its way to the file service: its first bytes, the rest as it arrives (none for a
    form's file), its name and its declared type."""

    first: bytes
    rest: AsyncIterator[bytes] | None
    filename: str
    declared: str
    size: int = 0
    """Bytes passed on so far."""

    async def stream(self) -> AsyncIterator[bytes]:
        """Every non-empty chunk, counted."""
        self.size = len(self.first)
        yield self.first
        if self.rest is not None:
            async for chunk in self.rest:
                if chunk:
                    self.size += len(chunk)
                    yield chunk


async def _read_upload(request: Request) -> Upload:
    """A multipart form's file (read whole: the form parser holds it anyway), or a raw body streamed on as it
    arrives; refused before anything is forwarded when its type is wrong or it is empty.

    A declared type is normalised as the file service does (``image/jpg`` is ``image/jpeg``, S3's
    ``binary/octet-stream`` declares nothing), so the gateway refuses no type that the service accepts.
    """
    kind = media_type(request)
    rest: AsyncIterator[bytes] | None = None
    if kind == "multipart/form-data":
        try:
            async with request.form(max_files=1, max_fields=8) as form:
                part = form.get("file")
                if not isinstance(part, UploadFile):
                    sent = ", ".join(
                        f"`{name}`" + (" (text)" if isinstance(value, str) else " (a file)")
                        for name, value in form.multi_items()
                    )
                    raise errors.InvalidArgument(
                        "the multipart form has no file in the field `file`"
                        + (f"; it has {sent}" if sent else "; it is empty"),
                        field_violations=[errors.FieldViolation("file", "required: the image file")],
                    )
                first = await part.read()
                declared = declared_image_type(part.content_type or "", what="file type")
                filename = part.filename or "upload"
        except HTTPException as error:  # Starlette's form parser: no boundary, too many files or fields
            raise errors.InvalidArgument(
                f"the multipart form could not be read ({error.detail}); send one file, in the field `file`",
                field_violations=[errors.FieldViolation("file", "one image file")],
            ) from None
    else:
        declared = declared_image_type(kind)
        filename = request.query_params.get("filename") or f"upload{extension_of(declared)}"
        rest = request.stream()
        first = b""
        async for chunk in rest:
            if chunk:
                first = chunk
                break
    if not first:
        raise errors.InvalidData(
            "the file is empty", field_violations=[errors.FieldViolation("file", "empty")]
        )
    return Upload(first, rest, filename, declared)


@router.post(
    "",
    status_code=201,
    response_model=schemas.ImageOut,
    openapi_extra=UPLOAD_BODY,
    responses=UPLOAD_ERRORS,
    summary="Upload an image",
)
async def upload_image(request: Request, response: Response, ctx: Context, _: Caller) -> schemas.ImageOut:
    """Store a PNG, JPEG or WebP image; the same bytes again give the same sha256 and no second blob.

    Send ``Idempotency-Key`` to make a retried upload return the first image (409 for other bytes under it).
    """
    key = idempotency.header_key(request)
    upload = await _read_upload(request)
    annotate({"mesh.image.declared_type": upload.declared or "undeclared"})
    result = await ctx.backends.files.upload(
        upload.stream(),
        filename=upload.filename,
        content_type=upload.declared,
        idempotency_key=key,
    )
    response.headers["Location"] = f"/v1/images/{result.image.id}"
    annotate(
        {
            "mesh.image.bytes": upload.size,
            "mesh.image.id": result.image.id,
            "mesh.image.width": result.image.width,
            "mesh.image.height": result.image.height,
            "mesh.image.deduplicated": result.deduplicated,
        }
    )
    return convert.image(result.image, deduplicated=result.deduplicated)


@router.get("", response_model=schemas.ImageList, responses=ERRORS, summary="List images")
async def list_images(
    ctx: Context,
    _: Caller,
    page_size: schemas.PageSizeQuery = DEFAULT_PAGE_SIZE,
    page_token: schemas.PageTokenQuery = "",
) -> schemas.ImageList:
    """Images, newest first; pass ``next_page_token`` back as ``page_token`` for the next page."""
    page = await ctx.backends.files.list(page_size=page_size, page_token=page_token)
    return schemas.ImageList(
        images=[convert.image(i) for i in page.images], next_page_token=page.next_page_token
    )


@router.get("/{image_id}", response_model=schemas.ImageOut, responses=ERRORS, summary="An image's metadata")
async def get_image(image_id: schemas.ImageIdPath, ctx: Context, _: Caller) -> schemas.ImageOut:
    """One image's metadata."""
    return convert.image(await ctx.backends.files.get(image_id))


@router.get(
    "/{image_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {"content": {t: _BINARY for t in ACCEPTED_TYPES}},
        304: {"description": "Not Modified: `If-None-Match` holds the ETag"},
        **ERRORS,
    },
    summary="An image's bytes",
)
async def get_image_content(
    image_id: schemas.ImageIdPath,
    request: Request,
    ctx: Context,
    _: Caller,
    variant: Literal["original", "thumbnail"] = "original",
) -> Response:
    """The stored bytes (streamed as they arrive from the file service), or its 256 px thumbnail.

    An image's bytes never change, so a request whose ``If-None-Match`` holds the ETag is answered 304 without
    a body.
    """
    annotate({"mesh.image.id": image_id, "mesh.image.variant": variant})
    wanted = (
        file_service_pb2.IMAGE_VARIANT_THUMBNAIL
        if variant == "thumbnail"
        else file_service_pb2.IMAGE_VARIANT_ORIGINAL
    )
    # Passed on chunk by chunk as they arrive, never gathered (and not read at all for a 304).
    download = await ctx.backends.files.download_stream(image_id, variant=wanted)
    image = download.image
    headers = {"Cache-Control": "private, max-age=3600", "ETag": f'"{image.sha256}-{variant}"'}
    if _etag_matches(request.headers.get("if-none-match", ""), headers["ETag"]):
        download.cancel()
        return Response(status_code=304, headers=headers)
    served_type = download.content_type or image.content_type or "application/octet-stream"
    filename = _thumbnail_name(image.filename, served_type) if variant == "thumbnail" else image.filename
    headers["Content-Disposition"] = _content_disposition(filename)
    if variant == "original" and image.size_bytes:
        headers["Content-Length"] = str(image.size_bytes)
    return StreamingResponse(download.chunks(), media_type=served_type, headers=headers)


def _etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110's weak comparison of ``If-None-Match`` (a list of tags, or ``*``) with our strong ETag."""
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _thumbnail_name(name: str, served_type: str) -> str:
    """``photo.png``'s thumbnail served as a JPEG is ``photo.thumbnail.jpg``: a thumbnail's type is its own
    (JPEG, or PNG for an image with alpha), so the original's extension would mislabel it."""
    stem = name.rpartition(".")[0] or name or "image"
    return f"{stem}.thumbnail{extension_of(served_type)}"


def _content_disposition(name: str) -> str:
    """An ASCII ``filename`` for every client, and RFC 6266's ``filename*`` when the name is not ASCII."""
    plain = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name) or "image"
    header = f'inline; filename="{plain}"'
    if name and plain != name:
        header += f"; filename*=UTF-8''{quote(name, safe='')}"
    return header


@router.delete("/{image_id}", status_code=204, responses=ERRORS, summary="Delete an image")
async def delete_image(image_id: schemas.ImageIdPath, ctx: Context, _: Caller) -> Response:
    """Delete an image; its blob goes when no other image uses it."""
    await ctx.backends.files.delete(image_id)
    return Response(status_code=204)
