"""Rate limits per caller and route: RateLimit-* headers, then 429 with Retry-After."""

from __future__ import annotations

import httpx

from tests.gateway.harness import GatewayFactory
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
