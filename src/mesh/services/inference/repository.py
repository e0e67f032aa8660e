"""The model repository: ``<dir>/<name>/<version>/config.yaml`` (or ``.yml`` / ``.json``), loaded at start.

Layout and rules (Triton's, simplified):

- ``<name>`` is the model's name and must equal the config's ``name``; ``<version>`` is a positive integer.
- The config names its ``implementation`` (see :mod:`.models`), describes inputs, outputs and request
  parameters (with defaults), and sets the batching limits of that version.
- ``default_version`` is ``latest`` (the highest ready version) or a version number; every version of a
  model that states it must agree.

A config that cannot be read or validated is a :class:`ModelConfigError` at start-up, naming the file and
the field. A version whose implementation fails to load or warm up stays in the repository, not ready,
with the reason, so that the other models still serve.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mesh.kit.cpus import usable_cpus
from mesh.kit.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from mesh.kit.logging import get_logger
from mesh.kit.text_fields import ascii_digits
from mesh.services.inference.batching import ModelScheduler
from mesh.services.inference.images import Pixels
from mesh.services.inference.models import DeviceName, Model, ModelFactory, Operation, default_factories
from mesh.services.inference.parameters import ParameterSpec, ResolvedParameters
from mesh.services.inference.stats import VersionStats
from mesh.services.inference.workers import WorkerModel

log = get_logger(__name__)

CONFIG_NAMES = ("config.yaml", "config.yml", "config.json")
LATEST = "latest"
MAX_INSTANCES = 64
# The longest version a request may name: far more digits than any version directory has.
MAX_VERSION_LENGTH = 64
# ``instance_count: auto`` stops here: every worker process holds its own copy of the model (110-160 MB for the
# strip reader, and a CUDA context on a GPU), and the server process that decodes and feeds them needs cores too.
AUTO_INSTANCES = 8

# The largest image the service takes by default (40 M pixels, RGBA) is 153 MiB decoded, and a request's peak is
# about six times its image (the decoder's buffers, the copy shared with a worker process, the model's arrays): 8
# concurrent such PNGs took the service from 0.3 to 4.9 GB with no bound, and to 1.5 GB with this one; rounds of
# mixed 9-36 Mpx PNGs to 2.1 GB (mesh.kit.memory), inside the deployment's 3.5 GiB limit
# (deploy/k8s/base/inference.yaml, which `make k8s-check` holds to this budget).
DEFAULT_IMAGE_MEMORY_MB = 256

# Only requests with equal keys share a batch: the same operation with the same parameters.
BatchKey: TypeAlias = tuple[Operation, ResolvedParameters]


class ModelConfigError(Exception):
    """The model repository cannot be used as it is on disk."""


@dataclass(frozen=True)
class ModelFields:
    """What a request calls its fields that name a model and a version: the errors of a lookup name them."""

    name: str
    version: str


PREDICT_FIELDS = ModelFields("model_name", "model_version")
"""PredictRequest's (and so a job's)."""
LOOKUP_FIELDS = ModelFields("name", "version")
"""GetModelMetadataRequest's, ModelReadyRequest's and GetModelStatisticsRequest's."""


class TensorConfig(BaseModel):
    """One input or output of a model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    """Name."""

    datatype: str = Field(min_length=1)
    """Data type ("image", "StripReading", "float", ...)."""

    shape: tuple[int, ...] = ()
    """Shape; -1 for variable dimensions."""

    description: str = ""
    """What it holds."""


class ModelConfig(BaseModel):
    """One model version's ``config.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    """The model's name; equals its directory's name."""

    implementation: str = Field(min_length=1)
    """The implementation that serves it (a key of :func:`~.models.default_factories`)."""

    description: str = ""
    """What the model does."""

    inputs: tuple[TensorConfig, ...] = Field(min_length=1)
    """Inputs."""

    outputs: tuple[TensorConfig, ...] = Field(min_length=1)
    """Outputs."""

    parameters: dict[str, ParameterSpec] = Field(default_factory=dict)
    """Parameters a request may set, with their types and defaults."""

    max_batch_size: int = Field(default=8, ge=1, le=1024)
    """Largest dynamic batch."""

    max_queue_delay_ms: float = Field(default=2.0, ge=0, le=60_000)
    """How long the oldest queued request may wait for others to join its batch."""

    max_queue_size: int = Field(default=256, ge=1)
    """Requests that may wait for a batch (in all of the version's batch queues together), and for memory, before
    new ones get RESOURCE_EXHAUSTED."""

    max_image_memory_mb: int = Field(default=DEFAULT_IMAGE_MEMORY_MB, ge=1)
    """MiB of decoded images the version's requests may hold at once, from decoding until their batch is done.
    A request whose image does not fit waits (within its deadline); an image larger than all of it is refused."""

    instance_count: int | Literal["auto"] = Field(default=1)
    """Batches computed concurrently; ``auto``: one per core this process may use (its container's quota), at most
    AUTO_INSTANCES."""

    instance_kind: Literal["thread", "process"] = "thread"
    """Where an instance computes: a thread of the server, or a worker process with its own copy of the model
    (for a model bound by Python, whose threads would take turns on the GIL); see :mod:`.workers`."""

    default_version: str = LATEST
    """``latest`` (the highest ready version) or a version number."""

    options: dict[str, Any] = Field(default_factory=dict)
    """Implementation-specific settings."""

    @field_validator("instance_count")
    @classmethod
    def _count(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= MAX_INSTANCES:
            raise ValueError(f"must be 'auto' or 1 to {MAX_INSTANCES}")
        return value

    def instances(self) -> int:
        """``instance_count`` as a number: ``auto`` is the cores this process may use, at most AUTO_INSTANCES."""
        if self.instance_count == "auto":
            return min(AUTO_INSTANCES, usable_cpus())
        return self.instance_count

    @field_validator("default_version")
    @classmethod
    def _policy(cls, value: str) -> str:
        if value != LATEST and not (ascii_digits(value) and int(value) > 0):
            raise ValueError("must be 'latest' or a positive version number")
        return value


VersionState = Literal["LOADING", "READY", "UNAVAILABLE"]


@dataclass
class ModelVersion:
    """One version of a model: its config, the loaded model, its batching and its statistics."""

    name: str
    version: str
    config: ModelConfig
    directory: Path
    state: VersionState = "LOADING"
    reason: str = "not loaded yet"
    model: Model | None = None
    scheduler: ModelScheduler[BatchKey, Pixels, object] | None = None
    instances: int = 0
    """Batches it computes at once: ``config.instance_count`` resolved once, at load (0 before)."""
    stats: VersionStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = VersionStats(self.name, self.version)

    @property
    def ready(self) -> bool:
        """True when it can serve: loaded, and its model has no fault (see :meth:`Model.fault`)."""
        return self.status()[0] == "READY"

    def status(self) -> tuple[VersionState, str]:
        """The state and its reason as clients and health see them: a loaded model with a fault (its worker
        processes no longer start) is UNAVAILABLE, with that fault as the reason, until it recovers."""
        fault = None if self.model is None or self.state != "READY" else self.model.fault()
        if fault is not None:
            return "UNAVAILABLE", fault
        return self.state, self.reason

    def require_ready(self) -> tuple[Model, ModelScheduler[BatchKey, Pixels, object]]:
        """The model and scheduler, or UNAVAILABLE with the reason."""
        if self.state != "READY" or self.model is None or self.scheduler is None:
            raise Unavailable(
                f"model {self.name} version {self.version} is not ready: {self.reason}",
                metadata={"model": self.name, "version": self.version},
            )
        return self.model, self.scheduler


@dataclass
class ModelEntry:
    """A model and its versions (ascending)."""

    name: str
    versions: dict[str, ModelVersion]
    default_policy: str

    @property
    def description(self) -> str:
        """The description of the default version."""
        return self.default().config.description

    def default(self) -> ModelVersion:
        """The version used when a request names none."""
        if self.default_policy != LATEST:
            return self.versions[self.default_policy]
        return self.latest()

    def latest(self) -> ModelVersion:
        """The highest ready version (the highest of all when none is ready)."""
        ready = [v for v in self.versions.values() if v.ready]
        return (ready or list(self.versions.values()))[-1]


def read_config(path: Path) -> ModelConfig:
    """Parse and validate one config file; ModelConfigError names the file and every bad field."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ModelConfigError(f"{path}: cannot be read: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path}: must hold a mapping of settings")
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise ModelConfigError(f"{path}: {problems}") from None


def _config_file(directory: Path) -> Path:
    found = [directory / name for name in CONFIG_NAMES if (directory / name).is_file()]
    if len(found) != 1:
        what = "no config file" if not found else f"several config files ({', '.join(p.name for p in found)})"
        raise ModelConfigError(f"{directory}: {what}; expected exactly one of {', '.join(CONFIG_NAMES)}")
    return found[0]


def scan(directory: Path, factories: Mapping[str, ModelFactory]) -> dict[str, ModelEntry]:
    """Read every model and version under ``directory`` (nothing is loaded yet)."""
    if not directory.is_dir():
        raise ModelConfigError(f"model repository {directory} is not a directory (set MESH_MODEL_DIR)")
    entries: dict[str, ModelEntry] = {}
    for model_dir in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions: dict[str, ModelVersion] = {}
        version_dirs = [p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        for version_dir in version_dirs:
            if not (ascii_digits(version_dir.name) and int(version_dir.name) > 0):
                raise ModelConfigError(f"{version_dir}: a version directory must be a positive integer")
        for version_dir in sorted(version_dirs, key=lambda p: (int(p.name), p.name)):
            version = str(int(version_dir.name))
            same = versions.get(version)
            if same is not None:
                # Keeping either would serve one config and ignore the other without a word.
                raise ModelConfigError(
                    f"{model_dir}: directories {same.directory.name!r} and {version_dir.name!r} are both "
                    f"version {version}; keep one"
                )
            config = read_config(_config_file(version_dir))
            if config.name != model_dir.name:
                raise ModelConfigError(
                    f"{version_dir}: config name {config.name!r} differs from its directory {model_dir.name!r}"
                )
            if config.implementation not in factories:
                known = ", ".join(sorted(factories))
                raise ModelConfigError(
                    f"{version_dir}: unknown implementation {config.implementation!r}; known: {known}"
                )
            versions[version] = ModelVersion(model_dir.name, version, config, version_dir)
        if not versions:
            raise ModelConfigError(f"{model_dir}: no versions (expected {model_dir}/1/config.yaml)")
        entries[model_dir.name] = ModelEntry(model_dir.name, versions, _default_policy(model_dir, versions))
    if not entries:
        raise ModelConfigError(f"model repository {directory} holds no models")
    return entries


def _default_policy(model_dir: Path, versions: Mapping[str, ModelVersion]) -> str:
    stated = {
        v.config.default_version for v in versions.values() if "default_version" in v.config.model_fields_set
    }
    if len(stated) > 1:
        raise ModelConfigError(
            f"{model_dir}: versions disagree on default_version: {', '.join(sorted(stated))}"
        )
    policy = stated.pop() if stated else LATEST
    if policy != LATEST and policy not in versions:
        raise ModelConfigError(f"{model_dir}: default_version {policy} does not exist")
    return policy


class ModelRepository:
    """Every model and version of a directory; loads them and resolves requests to versions."""

    def __init__(
        self,
        directory: Path,
        *,
        device: DeviceName = "cpu",
        factories: Mapping[str, ModelFactory] | None = None,
    ) -> None:
        self.directory = directory
        self.device: DeviceName = device
        self._factories = dict(default_factories() if factories is None else factories)
        self._entries = scan(directory, self._factories)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def versions(self) -> Iterator[ModelVersion]:
        """Every version of every model."""
        for entry in self._entries.values():
            yield from entry.versions.values()

    @property
    def computes_here(self) -> bool:
        """True when some version computes in this process rather than in worker processes."""
        return any(v.config.instance_kind == "thread" for v in self.versions())

    @property
    def any_ready(self) -> bool:
        """True when at least one version can serve."""
        return any(v.ready for v in self.versions())

    async def load(self) -> None:
        """Load and warm up every version, one at a time, off the event loop."""
        for version in self.versions():
            await self._load(version)

    async def _load(self, version: ModelVersion) -> None:
        config = version.config
        started = time.perf_counter()
        # Resolved once: the scheduler's slots and the worker processes must agree, and metadata reads it often.
        version.instances = config.instances()
        try:
            model = await asyncio.to_thread(self._build, version)
        except Exception as exc:
            version.state, version.reason = "UNAVAILABLE", f"load failed: {type(exc).__name__}: {exc}"
            version.stats.set_ready(False)
            log.error("model load failed", model=version.name, version=version.version, reason=version.reason)
            return

        def run(key: BatchKey, images: Sequence[Pixels]) -> Sequence[object]:
            operation, parameters = key
            return model.run_batch(operation, parameters, images)

        version.model = model
        version.scheduler = ModelScheduler(
            run,
            max_batch_size=config.max_batch_size,
            max_queue_delay_seconds=config.max_queue_delay_ms / 1000.0,
            max_queue_size=config.max_queue_size,
            instance_count=version.instances,
            max_image_bytes=config.max_image_memory_mb * 2**20,
            observer=version.stats,
            name=f"{version.name}-v{version.version}",
        )
        version.state, version.reason = "READY", "ready"
        version.stats.track_ready(lambda: version.ready)
        log.info(
            "model ready",
            model=version.name,
            version=version.version,
            device=model.device,
            instances=version.instances,
            instance_kind=config.instance_kind,
            seconds=round(time.perf_counter() - started, 3),
        )

    def _build(self, version: ModelVersion) -> Model:
        config = version.config
        factory = self._factories[config.implementation]
        if config.instance_kind == "process":
            return WorkerModel(factory, config, self.device, version.instances)
        model = factory(config, self.device)
        try:
            model.warm_up()
        except BaseException:
            model.close()
            raise
        return model

    async def close(self) -> None:
        """Stop every version's batching (queued requests get UNAVAILABLE)."""
        for version in self.versions():
            if version.scheduler is not None:
                await version.scheduler.close()
            if version.model is not None:
                await asyncio.to_thread(version.model.close)
            version.state, version.reason = "UNAVAILABLE", "unloaded"
            version.stats.set_ready(False)

    def entry(self, name: str, *, fields: ModelFields = PREDICT_FIELDS) -> ModelEntry:
        """A model by name; InvalidArgument when ``name`` is empty and NotFound when there is no such model, both
        listing the models there are and naming ``fields.name``, the request's field."""
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self._entries)
            violations = [FieldViolation(fields.name, f"one of: {known}")]
            if not name:
                raise InvalidArgument(
                    f"{fields.name} is required; models: {known}", field_violations=violations
                )
            raise NotFound(
                f"model {name!r} does not exist; models: {known}",
                field_violations=violations,
                metadata={"model": name},
            )
        return entry

    def get(self, name: str, version: str = "", *, fields: ModelFields = PREDICT_FIELDS) -> ModelVersion:
        """A version of a model (the default one when ``version`` is empty); InvalidArgument refuses an empty
        name or a version longer than MAX_VERSION_LENGTH, NotFound lists what exists, each naming the request's
        field (``fields``)."""
        entry = self.entry(name, fields=fields)
        if not version:
            return entry.default()
        if version == LATEST:  # the word the config's default_version uses; a client may well send it
            return entry.latest()
        known = ", ".join(entry.versions)
        # A longer one would be echoed into the error past gRPC's metadata limit (and int() refuses more than
        # 4300 digits): both were a failure of ours where the client had sent a bad version.
        if len(version) > MAX_VERSION_LENGTH:
            raise InvalidArgument(
                f"model {name!r}: a version has at most {MAX_VERSION_LENGTH} characters; versions: {known}",
                field_violations=[FieldViolation(fields.version, f"one of: {known}")],
                metadata={"model": name},
            )
        key = str(int(version)) if ascii_digits(version) else version
        found = entry.versions.get(key)
        if found is None:
            raise NotFound(
                f"model {name!r} has no version {version!r}; versions: {known}",
                field_violations=[FieldViolation(fields.version, f"one of: {known}")],
                metadata={"model": name, "version": version},
            )
        return found
