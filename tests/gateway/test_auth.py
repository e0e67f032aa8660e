"""Authentication (off, API keys, JWT, either), open routes, CORS, and the key CLI on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mesh.kit.db import create_pool
from mesh.services.gateway.auth import public_key_algorithm
from mesh.services.gateway.key_store import KeyStore, hash_key
from tests.gateway.harness import GatewayFactory

SECRET = "test-secret-that-is-long-enough-for-hs256"
OPEN_ROUTES = ("/healthz", "/readyz", "/v1/health", "/metrics", "/openapi.json", "/docs", "/")


class MemoryKeys:
    """An in-memory key lookup for the auth-mode tests (the PostgreSQL store is tested below)."""

    def __init__(self, keys: dict[str, str]) -> None:
        self.hashes = {hash_key(k): key_id for k, key_id in keys.items()}

    async def lookup(self, key: str) -> str | None:
        return self.hashes.get(hash_key(key))


def token(**overrides: Any) -> str:
    """An HS256 token valid for the test gateway unless ``overrides`` break it."""
    claims: dict[str, Any] = {
        "sub": "alice",
        "iss": "mesh",
        "aud": "mesh-gateway",
        "exp": int(time.time()) + 300,
    }
    secret = overrides.pop("secret", SECRET)
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, secret, algorithm="HS256")


async def test_auth_is_off_by_default(client: httpx.AsyncClient) -> None:
    """With the default settings no credentials are needed."""
    assert (await client.get("/v1/models")).status_code == 200


async def test_api_key_mode(make_client: GatewayFactory) -> None:
    """api_key mode: no key or a wrong key is 401 with WWW-Authenticate; a known key passes."""
    client = await make_client(keys=MemoryKeys({"good-key": "k1"}), auth_mode="api_key")
    missing = await client.get("/v1/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "UNAUTHENTICATED"
    assert "www-authenticate" in missing.headers
    assert (await client.get("/v1/models", headers={"X-API-Key": "bad"})).status_code == 401
    assert (await client.get("/v1/models", headers={"X-API-Key": "good-key"})).status_code == 200
    bearer_only = await client.get("/v1/models", headers={"Authorization": f"Bearer {token()}"})
    assert bearer_only.status_code == 401


@pytest.mark.parametrize("mode", ["api_key", "jwt"])
async def test_open_routes_stay_open(make_client: GatewayFactory, mode: str) -> None:
    """Health, readiness, metrics, docs, the OpenAPI document and the page need no credentials."""
    client = await make_client(keys=MemoryKeys({}), auth_mode=mode, jwt_secret=SECRET)
    for path in OPEN_ROUTES:
        response = await client.get(path)
        assert response.status_code == 200, (path, response.status_code)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 3600}, "TOKEN_EXPIRED"),
        ({"aud": "someone-else"}, "TOKEN_INVALID"),
        ({"iss": "evil"}, "TOKEN_INVALID"),
        ({"secret": "another-secret-that-is-long-enough-xx"}, "TOKEN_INVALID"),
        ({"exp": None}, "TOKEN_INVALID"),
    ],
)
async def test_jwt_checks_issuer_audience_expiry_and_signature(
    make_client: GatewayFactory, claims: dict[str, Any], reason: str
) -> None:
    """jwt mode: an expired, foreign-audience, foreign-issuer, badly signed or exp-less token is 401."""
    client = await make_client(auth_mode="jwt", jwt_secret=SECRET)
    assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {token()}"})).status_code == 200
    response = await client.get("/v1/models", headers={"Authorization": f"Bearer {token(**claims)}"})
    assert response.status_code == 401
    assert response.json()["error"]["details"][0]["reason"] == reason


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.mark.parametrize(
    ("private", "algorithm"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    ],
    ids=["rsa", "ec", "ed25519"],
)
async def test_jwt_with_a_public_key_takes_tokens_signed_by_its_private_key(
    make_client: GatewayFactory,
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    algorithm: str,
) -> None:
    """MESH_JWT_PUBLIC_KEY: a token signed by the matching private key gets in (PyJWT had no cryptography to
    verify it with: every valid token was 401 "Algorithm not supported"); one whose header names another
    algorithm, or signed by another key, is 401, not a 500."""
    client = await make_client(auth_mode="jwt", jwt_public_key=_pem(private))
    claims = {"sub": "alice", "iss": "mesh", "aud": "mesh-gateway", "exp": int(time.time()) + 300}
    good = jwt.encode(claims, private, algorithm=algorithm)
    assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {good}"})).status_code == 200
    stranger = ec.generate_private_key(ec.SECP256R1())
    for forged in (jwt.encode(claims, stranger, algorithm="ES256"), token()):
        response = await client.get("/v1/models", headers={"Authorization": f"Bearer {forged}"})
        assert response.status_code == 401
        assert response.json()["error"]["details"][0]["reason"] == "TOKEN_INVALID"


def test_a_public_key_that_cannot_be_read_stops_the_gateway_at_start() -> None:
    """A MESH_JWT_PUBLIC_KEY that is no PEM public key is refused when the gateway starts, not per token."""
    with pytest.raises(ValueError, match="Unable to load PEM"):
        public_key_algorithm("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")


async def test_any_mode_takes_either_credential(make_client: GatewayFactory) -> None:
    """any mode accepts an API key or a token, and still refuses no credentials."""
    client = await make_client(keys=MemoryKeys({"k": "k1"}), auth_mode="any", jwt_secret=SECRET)
    assert (await client.get("/v1/filters", headers={"X-API-Key": "k"})).status_code == 200
    assert (
        await client.get("/v1/filters", headers={"Authorization": f"Bearer {token()}"})
    ).status_code == 200
    assert (await client.get("/v1/filters")).status_code == 401


async def test_event_stream_accepts_credentials_in_the_query(make_client: GatewayFactory) -> None:
    """EventSource cannot send headers, so /events takes ?api_key= (and only /events does)."""
    client = await make_client(keys=MemoryKeys({"k": "k1"}), auth_mode="api_key")
    assert (await client.get("/v1/jobs/missing/events", params={"api_key": "k"})).status_code == 404
    assert (await client.get("/v1/jobs/missing/events")).status_code == 401
    assert (await client.get("/v1/jobs/missing", params={"api_key": "k"})).status_code == 401


async def test_an_event_stream_without_credentials_is_told_of_the_query_parameter(
    make_client: GatewayFactory,
) -> None:
    """A stream request without credentials is told it may send ``?api_key=`` (or ``?access_token=``): it was
    told only of the header, which EventSource cannot send. Other routes name the header alone."""
    client = await make_client(keys=MemoryKeys({}), auth_mode="api_key")
    stream = (await client.get("/v1/jobs/missing/events")).json()["error"]["message"]
    assert stream == "this API needs an X-API-Key header (or ?api_key=)"
    assert (await client.get("/v1/jobs")).json()["error"]["message"] == "this API needs an X-API-Key header"
    jwt_client = await make_client(auth_mode="jwt", jwt_secret=SECRET)
    jwt_stream = (await jwt_client.get("/v1/jobs/missing/events")).json()["error"]["message"]
    assert jwt_stream == "this API needs a Bearer token (or ?access_token=)"


async def test_cors_allowlist(make_client: GatewayFactory) -> None:
    """Only allowlisted origins get CORS headers; a preflight from one is answered."""
    client = await make_client(cors_origins=["https://app.example"])
    allowed = await client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "traceparent" in allowed.headers["access-control-expose-headers"]
    other = await client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = await client.options(
        "/v1/jobs",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200


class BrokenKeys:
    """A key lookup with a bug in it: every request that shows a key meets an unexpected exception."""

    async def lookup(self, key: str) -> str | None:
        raise RuntimeError("a bug in the key lookup")


async def test_cors_headers_reach_a_500_and_expose_what_the_api_documents(
    make_client: GatewayFactory,
) -> None:
    """The 500 that the gateway's safety net answers for a bug carries Access-Control-Allow-Origin like every
    other answer (a browser hid it from the page), and cross-origin pages may read the headers the API
    documents: the processed image's size and device, an image's ETag and file name."""
    client = await make_client(keys=BrokenKeys(), auth_mode="api_key", cors_origins=["https://app.example"])
    response = await client.get("/v1/models", headers={"Origin": "https://app.example", "X-API-Key": "k"})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "INTERNAL"
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    exposed = {name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")}
    assert {"x-image-width", "x-image-height", "x-device", "etag", "content-disposition"} <= exposed


async def _cli_run(database_url: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.services.gateway.keys",
        *args,
        env={**os.environ, "MESH_DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def _cli(database_url: str, *args: str) -> tuple[int, str]:
    code, out, _ = await _cli_run(database_url, *args)
    return code, out


@pytest.mark.parametrize("name", ["", "   ", "robot\x07"])
async def test_the_key_cli_refuses_a_key_without_a_usable_name(name: str) -> None:
    """A key needs a printable name to be found and revoked by: an empty or blank one, or one with a control
    character, is a usage error (exit 2) saying what to give, before any database is touched."""
    code, out, err = await _cli_run("postgresql://nobody@127.0.0.1:1/never", "create", name)
    assert (code, out) == (2, "")
    assert "name who or what the key is for" in err


async def test_the_key_cli_reports_a_database_that_does_not_answer() -> None:
    """With PostgreSQL unreachable, the CLI gives up after a few seconds, says so and exits 1, where it retried
    for a minute and ended in a traceback."""
    code, out, err = await _cli_run("postgresql://nobody@127.0.0.1:1/never", "list")
    assert (code, out) == (1, "")
    assert "PostgreSQL (MESH_DATABASE_URL) did not answer within 5 s" in err


async def test_an_unreachable_key_database_is_a_quick_503_with_retry_after(
    make_client: GatewayFactory,
) -> None:
    """With the API key database unreachable a keyed request is 503 UNAVAILABLE with Retry-After within a few
    seconds (the key store's short wait for a connection), where it was a 500 after 5 to 11 s."""
    async with create_pool("postgresql://nobody@127.0.0.1:1/never", name="down-keys") as pool:
        client = await make_client(keys=KeyStore(pool), auth_mode="api_key")
        started = time.perf_counter()
        response = await client.get("/v1/models", headers={"X-API-Key": "mesh_anything"})
        assert time.perf_counter() - started < 4
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "UNAVAILABLE"
    assert error["message"].startswith("the API key database is unavailable")


@pytest.mark.integration
async def test_the_key_cli_prints_only_its_answer_on_stdout(empty_database_url: str) -> None:
    """On a database it migrates first, ``create`` prints its one JSON line on stdout and logs on stderr:
    the migration's log lines came first on stdout, so ``... create robot | jq -r .key`` broke."""
    code, out = await _cli(empty_database_url, "create", "robot")
    assert code == 0
    [line] = out.splitlines()
    assert json.loads(line)["name"] == "robot"


@pytest.fixture
async def key_store(database_url: str) -> AsyncIterator[KeyStore]:
    """The gateway's key store on the test database (migrated by the CLI's first call)."""
    code, _ = await _cli(database_url, "list")
    assert code == 0
    async with create_pool(database_url, name="test-keys", min_size=1, max_size=2) as pool:
        yield KeyStore(pool)


@pytest.mark.integration
async def test_key_cli_create_use_revoke(
    make_client: GatewayFactory, database_url: str, key_store: KeyStore
) -> None:
    """A key made by the CLI works at once, is stored only hashed, and is refused after the CLI revokes it."""
    code, out = await _cli(database_url, "create", "ci-robot")
    assert code == 0
    created = json.loads(out)
    key = created["key"]
    client = await make_client(keys=key_store, auth_mode="api_key")
    assert (await client.get("/v1/models", headers={"X-API-Key": key})).status_code == 200
    async with (
        create_pool(database_url, name="peek", min_size=1, max_size=1) as pool,
        pool.connection() as conn,
    ):
        stored = await (
            await conn.execute("SELECT key_hash FROM gateway_api_keys WHERE id = %s", (created["id"],))
        ).fetchone()
        assert stored is not None
        assert stored[0] == hash_key(key)
        assert key not in stored[0]
    listed = [json.loads(line) for line in (await _cli(database_url, "list"))[1].splitlines()]
    assert any(k["id"] == created["id"] and k["revoked_at"] is None and "key" not in k for k in listed)
    code, out = await _cli(database_url, "revoke", created["id"])
    assert (code, json.loads(out)) == (0, {"revoked": 1})
    assert (await client.get("/v1/models", headers={"X-API-Key": key})).status_code == 401
    code, _ = await _cli(database_url, "revoke", created["id"])
    assert code == 1
