"""load_settings: every bad value exits 2 naming its variable, and unread MESH_* variables are warned of."""

from __future__ import annotations

import os

import pytest

from mesh.kit.settings import CommonSettings, ServerSettings, load_settings, mesh_settings_classes
from mesh.services.file.settings import FileSettings
from mesh.services.gateway.settings import GatewaySettings
from mesh.services.image_processing.settings import ImageSettings
from mesh.services.inference.settings import InferenceSettings


@pytest.fixture(autouse=True)
def _no_mesh_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the MESH_* variables it is about, and only those."""
    for name in os.environ:
        if name.upper().startswith("MESH_"):
            monkeypatch.delenv(name)


def _refused(cls: type[CommonSettings], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        load_settings(cls)
    assert stopped.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MESH_CORS_ORIGINS", "https://app.example.com"),
        ("MESH_CORS_ORIGINS", "https://a.example,https://b.example"),
        ("MESH_REQUIRED_SERVICES", "file,queue"),
    ],
)
def test_a_list_setting_that_is_not_json_exits_naming_the_variable_and_the_form(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A comma list or a bare URL for a list setting raised pydantic-settings' SettingsError, a traceback
    naming no variable (exit 1); it is a settings error like any other: exit 2, the variable, the JSON form."""
    monkeypatch.setenv(variable, value)
    err = _refused(GatewaySettings, capsys)
    assert f"{variable}={value!r}" in err
    assert "not a JSON list" in err
    assert "Traceback" not in err


def test_json_lists_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_CORS_ORIGINS", '["https://a.example", "https://b.example"]')
    monkeypatch.setenv("MESH_REQUIRED_SERVICES", '["file", "queue"]')
    settings = load_settings(GatewaySettings)
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.required_services == ["file", "queue"]


def test_an_unknown_required_service_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``["files"]`` was taken, and the file service silently dropped out of readiness."""
    monkeypatch.setenv("MESH_REQUIRED_SERVICES", '["files"]')
    err = _refused(GatewaySettings, capsys)
    assert "MESH_REQUIRED_SERVICES='files'" in err
    assert "'file', 'image', 'inference' or 'queue'" in err


@pytest.mark.parametrize("value", ["lots", "10/second;600/minute"])
def test_a_rate_limit_the_gateway_cannot_apply_is_refused_at_start(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lots`` passed the settings and the gateway then died in its wiring with a traceback; a second limit
    (``;600/minute``) was dropped without a word by the one-limit rate limiter."""
    monkeypatch.setenv("MESH_RATE_LIMIT", value)
    assert f"MESH_RATE_LIMIT={value!r}" in _refused(GatewaySettings, capsys)
    monkeypatch.setenv("MESH_RATE_LIMIT", "10/second")
    assert load_settings(GatewaySettings).rate_limit == "10/second"


class _WithAnObject(CommonSettings):
    labels: dict[str, str] = {}
    """A setting pydantic-settings decodes as JSON itself."""


def test_any_value_pydantic_settings_cannot_decode_exits_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """load_settings caught only ValidationError: pydantic-settings' SettingsError (a list or object setting
    that is not JSON) escaped as a traceback with exit 1."""
    monkeypatch.setenv("MESH_LABELS", "team=x")
    err = _refused(_WithAnObject, capsys)
    assert "MESH_LABELS='team=x': not valid JSON" in err


def test_misspelt_variables_are_warned_of_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``MESH_GRACE_SECOND`` and ``MESH_JOB_CONCURENCY`` were ignored without a word (``extra="ignore"``):
    each gets one warning naming the setting meant. A setting of another service, the mesh's own non-setting
    variables, the tests' ``MESH_TEST_*`` and a name in lower case (pydantic-settings reads it) get none."""
    for name, value in {
        "MESH_GRACE_SECOND": "30",
        "MESH_JOB_CONCURENCY": "1",
        "MESH_RATE_LIMIT": "5/second",
        "MESH_SUPERVISOR_PID": "1",
        "MESH_QUEUE_RELAY_SETTINGS": "{}",
        "MESH_TEST_AMQP_URL": "amqp://x",
        "mesh_log_level": "debug",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(ServerSettings)
    assert settings.log_level == "debug"
    assert capsys.readouterr().err.splitlines() == [
        "warning: MESH_GRACE_SECOND is not a setting of the mesh and is ignored; did you mean MESH_GRACE_SECONDS?",
        "warning: MESH_JOB_CONCURENCY is not a setting of the mesh and is ignored; "
        "did you mean MESH_JOB_CONCURRENCY?",
    ]


def test_every_service_reads_one_pixel_limit_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file and inference services read MESH_MAX_IMAGE_PIXELS and the image service MESH_IMAGE_MAX_PIXELS:
    raising the first let uploads in that the image service then refused. One variable now sets all three."""
    monkeypatch.setenv("MESH_MAX_IMAGE_PIXELS", "123456")
    limits = {
        "file": FileSettings().max_image_pixels,
        "image": ImageSettings().max_image_pixels,
        "inference": InferenceSettings().max_image_pixels,
    }
    assert limits == {"file": 123456, "image": 123456, "inference": 123456}


def test_the_image_service_s_old_pixel_variable_still_works_with_a_deprecation_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """MESH_IMAGE_MAX_PIXELS is still read, with a warning naming the new name, which wins when both are set; a
    bad value under the old name is reported under the new one (not ``MESH_MESH_...``)."""
    monkeypatch.setenv("MESH_IMAGE_MAX_PIXELS", "99")
    assert load_settings(ImageSettings).max_image_pixels == 99
    assert capsys.readouterr().err.splitlines() == [
        "warning: MESH_IMAGE_MAX_PIXELS is a deprecated name of MESH_MAX_IMAGE_PIXELS: rename it "
        "(MESH_MAX_IMAGE_PIXELS wins over it)"
    ]
    monkeypatch.setenv("MESH_MAX_IMAGE_PIXELS", "1000")
    assert load_settings(ImageSettings).max_image_pixels == 1000
    monkeypatch.delenv("MESH_MAX_IMAGE_PIXELS")
    monkeypatch.setenv("MESH_IMAGE_MAX_PIXELS", "many")
    assert "  MESH_MAX_IMAGE_PIXELS='many': Input should be a valid integer" in _refused(
        ImageSettings, capsys
    )
    assert ImageSettings(max_image_pixels=5).max_image_pixels == 5  # code still sets it by its field name


def test_the_settings_classes_of_every_service_are_found() -> None:
    """The unknown-variable warning and the README's tables know a setting only through this discovery."""
    names = {cls.__name__ for cls in mesh_settings_classes()}
    assert names == {"FileSettings", "GatewaySettings", "ImageSettings", "InferenceSettings", "QueueSettings"}
