"""RED metrics per route (Prometheus conventions, base units) and bytes in/out."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests by route template, method and status.",
    ["route", "method", "status"],
)
DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from the request's arrival to the end of its response.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BYTES_IN = Counter("http_request_bytes_total", "Request body bytes received.", ["route"])
BYTES_OUT = Counter("http_response_bytes_total", "Response body bytes sent.", ["route"])
IN_FLIGHT = Gauge("http_requests_in_flight", "Requests being served.")
SSE_STREAMS = Gauge("http_sse_streams", "Open Server-Sent Events streams.")
RATE_LIMITED = Counter("http_rate_limited_total", "Requests refused by a rate limit.", ["route"])
