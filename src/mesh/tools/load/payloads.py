"""Realistic request payloads, generated deterministically (nothing big is committed).

- a 1920x1080 JPEG "photo" (sky gradient, shapes, texture and sensor noise, quality 90);
- a phone photo of a lateral-flow cassette: sample well on the left, a faint test line T left of a strong
  control line C, slightly rotated and defocused, JPEG quality 85.

:func:`write_payloads` writes both images and the ghz request files (``*.json`` in protobuf's JSON mapping,
bytes as base64) that the configs in ``deploy/load/`` name with ``data-file``.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

PHOTO_NAME = "photo-1080p.jpg"
STRIP_NAME = "strip-photo.jpg"
UPLOAD_CHUNK_BYTES = 64 * 1024
STREAM_FRAMES = 10
PIPELINE: list[dict[str, Any]] = [{"filter": "gaussian_blur"}, {"filter": "grayscale"}]
MODEL = "strip-reader"
JPEG_COMMENT = b"\xff\xfe"


def _jpeg(rgb: npt.NDArray[np.uint8], quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def photo_1080p(seed: int = 1080) -> bytes:
    """A 1920x1080 outdoor-like photo as JPEG; the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    height, width = 1080, 1920
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky = np.array([110, 160, 230], np.float32) * (1 - rows) + np.array([235, 225, 200], np.float32) * rows
    image = np.broadcast_to(sky, (height, width, 3)).copy()
    for _ in range(40):
        colour = tuple(float(c) for c in rng.integers(20, 235, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(height // 3, height)))
        axes = (int(rng.integers(40, 400)), int(rng.integers(20, 200)))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    texture = cv2.GaussianBlur(rng.normal(0, 18, (height, width)).astype(np.float32), (0, 0), 3)
    image += texture[:, :, None]
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return _jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90)


def strip_photo(seed: int = 7, t_contrast: float = 0.15) -> bytes:
    """A 1280x960 phone photo of a positive lateral-flow cassette (T left of C) as JPEG."""
    rng = np.random.default_rng(seed)
    height, width = 960, 1280
    image = np.empty((height, width, 3), np.float32)
    image[:] = (142, 128, 112)  # a wooden table
    image += cv2.GaussianBlur(rng.normal(0, 10, (height, width)).astype(np.float32), (0, 0), 6)[:, :, None]
    cassette = np.zeros((height, width), np.float32)
    cv2.rectangle(cassette, (190, 370), (1090, 590), 1.0, -1)
    image = image * (1 - cassette[:, :, None]) + np.array([236, 236, 232], np.float32) * cassette[:, :, None]
    cv2.circle(image, (300, 480), 45, (205, 200, 195), -1, cv2.LINE_AA)  # sample well
    window = (560, 450, 960, 510)  # x0, y0, x1, y1 of the read window
    x0, y0, x1, y1 = window
    # The read window is recessed in the plastic: a grey frame around the membrane, shaded on its inner rim.
    cv2.rectangle(image, (x0 - 4, y0 - 4), (x1 + 3, y1 + 3), (140, 140, 145), 4)
    image[y0:y1, x0:x1] = (240, 236, 226)  # membrane
    image[y0 : y0 + 4, x0:x1] *= np.linspace(0.6, 1.0, 4, dtype=np.float32)[:, None, None]
    absorb = np.array([0.3, 1.0, 0.55], np.float32)  # red-purple colloidal gold
    xs = np.arange(x1 - x0, dtype=np.float32)
    for position, contrast in ((0.38, t_contrast), (0.72, 0.6)):
        shape = np.exp(-0.5 * ((xs - position * (x1 - x0)) / 4.0) ** 2)
        image[y0:y1, x0:x1] *= 1 - contrast * shape[None, :, None] * absorb[None, None, :]
    rotation = cv2.getRotationMatrix2D((width / 2, height / 2), 4.0, 1.0)
    rotated = cv2.warpAffine(image, rotation, (width, height), borderMode=cv2.BORDER_REFLECT)
    blurred = np.asarray(cv2.GaussianBlur(rotated, (0, 0), 1.2), dtype=np.float32)
    blurred += rng.normal(0, 3, blurred.shape).astype(np.float32)
    return _jpeg(np.clip(blurred, 0, 255).astype(np.uint8), quality=85)


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: identical pixels, a different SHA-256.

    Used so each upload is a new blob (as real uploads are) without paying for an encode per request.
    """
    payload = text.encode("utf-8")[:65000]
    return jpeg[:2] + JPEG_COMMENT + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def ghz_requests(photo: bytes, strip: bytes, ids: dict[str, str]) -> dict[str, Any]:
    """Request bodies for the ghz configs, keyed by file name (protobuf JSON mapping, bytes in base64).

    ``ids`` holds ``photo_image_id``, ``strip_image_id`` and ``job_id`` of seeded objects when known; the
    placeholder ``SEED_FIRST`` makes ghz fail with NOT_FOUND otherwise, which says what to do.
    """
    photo_id = ids.get("photo_image_id", "SEED_FIRST")
    strip_id = ids.get("strip_image_id", "SEED_FIRST")
    job_id = ids.get("job_id", "SEED_FIRST")
    chunks = [photo[i : i + UPLOAD_CHUNK_BYTES] for i in range(0, len(photo), UPLOAD_CHUNK_BYTES)]
    encoded_strip = {"encoded": {"data": _b64(strip), "format": "IMAGE_FORMAT_JPEG"}}
    predict = {"modelName": MODEL, "input": encoded_strip, "requestId": "ghz-{{.RequestNumber}}"}
    return {
        "upload-image.json": [
            {"metadata": {"filename": "photo-1080p.jpg", "contentType": "image/jpeg"}},
            *({"chunk": _b64(chunk)} for chunk in chunks),
            {"end": {}},
        ],
        "create-image.json": {
            "metadata": {"filename": "strip-photo.jpg", "contentType": "image/jpeg"},
            "data": _b64(strip),
        },
        "get-image.json": {"imageId": photo_id},
        "download-image.json": {"imageId": photo_id, "variant": "IMAGE_VARIANT_ORIGINAL"},
        "process-image.json": {
            "input": {"imageId": photo_id},
            "pipeline": PIPELINE,
            "output": {"format": "IMAGE_FORMAT_JPEG", "quality": 85},
        },
        "stream-process.json": [
            {"config": {"pipeline": PIPELINE, "output": {"format": "IMAGE_FORMAT_JPEG", "quality": 85}}},
            *({"frame": {"sequence": str(n), "image": encoded_strip}} for n in range(STREAM_FRAMES)),
        ],
        "predict.json": predict,
        "stream-inference.json": [{"request": predict} for _ in range(STREAM_FRAMES)],
        "submit-job.json": {
            "imageId": strip_id,
            "model": MODEL,
            "idempotencyKey": "ghz-{{.UUID}}",
        },
        "submit-pipeline-job.json": {
            "imageId": strip_id,
            "pipeline": PIPELINE,
            "model": MODEL,
            "idempotencyKey": "ghz-{{.UUID}}",
        },
        "get-job.json": {"jobId": job_id},
        "watch-job.json": {"jobId": job_id},
    }


def write_payloads(directory: Path, ids: dict[str, str] | None = None) -> dict[str, Path]:
    """Write the two images and every ghz request file into ``directory``; returns name -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    photo, strip = photo_1080p(), strip_photo()
    written = {}
    for name, data in ((PHOTO_NAME, photo), (STRIP_NAME, strip)):
        (directory / name).write_bytes(data)
        written[name] = directory / name
    for name, body in ghz_requests(photo, strip, ids or {}).items():
        (directory / name).write_text(json.dumps(body), encoding="utf-8")
        written[name] = directory / name
    if ids:
        (directory / "seeded-ids.json").write_text(json.dumps(ids, indent=2), encoding="utf-8")
    return written
