"""``python -m mesh.services.image_processing``: the image-processing service (gRPC 50052, HTTP 9102)."""

from __future__ import annotations

from mesh.kit.runtime import run_service
from mesh.services.image_processing.server import image_processing_service
from mesh.services.image_processing.settings import ImageSettings


def run() -> None:
    """Serve until SIGTERM or Ctrl-C; MESH_DEVICE=gpu without a GPU exits 2 with one line."""
    # Requests carry frames of many megabytes: keep those buffers in the heap instead of fresh mmap pages.
    run_service("image-processing", ImageSettings, image_processing_service, large_messages=True)


if __name__ == "__main__":
    run()
