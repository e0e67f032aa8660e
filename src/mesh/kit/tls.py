"""Optional TLS for gRPC servers and channels, from certificate paths in settings."""

from __future__ import annotations

import grpc

from mesh.kit.settings import CommonSettings


def server_credentials(settings: CommonSettings) -> grpc.ServerCredentials | None:
    """Server credentials when a certificate and key are configured; mutual TLS when a CA is too."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    chain = settings.tls_cert_file.read_bytes()
    key = settings.tls_key_file.read_bytes()
    root = settings.tls_ca_file.read_bytes() if settings.tls_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=root, require_client_auth=root is not None
    )


def channel_credentials(settings: CommonSettings) -> grpc.ChannelCredentials | None:
    """Channel credentials when a CA is configured (with a client certificate for mutual TLS)."""
    if settings.tls_ca_file is None:
        return None
    key = settings.tls_key_file.read_bytes() if settings.tls_key_file else None
    chain = settings.tls_cert_file.read_bytes() if settings.tls_cert_file else None
    return grpc.ssl_channel_credentials(settings.tls_ca_file.read_bytes(), key, chain)
