"""Who is calling: API keys (hashed in PostgreSQL) and JWT bearer tokens (PyJWT), or nobody when auth is off.

``MESH_AUTH_MODE``: ``off`` lets every request in (local use; callers are told apart by IP for rate limits),
``api_key`` wants ``X-API-Key``, ``jwt`` wants ``Authorization: Bearer <token>`` (issuer, audience and expiry
checked), ``any`` takes either. Browsers' EventSource cannot set headers, so the job event stream also accepts
``?api_key=`` or ``?access_token=``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import jwt
from starlette.requests import Request

from mesh.kit import errors
from mesh.services.gateway.settings import GatewaySettings

API_KEY_HEADER = "X-API-Key"
HMAC_ALGORITHMS = ["HS256"]
PUBLIC_KEY_ALGORITHMS = ["RS256", "ES256", "EdDSA"]


class KeyLookup(Protocol):
    """Finds the id of an active API key."""

    async def lookup(self, key: str) -> str | None:
        """The key's id, or None when unknown or revoked."""
        ...


@dataclass(frozen=True)
class Principal:
    """The caller: an API key, a token subject or (auth off) a client address."""

    kind: str
    id: str

    @property
    def rate_key(self) -> str:
        """The identity rate limits count against."""
        return f"{self.kind}:{self.id}"


class Authenticator:
    """Checks a request's credentials according to the auth mode."""

    def __init__(self, settings: GatewaySettings, keys: KeyLookup | None) -> None:
        self.mode = settings.auth_mode
        self._keys = keys
        self._settings = settings
        if self.mode in ("api_key", "any") and keys is None:
            raise ValueError(f"auth mode {self.mode} needs the API key store")
        if self.mode in ("jwt", "any") and not (settings.jwt_secret or settings.jwt_public_key):
            raise ValueError(f"auth mode {self.mode} needs MESH_JWT_SECRET or MESH_JWT_PUBLIC_KEY")

    def describe(self) -> str:
        """A line for the start-up log."""
        if self.mode == "off":
            return "authentication is OFF: every caller is let in (set MESH_AUTH_MODE=api_key|jwt|any)"
        return f"authentication: {self.mode}"

    async def authenticate(self, request: Request) -> Principal:
        """The caller, or :class:`~mesh.kit.errors.Unauthenticated`."""
        if self.mode == "off":
            return Principal("ip", request.client.host if request.client else "unknown")
        api_key = request.headers.get(API_KEY_HEADER)
        token = None
        authorization = request.headers.get("authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            token = credentials.strip()
        if api_key is None and token is None and request.url.path.endswith("/events"):
            api_key = request.query_params.get("api_key")
            token = request.query_params.get("access_token")
        if api_key is not None and self.mode in ("api_key", "any"):
            return await self._check_key(api_key)
        if token is not None and self.mode in ("jwt", "any"):
            return self._check_token(token)
        wanted = {"api_key": f"an {API_KEY_HEADER} header", "jwt": "a Bearer token"}.get(
            self.mode, f"an {API_KEY_HEADER} header or a Bearer token"
        )
        raise errors.Unauthenticated(f"this API needs {wanted}", reason="CREDENTIALS_MISSING")

    async def _check_key(self, key: str) -> Principal:
        assert self._keys is not None
        key_id = await self._keys.lookup(key)
        if key_id is None:
            raise errors.Unauthenticated("the API key is unknown or revoked", reason="API_KEY_INVALID")
        return Principal("key", key_id)

    def _check_token(self, token: str) -> Principal:
        settings = self._settings
        if settings.jwt_public_key:
            key, algorithms = settings.jwt_public_key, PUBLIC_KEY_ALGORITHMS
        else:
            key, algorithms = settings.jwt_secret, HMAC_ALGORITHMS
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                leeway=settings.jwt_leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise errors.Unauthenticated("the token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidTokenError as error:
            raise errors.Unauthenticated(f"the token is not valid: {error}", reason="TOKEN_INVALID") from None
        return Principal("sub", str(claims["sub"]))
