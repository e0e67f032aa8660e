"""Settings from the environment: one pattern for every process.

Each process has a frozen settings class composed of :class:`CommonSettings` (what every process reads) and
the mixins of what it uses besides: RabbitMQ (:class:`BrokerSettings`), the blob store (:class:`BlobSettings`),
a compute device (:class:`DeviceSettings`), the address of each service it calls (:class:`FileServiceAddress`
and the like), a gRPC server (:class:`ServerSettings`), a job worker (:class:`WorkerSettings`). Code that
needs a setting takes the mixin that holds it, and a variable that a class lacks is ignored, so that one
environment can serve the whole mesh (:class:`MeshSettings` holds every setting, for the tools that run it).
Every field is read from ``MESH_<FIELD>`` (upper case). :func:`load_settings` validates at start and exits
with a message naming the bad variable, instead of failing later with a stack trace, and warns of ``MESH_*``
variables that no settings class of the mesh reads (a misspelt name would otherwise be ignored without a word).

Each field's docstring is its documentation: ``scripts/settings_table.py`` writes the README's settings tables
from them.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Self, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from mesh.kit.supervision import SUPERVISOR_ENV

ENV_PREFIX = "MESH_"

OTHER_VARIABLES = frozenset({SUPERVISOR_ENV, "MESH_QUEUE_RELAY_SETTINGS"})
"""``MESH_*`` variables the mesh reads besides its settings: the supervisor's pid, and the queue service's
settings handed to its relay process (``mesh.services.queue.relay_process``, too heavy to import here)."""

FOREIGN_PREFIXES = ("MESH_TEST_", "MESH_BENCH_")
"""Prefixes of the test suite's and the benchmarks' own variables, which are no settings of a process."""


DEFAULT_DELIVERY_LIMIT = 5


MAX_MESSAGE_BYTES = 96 * 1024 * 1024
"""The default gRPC message limit of servers and channels: a 4K RGBA frame and its envelope fit."""


class CommonSettings(BaseSettings):
    """Settings every process reads: its database, its logs, and TLS for the gRPC it serves or calls."""

    # inf and nan pass every gt= bound: an infinite deadline or health interval would be taken silently.
    # The field docstrings become the fields' descriptions, which the README's settings tables are made of; a
    # field renamed with its old variable name kept as an alias (AliasChoices) is still set by its name in code.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        allow_inf_nan=False,
        use_attribute_docstrings=True,
        validate_by_name=True,
    )

    database_url: str = "postgresql://localhost/mesh"
    """PostgreSQL connection URL; the database is created on first start when absent."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Minimum level of log lines."""

    log_format: Literal["json", "console"] = "json"
    """``json`` lines for machines, ``console`` for people at a terminal (``make up`` on a terminal sets
    ``console``)."""

    tls_ca_file: Path | None = None
    """CA bundle for verifying gRPC peers; setting it turns TLS on for outgoing channels."""

    tls_cert_file: Path | None = None
    """This process's certificate (server side, and client side for mutual TLS)."""

    tls_key_file: Path | None = None
    """Private key of ``MESH_TLS_CERT_FILE``."""

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


class BrokerSettings(CommonSettings):
    """RabbitMQ: the queue service publishes jobs to it, the job workers (image processing, inference) consume
    them."""

    amqp_url: str = "amqp://guest:guest@localhost:5672/%2F"
    """RabbitMQ connection URL; the AMQP heartbeat is 15 s unless the URL names one (``?heartbeat=N``)."""

    queue_prefix: str = ""
    """Prefix of every RabbitMQ queue name (``<prefix>mesh.jobs.image``), the same for the queue service and
    its workers: it isolates deployments (and test meshes) that share one RabbitMQ vhost.
    ``python -m mesh.tools.up --port-offset N`` sets it to ``offset<N>.``."""

    delivery_limit: int = Field(default=DEFAULT_DELIVERY_LIMIT, ge=1)
    """Quorum-queue ``x-delivery-limit`` of the job queues: deliveries of one dispatch before it is
    dead-lettered. The queue service and its workers declare the queues alike, so they must agree."""


class BlobSettings(CommonSettings):
    """The blob store, which the file service keeps."""

    blob_dir: Path = Path("var/blobs")
    """Root of the content-addressed blob store (files named by SHA-256), relative to the working directory."""


class DeviceSettings(CommonSettings):
    """The compute device of the services that compute on one (image processing, inference)."""

    device: Literal["auto", "gpu", "cpu"] = "auto"
    """Compute backend: ``auto`` uses the GPU when CuPy sees one, else the CPU."""


class CallerSettings(CommonSettings):
    """Settings of a process that calls other services over gRPC (:func:`mesh.kit.channels.open_channel`):
    every process but the file service."""

    rpc_timeout_seconds: float = Field(default=30.0, gt=0, le=86400)
    """Default deadline of every outgoing unary gRPC call."""


class FileServiceAddress(CallerSettings):
    """Where a process that calls the file service finds it (gateway, image processing, inference, queue)."""

    file_service_address: str = "localhost:50051"
    """host:port of the file service."""


class ImageServiceAddress(CallerSettings):
    """Where a process that calls the image processing service finds it (gateway)."""

    image_service_address: str = "localhost:50052"
    """host:port of the image processing service."""


class InferenceServiceAddress(CallerSettings):
    """Where a process that calls the inference service finds it (gateway, image processing, queue)."""

    inference_service_address: str = "localhost:50053"
    """host:port of the inference service."""


class QueueServiceAddress(CallerSettings):
    """Where a process that calls the queue service finds it (gateway)."""

    queue_service_address: str = "localhost:50054"
    """host:port of the queue service."""


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


class WorkerSettings(BrokerSettings, ServerSettings):
    """Settings of a service that also runs a job worker (image processing, inference)."""

    job_concurrency: int = Field(default=4, ge=0, le=256)
    """Jobs this process runs at once from its queue; 0 turns the worker off (the service still serves)."""

    job_attempt_seconds: float = Field(default=600.0, gt=0, le=86_400)
    """Longest one attempt of a job may run before it is stopped and counted a SYSTEM error (retried with
    backoff until its attempts are spent): a hung attempt would otherwise hold its job RUNNING for ever."""


class MeshSettings(
    WorkerSettings,
    BlobSettings,
    DeviceSettings,
    FileServiceAddress,
    ImageServiceAddress,
    InferenceServiceAddress,
    QueueServiceAddress,
):
    """Every setting of the kit at once, for the tools that work on the whole mesh from one environment:
    ``mesh.tools.up`` (which prepares the database, RabbitMQ and the blob store, and names a bad value before
    any process starts), the load tool and the soak (which dial every service)."""


def json_list(value: object) -> object:
    """Before-validator of a list setting read undecoded (``Annotated[list[...], NoDecode,
    BeforeValidator(json_list)]``): a value that is not JSON (``a,b``) is a validation error naming its
    variable and the expected form, where pydantic-settings' own decoding raised a SettingsError traceback."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ValueError('not a JSON list: write it as ["first", "second"]') from None


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def mesh_settings_classes() -> list[type[CommonSettings]]:
    """The settings class of each service of the mesh: those defined in ``mesh.services.<name>.settings``,
    found by walking the package, so that a new service's settings are known without a list to update."""
    import mesh.services  # here, not at the top: the services import the kit

    classes: list[type[CommonSettings]] = []
    for package in sorted(pkgutil.iter_modules(mesh.services.__path__), key=lambda m: m.name):
        name = f"mesh.services.{package.name}.settings"
        if not package.ispkg or importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        classes += [
            value
            for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, CommonSettings) and value.__module__ == name
        ]
    return classes


def variable_names(cls: type[BaseSettings], field: str) -> list[str]:
    """The environment variables of a field, its name first and then its deprecated names (AliasChoices)."""
    alias = cls.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice).upper() for choice in alias.choices]
    return [f"{ENV_PREFIX}{field.upper()}"]


def settings_warnings(environ: Mapping[str, str]) -> list[str]:
    """A line for each ``MESH_*`` variable of ``environ`` that no settings class of the mesh reads (with the
    closest name that one does) or that is a deprecated name of a setting."""
    known: set[str] = set(OTHER_VARIABLES)
    renamed: dict[str, str] = {}
    for cls in mesh_settings_classes():
        for field in cls.model_fields:
            name, *old_names = variable_names(cls, field)
            known.add(name)
            renamed.update(dict.fromkeys(old_names, name))
    lines = []
    for variable in sorted(v.upper() for v in environ):  # pydantic-settings reads names in any case
        if not variable.startswith(ENV_PREFIX) or variable.startswith(FOREIGN_PREFIXES):
            continue
        if variable in renamed:
            new = renamed[variable]
            lines.append(f"warning: {variable} is a deprecated name of {new}: rename it ({new} wins over it)")
        elif variable not in known:
            closest = difflib.get_close_matches(variable, known, n=1)
            hint = f"; did you mean {closest[0]}?" if closest else ""
            lines.append(f"warning: {variable} is not a setting of the mesh and is ignored{hint}")
    return lines


def format_validation_error(error: ValidationError) -> str:
    """One line per bad variable, naming the environment variable and what is wrong."""
    lines = ["invalid settings:"]
    for item in error.errors():
        if not item["loc"]:  # a rule across variables names them in its message
            lines.append(f"  {item['msg']}")
            continue
        field = str(item["loc"][0]).upper()
        # A field with AliasChoices is reported under its first alias, already the whole variable name.
        variable = field if field.startswith(ENV_PREFIX) else f"{ENV_PREFIX}{field}"
        value = item.get("input")
        lines.append(f"  {variable}={value!r}: {item['msg']}")
    return "\n".join(lines)


def format_settings_error(error: SettingsError) -> str:
    """pydantic-settings' error for a value it could not decode (a list or object setting that is not JSON)
    names the field only in its text."""
    found = re.search(r'field "(\w+)"', str(error))
    if found is None:
        return f"invalid settings:\n  {error}"
    variable = f"{ENV_PREFIX}{found[1].upper()}"
    value = next((v for k, v in os.environ.items() if k.upper() == variable), None)
    return (
        f"invalid settings:\n  {variable}={value!r}: not valid JSON (lists and objects are written as JSON)"
    )


def load_settings(cls: type[SettingsT]) -> SettingsT:
    """Read and validate ``cls`` from the environment, or exit with status 2 naming each bad variable.

    ``MESH_*`` variables that no setting reads are reported first, one warning line each, on stderr like the
    errors: logging is not configured yet, as its level and format are settings."""
    for line in settings_warnings(os.environ):
        print(line, file=sys.stderr)
    try:
        return cls()
    except ValidationError as error:
        print(format_validation_error(error), file=sys.stderr)
    except SettingsError as error:
        print(format_settings_error(error), file=sys.stderr)
    raise SystemExit(2)
