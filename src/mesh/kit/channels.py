"""The channel factory: deadlines on every call and service-config retries for UNAVAILABLE.

Unary methods get the default deadline from settings through the service config (a caller may pass a
shorter ``timeout``); long-lived streams named in ``streaming_methods`` get none. Transparent retries of
UNAVAILABLE use gRPC's own retry policy, not a loop of ours.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc

from mesh.kit import tracing
from mesh.kit.runtime import KEEPALIVE_OPTIONS, message_limit_options
from mesh.kit.settings import MAX_MESSAGE_BYTES, CommonSettings
from mesh.kit.tls import channel_credentials

RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def _duration(seconds: float) -> str:
    """A protobuf JSON duration: ``30s``, ``0.25s``; ``:g`` wrote ``1e+06s``, which gRPC refuses."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(service: str, timeout_seconds: float, streaming_methods: Sequence[str] = ()) -> str:
    """The JSON service config for one gRPC service."""
    configs: list[dict[str, object]] = [
        {"name": [{"service": service}], "timeout": _duration(timeout_seconds), "retryPolicy": RETRY_POLICY}
    ]
    if streaming_methods:
        configs.append({"name": [{"service": service, "method": m} for m in streaming_methods]})
    return json.dumps({"methodConfig": configs})


def open_channel(
    target: str,
    settings: CommonSettings,
    *,
    service: str,
    streaming_methods: Sequence[str] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> grpc.aio.Channel:
    """An instrumented channel to ``service`` at ``target`` (TLS when settings name a CA)."""
    options = [
        *message_limit_options(max_message_bytes),
        *[o for o in KEEPALIVE_OPTIONS if o[0] in ("grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms")],
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(service, settings.rpc_timeout_seconds, streaming_methods)),
    ]
    interceptors = tracing.client_interceptors()
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
