"""Rate limits per caller and route: RateLimit-* headers, then 429 with Retry-After."""

from __future__ import annotations

import logging

import httpx
import pytest

from mesh.services.gateway.__main__ import http_server_config
from tests.gateway.harness import FakeMesh, GatewayFactory, build_gateway, close_gateway
from tests.gateway.test_auth import MemoryKeys


async def test_limit_headers_count_down_then_429(make_client: GatewayFactory) -> None:
    """Each limited response says the limit and what remains; past it, 429 with Retry-After and the error body."""
    client = await make_client(rate_limit="3/minute")
    remaining = []
    for _ in range(3):
        response = await client.get("/v1/models")
        assert response.status_code == 200
        assert response.headers["ratelimit-limit"] == "3"
        remaining.append(int(response.headers["ratelimit-remaining"]))
    assert remaining == [2, 1, 0]
    refused = await client.get("/v1/models")
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["ratelimit-remaining"] == "0"
    assert 0 < int(refused.headers["ratelimit-reset"]) <= 60
    assert refused.json()["error"]["details"][0]["reason"] == "RATE_LIMITED"


async def test_limits_are_per_route_and_open_routes_are_not_limited(make_client: GatewayFactory) -> None:
    """Exhausting one route leaves another route and the health routes alone."""
    client = await make_client(rate_limit="1/minute")
    assert (await client.get("/v1/models")).status_code == 200
    assert (await client.get("/v1/models")).status_code == 429
    assert (await client.get("/v1/filters")).status_code == 200
    for _ in range(3):
        response = await client.get("/healthz")
        assert response.status_code == 200
        assert "ratelimit-limit" not in response.headers


async def test_limits_are_per_key(make_client: GatewayFactory) -> None:
    """Two API keys have separate budgets on the same route."""
    client = await make_client(
        keys=MemoryKeys({"a": "ka", "b": "kb"}), auth_mode="api_key", rate_limit="1/minute"
    )
    assert (await client.get("/v1/models", headers={"X-API-Key": "a"})).status_code == 200
    assert (await client.get("/v1/models", headers={"X-API-Key": "a"})).status_code == 429
    assert (await client.get("/v1/models", headers={"X-API-Key": "b"})).status_code == 200


async def test_rate_limits_can_be_turned_off(make_client: GatewayFactory) -> None:
    """With rate limits disabled there are no RateLimit headers and no 429."""
    client: httpx.AsyncClient = await make_client(rate_limit="1/minute", rate_limit_enabled=False)
    for _ in range(3):
        response = await client.get("/v1/models")
        assert response.status_code == 200
        assert "ratelimit-limit" not in response.headers


@pytest.mark.parametrize("trusted", ["10.1.2.3", "10.0.0.0/8", "*"])
async def test_behind_a_trusted_proxy_each_client_has_its_own_limit(
    mesh: FakeMesh, trusted: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Served as uvicorn serves it, behind a proxy the gateway trusts, limits count per client address from
    X-Forwarded-For, not per proxy: one client's 429 leaves another client alone. The access log names the
    client."""
    app, ctx = build_gateway(mesh.gateway_settings(rate_limit="1/minute", forwarded_allow_ips=trusted))
    config = http_server_config(ctx.settings, app)
    config.load()
    proxy = httpx.ASGITransport(app=config.loaded_app, client=("10.1.2.3", 40000))
    try:
        async with httpx.AsyncClient(transport=proxy, base_url="http://gateway") as client:
            first = {"x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "https"}
            with caplog.at_level(logging.INFO, logger="mesh.services.gateway.access"):
                assert (await client.get("/v1/models", headers=first)).status_code == 200
            logged = [r.msg for r in caplog.records if r.name == "mesh.services.gateway.access"]
            assert [line["client"] for line in logged if isinstance(line, dict)] == ["203.0.113.7"]
            assert (await client.get("/v1/models", headers=first)).status_code == 429
            second = {"x-forwarded-for": "198.51.100.9", "x-forwarded-proto": "https"}
            assert (await client.get("/v1/models", headers=second)).status_code == 200
            # A redirect keeps the scheme the client used at the proxy.
            redirect = await client.get("/v1/models/", headers=second)
            assert redirect.status_code == 307
            assert redirect.headers["location"].startswith("https://")
    finally:
        await close_gateway(ctx)


async def test_an_untrusted_peer_cannot_choose_its_address(mesh: FakeMesh) -> None:
    """A peer the gateway does not trust is limited by its own address whatever X-Forwarded-For it sends."""
    app, ctx = build_gateway(mesh.gateway_settings(rate_limit="1/minute"))
    config = http_server_config(ctx.settings, app)
    config.load()
    peer = httpx.ASGITransport(app=config.loaded_app, client=("10.9.9.9", 40000))
    try:
        async with httpx.AsyncClient(transport=peer, base_url="http://gateway") as client:
            sent = ["203.0.113.7", "198.51.100.9"]
            codes = [
                (await client.get("/v1/models", headers={"x-forwarded-for": address})).status_code
                for address in sent
            ]
            assert codes == [200, 429]
    finally:
        await close_gateway(ctx)
