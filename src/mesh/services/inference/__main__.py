"""``python -m mesh.services.inference``: load the model repository, then serve InferenceService."""

from __future__ import annotations

from mesh.kit.runtime import run_service
from mesh.services.inference.server import inference_service
from mesh.services.inference.settings import InferenceSettings


def run() -> None:
    """Serve until SIGTERM or Ctrl-C; a bad model repository or MESH_DEVICE=gpu without a GPU exits 2 with
    one line."""
    # Requests carry frames of many megabytes: keep those buffers in the heap instead of fresh mmap pages.
    run_service("inference", InferenceSettings, inference_service, large_messages=True)


if __name__ == "__main__":
    run()
