"""The model repository: configs on disk, versions, default version, readiness and clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mesh.kit.devices import gpu_available, resolve_device
from mesh.kit.errors import InvalidArgument, NotFound, StartupError, Unavailable, exit_on_startup_error
from mesh.services.inference.repository import ModelConfigError, ModelRepository
from mesh.services.inference.server import inference_service
from mesh.services.inference.settings import InferenceSettings
from tests.inference.fakes import FakeFactory, fake_config, write_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def _repository(root: Path) -> ModelRepository:
    return ModelRepository(root, factories={"fake": FakeFactory()})


async def test_loads_models_and_versions(tmp_path: Path) -> None:
    """Every version directory is read, loaded and ready; versions sort numerically."""
    for version in (1, 2, 10):
        write_model(tmp_path, version=version)
    write_model(tmp_path, name="other")
    repository = _repository(tmp_path)
    await repository.load()
    entries = {entry.name: entry for entry in repository}
    assert list(entries) == ["fake", "other"]
    assert list(entries["fake"].versions) == ["1", "2", "10"]
    assert all(v.ready for v in repository.versions())
    assert repository.get("fake").version == "10"
    assert repository.get("fake", "2").config.max_batch_size == 4
    await repository.close()


async def test_unknown_model_or_version_is_not_found_listing_what_exists(tmp_path: Path) -> None:
    """NotFound names the models (or versions) that do exist."""
    write_model(tmp_path, version=1)
    write_model(tmp_path, version=2)
    repository = _repository(tmp_path)
    with pytest.raises(NotFound, match=r"models: fake"):
        repository.get("missing")
    with pytest.raises(NotFound, match=r"versions: 1, 2"):
        repository.get("fake", "7")
    with pytest.raises(NotFound, match=r"versions: 1, 2"):
        repository.get("fake", "²")  # a digit to isdigit(), not to int(): it was a 500


async def test_pinned_default_version(tmp_path: Path) -> None:
    """default_version pins the version used when a request names none."""
    write_model(tmp_path, version=1, default_version="1")
    write_model(tmp_path, version=2, default_version="1")
    repository = _repository(tmp_path)
    assert repository.get("fake").version == "1"
    # "latest", the word default_version uses, names the highest ready version (it was a 404).
    assert repository.get("fake", "latest").version == "2"


async def test_failed_load_leaves_version_not_ready_and_latest_falls_back(tmp_path: Path) -> None:
    """A version whose warm-up fails is UNAVAILABLE with the reason; "latest" falls back to a ready one."""
    write_model(tmp_path, version=1)
    write_model(tmp_path, version=2, options={"fail_warm_up": True})
    repository = _repository(tmp_path)
    await repository.load()
    broken = repository.get("fake", "2")
    assert not broken.ready
    assert "weights are corrupt" in broken.reason
    with pytest.raises(Unavailable, match="not ready"):
        broken.require_ready()
    assert repository.get("fake").version == "1"
    assert repository.get("fake", "latest").version == "1"
    assert repository.any_ready
    await repository.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_batch_size": 0}, r"max_batch_size: Input should be greater than or equal to 1"),
        ({"implementation": "nope"}, r"unknown implementation 'nope'; known: fake"),
        ({"surprise": 1}, r"surprise: Extra inputs are not permitted"),
        ({"default_version": "newest"}, r"default_version: Value error, must be 'latest'"),
        (
            {"parameters": {"threshold": {"type": "int", "default": "high"}}},
            r"parameters.threshold: Value error, default 'high': must be an int",
        ),
    ],
)
def test_bad_config_is_a_start_up_error_naming_file_and_field(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    """A config that does not validate stops start-up with the file and the field in the message."""
    write_model(tmp_path, **overrides)
    with pytest.raises(ModelConfigError, match=message) as info:
        _repository(tmp_path)
    assert "fake/1" in str(info.value)


def test_config_name_must_match_its_directory(tmp_path: Path) -> None:
    """A config copied into another model's directory is refused rather than served under two names."""
    write_model(tmp_path, name="fake")
    (tmp_path / "fake").rename(tmp_path / "copied")
    with pytest.raises(ModelConfigError, match=r"config name 'fake' differs from its directory 'copied'"):
        _repository(tmp_path)


def test_layout_errors(tmp_path: Path) -> None:
    """A missing directory, a non-numeric version, a missing config and an empty repository are refused."""
    with pytest.raises(ModelConfigError, match="is not a directory"):
        _repository(tmp_path / "absent")
    with pytest.raises(ModelConfigError, match="holds no models"):
        _repository(tmp_path)
    (tmp_path / "fake" / "v1").mkdir(parents=True)
    with pytest.raises(ModelConfigError, match="must be a positive integer"):
        _repository(tmp_path)
    (tmp_path / "fake" / "v1").rmdir()
    (tmp_path / "fake" / "1").mkdir()
    with pytest.raises(ModelConfigError, match="no config file"):
        _repository(tmp_path)
    (tmp_path / "fake" / "1" / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ModelConfigError, match="must hold a mapping"):
        _repository(tmp_path)


def test_two_directories_of_one_version_are_refused_naming_both(tmp_path: Path) -> None:
    """Directories ``1`` and ``01`` are both version 1: one of them was silently dropped (which one depended on the
    directory listing's order); now the start stops, naming both."""
    write_model(tmp_path, version="1", max_batch_size=1)
    write_model(tmp_path, version="01", max_batch_size=64)
    with pytest.raises(ModelConfigError, match=r"directories '01' and '1' are both version 1"):
        _repository(tmp_path)


def test_versions_must_agree_on_the_default(tmp_path: Path) -> None:
    """Two versions that state different default versions are a configuration error."""
    write_model(tmp_path, version=1, default_version="1")
    write_model(tmp_path, version=2, default_version="2")
    with pytest.raises(ModelConfigError, match="disagree on default_version"):
        _repository(tmp_path)


def test_shipped_repository_is_valid() -> None:
    """models/ in the repository parses: the strip reader is configured with its implementation."""
    repository = ModelRepository(REPO_ROOT / "models", factories={"strip_reader": FakeFactory()})
    version = repository.get("strip-reader")
    assert version.version == "1"
    assert version.config.implementation == "strip_reader"
    assert version.config.max_batch_size >= 2


def test_json_config_is_read(tmp_path: Path) -> None:
    """``config.json`` is as good as ``config.yaml``."""
    directory = tmp_path / "fake" / "3"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(fake_config(max_batch_size=32)))
    assert _repository(tmp_path).get("fake").config.max_batch_size == 32


async def test_bad_repository_stops_the_process_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m mesh.services.inference`` exits with status 2 and names the problem."""
    settings = InferenceSettings(model_dir=tmp_path / "absent", grpc_port=0, http_port=0)
    with pytest.raises(SystemExit) as info, exit_on_startup_error("inference"):
        async with inference_service(settings):
            pass
    assert info.value.code == 2
    assert "is not a directory (set MESH_MODEL_DIR)" in capsys.readouterr().err


def test_device_choice() -> None:
    """cpu is always cpu; auto follows CuPy; gpu without a GPU is a start-up error."""
    has_gpu = gpu_available()[0]
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("gpu" if has_gpu else "cpu")
    if not has_gpu:
        with pytest.raises(StartupError, match="MESH_DEVICE=gpu"):
            resolve_device("gpu")


async def test_a_gpu_asked_for_where_there_is_none_stops_the_start_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """MESH_DEVICE=gpu without a GPU ends ``python -m mesh.services.inference`` with exit status 2 and one
    line naming the setting and the way out, before any model loads."""
    if gpu_available()[0]:
        pytest.skip("this machine has a GPU")
    settings = InferenceSettings(model_dir=tmp_path, device="gpu", grpc_port=0, http_port=0)
    with pytest.raises(SystemExit) as info, exit_on_startup_error("inference"):
        async with inference_service(settings):
            pass
    assert info.value.code == 2
    line = capsys.readouterr().err
    assert line.startswith("inference: cannot start: MESH_DEVICE=gpu but ")
    assert line.endswith("set MESH_DEVICE=cpu or auto to run on the CPU\n")
    assert line.count("\n") == 1


async def test_an_overlong_version_is_invalid_not_a_crash(tmp_path: Path) -> None:
    """A version of more than 4300 digits made int() raise (a 500), and one echoed into NotFound overflowed gRPC's
    metadata limit: past MAX_VERSION_LENGTH it is InvalidArgument, which does not repeat it."""
    write_model(tmp_path, version=1)
    repository = _repository(tmp_path)
    for version in ("1" * 5000, "0" * 5000 + "1", "v" * 100_000):
        with pytest.raises(InvalidArgument) as info:
            repository.get("fake", version)
        assert info.value.message == "model 'fake': a version has at most 64 characters; versions: 1"
        assert info.value.field_violations[0].field == "model_version"
    assert repository.get("fake", "0" * 63 + "1").version == "1"
