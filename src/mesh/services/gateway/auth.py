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
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from starlette.requests import Request

from mesh.kit import errors
from mesh.services.gateway.settings import GatewaySettings

API_KEY_HEADER = "X-API-Key"
API_KEY_QUERY = "api_key"
ACCESS_TOKEN_QUERY = "access_token"
HMAC_ALGORITHMS = ["HS256"]
# The one algorithm a public key of each kind verifies: a token whose header names another (ES256 against an
# RSA key) is invalid, never tried with a key of the wrong kind.
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def public_key_algorithm(pem: str) -> tuple[PublicKey, list[str]]:
    """The public key in ``pem`` and the algorithm its tokens are signed with; ValueError when ``pem`` is not
    a PEM public key of a kind tokens are signed with (RSA, EC P-256/384/521, Ed25519)."""
    key = load_pem_public_key(pem.encode())
    if isinstance(key, rsa.RSAPublicKey):
        return key, ["RS256"]
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
        return key, [_EC_ALGORITHMS[key.curve.name]]
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key, ["EdDSA"]
    raise ValueError(
        f"MESH_JWT_PUBLIC_KEY holds a {type(key).__name__}; use an RSA, EC or Ed25519 public key"
    )


def takes_query_credentials(path: str) -> bool:
    """Whether the route at ``path`` also takes its credentials in the query: the job event stream, which a
    browser's EventSource opens without headers."""
    return path.endswith("/events")


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
        # Read once, at start: a key that cannot be read stops the gateway instead of failing every token.
        self._token_key: PublicKey | str
        self._token_key, self._algorithms = (
            public_key_algorithm(settings.jwt_public_key)
            if settings.jwt_public_key
            else (settings.jwt_secret, HMAC_ALGORITHMS)
        )

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
        in_query = takes_query_credentials(request.url.path)
        if api_key is None and token is None and in_query:
            api_key = request.query_params.get(API_KEY_QUERY)
            token = request.query_params.get(ACCESS_TOKEN_QUERY)
        if api_key is not None and self.mode in ("api_key", "any"):
            return await self._check_key(api_key)
        if token is not None and self.mode in ("jwt", "any"):
            return self._check_token(token)
        wanted = {"api_key": f"an {API_KEY_HEADER} header", "jwt": "a Bearer token"}.get(
            self.mode, f"an {API_KEY_HEADER} header or a Bearer token"
        )
        if in_query:
            # Said here, as the headers are what an EventSource cannot send.
            wanted += {
                "api_key": f" (or ?{API_KEY_QUERY}=)",
                "jwt": f" (or ?{ACCESS_TOKEN_QUERY}=)",
            }.get(self.mode, f" (or ?{API_KEY_QUERY}= / ?{ACCESS_TOKEN_QUERY}=)")
        raise errors.Unauthenticated(f"this API needs {wanted}", reason="CREDENTIALS_MISSING")

    async def _check_key(self, key: str) -> Principal:
        assert self._keys is not None
        key_id = await self._keys.lookup(key)
        if key_id is None:
            raise errors.Unauthenticated("the API key is unknown or revoked", reason="API_KEY_INVALID")
        return Principal("key", key_id)

    def _check_token(self, token: str) -> Principal:
        settings = self._settings
        try:
            claims = jwt.decode(
                token,
                self._token_key,
                algorithms=self._algorithms,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                leeway=settings.jwt_leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise errors.Unauthenticated("the token has expired", reason="TOKEN_EXPIRED") from None
        except (
            jwt.PyJWTError
        ) as error:  # InvalidKeyError and the like are no InvalidTokenError, and were 500s
            raise errors.Unauthenticated(f"the token is not valid: {error}", reason="TOKEN_INVALID") from None
        return Principal("sub", str(claims["sub"]))
