"""Each service's settings class holds the settings its process reads, and no other: a variable set for a
process that does not read it is then named by the unknown-variable checks (``make k8s-check``), and the class
says what the process depends on. Every class inherited RabbitMQ, the blob store, the device and every service
address from ``CommonSettings`` before."""

from __future__ import annotations

import os

import pytest

from mesh.kit.settings import CommonSettings, load_settings, settings_warnings
from mesh.services.file.settings import FileSettings
from mesh.services.gateway.settings import GatewaySettings
from mesh.services.image_processing.settings import ImageSettings
from mesh.services.inference.settings import InferenceSettings
from mesh.services.queue.settings import QueueSettings

BROKER = {"amqp_url", "queue_prefix", "delivery_limit"}
CALLS = {"rpc_timeout_seconds"}
FILE = {"file_service_address"}
IMAGE = {"image_service_address"}
INFERENCE = {"inference_service_address"}
QUEUE = {"queue_service_address"}
SOME_PROCESSES_READ = BROKER | CALLS | FILE | IMAGE | INFERENCE | QUEUE | {"blob_dir", "device"}


@pytest.fixture(autouse=True)
def _no_mesh_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the MESH_* variables it is about, and only those."""
    for name in os.environ:
        if name.upper().startswith("MESH_"):
            monkeypatch.delenv(name)


def test_every_process_reads_only_its_database_logs_and_tls_in_common() -> None:
    assert set(CommonSettings.model_fields) == {
        "database_url",
        "log_level",
        "log_format",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
    }


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        # Serves its blob store; calls nothing, uses no RabbitMQ queue and no device.
        (FileSettings, {"blob_dir"}),
        # Calls every service; no RabbitMQ, blob store or device of its own.
        (GatewaySettings, CALLS | FILE | IMAGE | INFERENCE | QUEUE),
        # A job worker on a device; fetches and stores images in the file service, a job's predictions in
        # inference.
        (ImageSettings, BROKER | {"device"} | CALLS | FILE | INFERENCE),
        # A job worker on a device; fetches the images a request names by id from the file service.
        (InferenceSettings, BROKER | {"device"} | CALLS | FILE),
        # Publishes the jobs; a submit asks the file and inference services whether its image and model exist.
        (QueueSettings, BROKER | CALLS | FILE | INFERENCE),
    ],
)
def test_each_service_has_the_shared_settings_its_process_reads(
    cls: type[CommonSettings], expected: set[str]
) -> None:
    assert set(cls.model_fields) & SOME_PROCESSES_READ == expected


def test_one_environment_for_the_whole_mesh_still_starts_each_service(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mesh.tools.up`` starts every process with one environment: a variable of another process is ignored
    by a class without it, and no warning is given for it, since some process of the mesh reads it."""
    for name, value in {
        "MESH_DEVICE": "cpu",
        "MESH_AMQP_URL": "amqp://guest:guest@rabbit:5672/%2F",
        "MESH_BLOB_DIR": "/var/lib/mesh/blobs",
        "MESH_QUEUE_SERVICE_ADDRESS": "queue:50054",
    }.items():
        monkeypatch.setenv(name, value)
    assert settings_warnings(os.environ) == []
    file_settings = load_settings(FileSettings)
    assert str(file_settings.blob_dir) == "/var/lib/mesh/blobs"
    assert not hasattr(file_settings, "device")
    assert load_settings(GatewaySettings).queue_service_address == "queue:50054"
    assert load_settings(InferenceSettings).device == "cpu"
    assert load_settings(QueueSettings).amqp_url == "amqp://guest:guest@rabbit:5672/%2F"
    assert capsys.readouterr().err == ""
