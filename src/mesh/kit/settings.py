"""Settings from the environment: one pattern for every process.

Each process has a frozen settings class derived from :class:`CommonSettings`; every field is read from
``MESH_<FIELD>`` (upper case). :func:`load_settings` validates at start and exits with a message naming the
bad variable, instead of failing later with a stack trace.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Self, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MESH_"


DEFAULT_DELIVERY_LIMIT = 5


MAX_MESSAGE_BYTES = 96 * 1024 * 1024
"""The default gRPC message limit of servers and channels: a 4K RGBA frame and its envelope fit."""


class CommonSettings(BaseSettings):
    """Settings every process understands."""

    # inf and nan pass every gt= bound: an infinite deadline or health interval would be taken silently.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore", allow_inf_nan=False)

    database_url: str = "postgresql://localhost/mesh"
    """PostgreSQL connection URL; the database is created on first start when absent."""

    amqp_url: str = "amqp://guest:guest@localhost:5672/%2F"
    """RabbitMQ connection URL."""

    queue_prefix: str = ""
    """Prefix of every RabbitMQ queue name (``<prefix>mesh.jobs.image``), the same for the queue service and
    its workers: it isolates deployments (and test meshes) that share one RabbitMQ vhost."""

    delivery_limit: int = Field(default=DEFAULT_DELIVERY_LIMIT, ge=1)
    """Quorum-queue ``x-delivery-limit`` of the job queues: deliveries of one dispatch before it is
    dead-lettered. The queue service and its workers declare the queues alike, so they must agree."""

    blob_dir: Path = Path("var/blobs")
    """Root of the content-addressed blob store (files named by SHA-256)."""

    device: Literal["auto", "gpu", "cpu"] = "auto"
    """Compute backend: ``auto`` uses the GPU when CuPy sees one, else the CPU."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Minimum level of log lines."""

    log_format: Literal["json", "console"] = "json"
    """``json`` lines for machines, ``console`` for people at a terminal."""

    file_service_address: str = "localhost:50051"
    """host:port of the file service."""

    image_service_address: str = "localhost:50052"
    """host:port of the image processing service."""

    inference_service_address: str = "localhost:50053"
    """host:port of the inference service."""

    queue_service_address: str = "localhost:50054"
    """host:port of the queue service."""

    rpc_timeout_seconds: float = Field(default=30.0, gt=0, le=86400)
    """Default deadline of every outgoing unary gRPC call."""

    tls_ca_file: Path | None = None
    """CA bundle for verifying gRPC peers; setting it turns TLS on for outgoing channels."""

    tls_cert_file: Path | None = None
    """This process's certificate (server side, and client side for mutual TLS)."""

    tls_key_file: Path | None = None
    """Private key for ``tls_cert_file``."""

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        """``MESH_TLS_CA_FILE=`` (an overlay's empty value) means unset, not the current directory."""
        return None if value == "" else value

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @model_validator(mode="after")
    def _certificate_with_its_key(self) -> Self:
        """A certificate without its key (or a key without its certificate) turned TLS off without a word."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "MESH_TLS_CERT_FILE and MESH_TLS_KEY_FILE go together: set both (TLS) or neither (plaintext)"
            )
        return self

    @property
    def tls_mode(self) -> str:
        """How this process serves gRPC: ``plaintext``, ``tls``, or ``mtls`` (clients must show a certificate
        signed by the CA)."""
        if self.tls_cert_file is None:
            return "plaintext"
        return "mtls" if self.tls_ca_file else "tls"


class ServerSettings(CommonSettings):
    """Settings of a process that serves gRPC (every service but the gateway)."""

    grpc_host: str = "0.0.0.0"
    """Interface the gRPC server binds."""

    grpc_port: int = Field(default=0, ge=0, le=65535)
    """gRPC port; each service class sets its own default (see CONTRACT.md)."""

    http_host: str = "0.0.0.0"
    """Interface of the HTTP port that serves /metrics and /healthz."""

    http_port: int = Field(default=0, ge=0, le=65535)
    """HTTP port for /metrics and /healthz; each service class sets its own default."""

    grace_seconds: float = Field(default=10.0, ge=0)
    """How long in-flight RPCs may run after SIGTERM before they are cancelled."""

    health_interval_seconds: float = Field(default=2.0, gt=0)
    """How often dependency checks run."""

    health_timeout_seconds: float = Field(default=2.0, gt=0)
    """How long one dependency check may take before it counts as failed."""

    max_message_bytes: int = Field(default=MAX_MESSAGE_BYTES, ge=64 * 1024 * 1024)
    """gRPC receive/send limit; at least 64 MiB so that a 4K RGBA frame fits."""


class WorkerSettings(ServerSettings):
    """Settings of a service that also runs a job worker (image processing, inference)."""

    job_concurrency: int = Field(default=4, ge=0, le=256)
    """Jobs this process runs at once from its queue; 0 turns the worker off (the service still serves)."""


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def format_validation_error(error: ValidationError) -> str:
    """One line per bad variable, naming the environment variable and what is wrong."""
    lines = ["invalid settings:"]
    for item in error.errors():
        if not item["loc"]:  # a rule across variables names them in its message
            lines.append(f"  {item['msg']}")
            continue
        field = str(item["loc"][0])
        value = item.get("input")
        lines.append(f"  {ENV_PREFIX}{field.upper()}={value!r}: {item['msg']}")
    return "\n".join(lines)


def load_settings(cls: type[SettingsT]) -> SettingsT:
    """Read and validate ``cls`` from the environment, or exit with status 2 naming each bad variable."""
    try:
        return cls()
    except ValidationError as error:
        print(format_validation_error(error), file=sys.stderr)
        raise SystemExit(2) from None
