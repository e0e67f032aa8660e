"""Optional TLS: a server with a certificate from settings, a channel that trusts its CA."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from mesh.kit.channels import open_channel
from mesh.kit.runtime import ServiceRuntime
from mesh.kit.settings import CallerSettings, CommonSettings, ServerSettings


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for localhost, made with the openssl command line."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_server_and_channel(tmp_path: Path) -> None:
    """With certificate paths in settings the server speaks TLS; a channel trusting the CA gets through,
    and a plaintext channel does not."""
    cert, key = _self_signed(tmp_path)
    settings = ServerSettings(grpc_port=0, http_port=0, tls_cert_file=cert, tls_key_file=key, grace_seconds=1)
    runtime = ServiceRuntime("tls", settings, service_names=["test.v1.Tls"])
    task = asyncio.create_task(runtime.run())
    await asyncio.wait_for(runtime.started.wait(), 10)
    try:
        client_settings = CallerSettings(tls_ca_file=cert)
        channel = open_channel(
            f"localhost:{runtime.grpc_port}", client_settings, service="grpc.health.v1.Health"
        )
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        await channel.close(None)
        async with grpc.aio.insecure_channel(f"localhost:{runtime.grpc_port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=2)
    finally:
        runtime.stopping.set()
        await asyncio.wait_for(task, 10)


def test_a_certificate_without_its_key_is_refused_not_served_in_plaintext(tmp_path: Path) -> None:
    """MESH_TLS_CERT_FILE without MESH_TLS_KEY_FILE (or the reverse) is a settings error naming both; it
    served plaintext without a word before. An empty value means unset, and a path that is no file is an
    error naming it."""
    cert, key = _self_signed(tmp_path)
    with pytest.raises(ValidationError, match="go together"):
        ServerSettings(tls_cert_file=cert)
    with pytest.raises(ValidationError, match="go together"):
        ServerSettings(tls_key_file=key)
    assert CommonSettings.model_validate({"tls_ca_file": ""}).tls_ca_file is None
    with pytest.raises(ValidationError, match="is not a readable file"):
        CommonSettings(tls_ca_file=tmp_path)
    assert ServerSettings(tls_cert_file=cert, tls_key_file=key).tls_mode == "tls"
    assert ServerSettings(tls_cert_file=cert, tls_key_file=key, tls_ca_file=cert).tls_mode == "mtls"
    assert ServerSettings().tls_mode == "plaintext"
