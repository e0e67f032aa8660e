"""The inference service's settings (``MESH_*`` environment variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from mesh.inference.v1 import inference_service_pb2
from mesh.kit.settings import DeviceSettings, FileServiceAddress, WorkerSettings

SERVICE_NAME = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
"""The inference service's gRPC (and health) name, from the .proto so that it cannot drift."""

# The repository root when the package runs from a checkout (src/mesh/services/inference/settings.py).
_CHECKOUT_ROOT = Path(__file__).resolve().parents[4]


class InferenceSettings(DeviceSettings, FileServiceAddress, WorkerSettings):
    """Settings of ``python -m mesh.services.inference`` (it fetches the images a request names by id from the
    file service)."""

    grpc_port: int = Field(default=50053, ge=0, le=65535)
    """gRPC port of the InferenceService."""

    http_port: int = Field(default=9103, ge=0, le=65535)
    """HTTP port for /metrics and /healthz."""

    model_dir: Path = Path("models")
    """The model repository: ``<model_dir>/<name>/<version>/config.yaml``; relative to the working directory,
    or to the checkout's root when the working directory has none."""

    max_image_pixels: int = Field(default=40_000_000, gt=0)
    """Largest input image (width x height) accepted; bigger ones are refused before decoding."""

    stream_max_in_flight: int = Field(default=32, ge=1)
    """Requests of one StreamInference call processed concurrently (so that they can share batches)."""

    def resolved_model_dir(self) -> Path:
        """``model_dir`` as an absolute path: the working directory first, then the checkout root."""
        if self.model_dir.is_absolute() or self.model_dir.exists():
            return self.model_dir.resolve()
        fallback = _CHECKOUT_ROOT / self.model_dir
        return fallback if fallback.exists() else self.model_dir.resolve()
