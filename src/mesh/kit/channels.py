"""The channel factory: deadlines on every call and service-config retries for UNAVAILABLE.

Every call but the long-lived streams named in ``streaming_methods`` gets the default deadline from settings
when its caller passes no ``timeout`` (a caller may pass a shorter or longer one). The deadline is set on
the call by an interceptor, not by the service config's ``timeout``: grpcio (1.85) started that one about
1.7 s early, so 3 s gave 1.3 s and the default 30 s gave 28. Transparent retries of UNAVAILABLE use gRPC's
own retry policy, not a loop of ours.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

import grpc
from grpc.aio import ClientCallDetails

from mesh.kit import tracing
from mesh.kit.client_spans import (
    StreamStreamInterceptor,
    StreamUnaryInterceptor,
    UnaryStreamInterceptor,
    UnaryUnaryInterceptor,
)
from mesh.kit.runtime import KEEPALIVE_OPTIONS, message_limit_options
from mesh.kit.settings import MAX_MESSAGE_BYTES, CallerSettings
from mesh.kit.tls import channel_credentials

RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(service: str) -> str:
    """The JSON service config for one gRPC service: the retry policy for every method."""
    return json.dumps({"methodConfig": [{"name": [{"service": service}], "retryPolicy": RETRY_POLICY}]})


class _DefaultDeadline:
    """Sets ``timeout`` on a call that has none, unless its method is one of the long-lived streams."""

    def __init__(self, timeout: float, service: str, streaming_methods: Sequence[str]) -> None:
        self._timeout = timeout
        self._exempt = {f"/{service}/{m}" for m in streaming_methods}

    def _details(self, details: ClientCallDetails) -> ClientCallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        if details.timeout is not None or method in self._exempt:
            return details
        return ClientCallDetails(
            details.method, self._timeout, details.metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: ClientCallDetails, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(
        self, continuation: Any, details: ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(
        self, continuation: Any, details: ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(
        self, continuation: Any, details: ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)


class _UnaryUnaryDeadline(_DefaultDeadline, UnaryUnaryInterceptor):
    pass


class _UnaryStreamDeadline(_DefaultDeadline, UnaryStreamInterceptor):
    pass


class _StreamUnaryDeadline(_DefaultDeadline, StreamUnaryInterceptor):
    pass


class _StreamStreamDeadline(_DefaultDeadline, StreamStreamInterceptor):
    pass


def default_deadlines(
    timeout: float, service: str, streaming_methods: Sequence[str] = ()
) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors giving every call of ``service`` but ``streaming_methods`` a ``timeout`` when it has none."""
    kinds = (_UnaryUnaryDeadline, _UnaryStreamDeadline, _StreamUnaryDeadline, _StreamStreamDeadline)
    return [cast(grpc.aio.ClientInterceptor, kind(timeout, service, streaming_methods)) for kind in kinds]


def open_channel(
    target: str,
    settings: CallerSettings,
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
        ("grpc.service_config", service_config(service)),
    ]
    interceptors = [
        *default_deadlines(settings.rpc_timeout_seconds, service, streaming_methods),
        *tracing.client_interceptors(),
    ]
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
