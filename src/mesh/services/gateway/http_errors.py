"""Every error leaves the gateway as ``{"error": {"code", "message", "details"}}`` with the contract's status.

gRPC failures arrive as :class:`~mesh.kit.errors.MeshError` (see :func:`backends.rpc`) and are mapped by the
kit (:func:`~mesh.kit.errors.http_status`); FastAPI's request validation errors become 400 INVALID_ARGUMENT
with one field violation per bad field (up to ``MAX_LISTED_VIOLATIONS``); unknown routes and methods keep
their 404/405 in the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from mesh.kit import errors
from mesh.kit.logging import get_logger
from mesh.services.gateway.bodies import not_json

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before the answer
ERROR_METADATA_KEY = "mesh.error_metadata"

log = get_logger(__name__)

_CODES_BY_HTTP = {
    400: errors.InvalidArgument,
    401: errors.Unauthenticated,
    403: errors.PermissionDenied,
    404: errors.NotFound,
    406: errors.Unimplemented,
    409: errors.Aborted,
    413: errors.PayloadTooLarge,
    415: errors.UnsupportedMediaType,
    429: errors.ResourceExhausted,
    501: errors.Unimplemented,
    503: errors.Unavailable,
    504: errors.DeadlineExceeded,
}
# Statuses that HTTP has and gRPC has not: their ErrorInfo reason names the HTTP status (as 405's
# METHOD_NOT_ALLOWED does), where the code alone would say 501.
_REASONS_BY_HTTP = {
    406: "NOT_ACCEPTABLE",
}


def add_error_metadata(scope: Scope, metadata: Mapping[str, str]) -> None:
    """Have every error answer of this request carry ``metadata`` in its ErrorInfo (a prediction's request id),
    whatever gave it once this was asked: the route, a dependency, request validation, a service behind the
    gateway, a bug (the safety net's 500) or a body limit while the body is read (all answer through
    :func:`answer`). What the error says itself under the same key is kept."""
    state: MutableMapping[str, Any] = scope.setdefault("state", {})
    state.setdefault(ERROR_METADATA_KEY, {}).update(metadata)


def answer(
    scope: Scope,
    error: errors.MeshError,
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """:func:`error_response` for an error met while serving the request of ``scope``, with the ErrorInfo
    metadata that :func:`add_error_metadata` asked for it: the one way every error answer is made, whether an
    exception handler, the safety net's 500 or a body limit's refusal gives it."""
    extra: Mapping[str, str] = scope.get("state", {}).get(ERROR_METADATA_KEY, {})
    for key, value in extra.items():
        error.metadata.setdefault(key, value)
    return error_response(error, status=status, headers=headers)


def error_response(
    error: errors.MeshError, *, status: int | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The JSON response for ``error``, with ``headers``; adds Retry-After and WWW-Authenticate where they apply."""
    headers = dict(headers or {})
    if error.retry_after_seconds is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_seconds)))
    if isinstance(error, errors.Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="mesh", ApiKey realm="mesh"'
    return JSONResponse(
        errors.error_body(error), status_code=status or errors.http_status(error), headers=headers
    )


MAX_LISTED_VIOLATIONS = 20
"""Field violations a 400 lists; the rest are counted in a last one, so a body of thousands of bad values does
not make an answer of megabytes."""


def _validation_error(exc: RequestValidationError) -> errors.InvalidArgument:
    problems = exc.errors()
    violations = [_violation(item) for item in problems[:MAX_LISTED_VIOLATIONS]]
    left = len(problems) - len(violations)
    if left:
        violations.append(errors.omitted("body", left))
    return errors.InvalidArgument(
        f"invalid request: {errors.listing(violations[:5])}", field_violations=violations
    )


def _violation(item: Mapping[str, Any]) -> errors.FieldViolation:
    """One of pydantic's errors as a violation, its texts cut as on the wire (a field's name can be a key the
    client sent, of any length)."""
    if item.get("type") == "json_invalid":
        # FastAPI puts the character's offset where a field's name goes: ("body", 13).
        where = [part for part in item.get("loc", ()) if isinstance(part, int)]
        reason = item.get("ctx", {}).get("error", item.get("msg", "invalid"))
        at = f" at character {where[0]}" if where else ""
        return errors.FieldViolation(
            "body", errors.clip(f"is not valid JSON{at}: {reason}", errors.WIRE_TEXT_BYTES)
        )
    location = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body",)) or "body"
    return errors.FieldViolation(
        errors.clip(location, errors.WIRE_TEXT_BYTES),
        errors.clip(str(item.get("msg", "invalid")), errors.WIRE_TEXT_BYTES),
    )


def _method(request: Request) -> str:
    """The method the client sent: a HEAD arrives at the routes as a GET (see middleware.HeadAsGet)."""
    return "HEAD" if request.scope.get("mesh.head") else request.method


def _http_exception(request: Request, exc: HTTPException) -> tuple[errors.MeshError, int]:
    status = exc.status_code
    if status == 404:
        if exc.detail != "Not Found":
            return errors.NotFound(str(exc.detail)), 404
        return errors.NotFound(
            f"no route {_method(request)} {request.url.path}; the API's routes are listed at /docs and"
            " /openapi.json",
            reason="NO_SUCH_ROUTE",
        ), 404
    cls = _CODES_BY_HTTP.get(status, errors.Internal if status >= 500 else errors.InvalidArgument)
    return cls(str(exc.detail), reason=_REASONS_BY_HTTP.get(status, "")), status


async def _on_mesh_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.MeshError)
    return answer(request.scope, exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if any(tuple(item.get("loc", ())) == ("body",) for item in exc.errors()):
        # FastAPI reads a body of another type as raw bytes and then finds no object in them: say what to send,
        # as the routes that parse JSON themselves do (415).
        refused = not_json(request)
        if refused is not None:
            return answer(request.scope, refused)
    return answer(request.scope, _validation_error(exc), status=400)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        # Starlette names only the first route that matched the path; list every route's methods.
        allowed = ", ".join(allowed_methods(request))
        refused = errors.Unimplemented(
            f"{_method(request)} is not allowed on {request.url.path}; it allows {allowed or 'no method'}",
            reason="METHOD_NOT_ALLOWED",
        )
        return answer(request.scope, refused, status=405, headers={"Allow": allowed})
    error, status = _http_exception(request, exc)
    return answer(request.scope, error, status=status, headers=exc.headers)


_METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route offers for this request's path.

    Asked of each route through Starlette's own ``matches`` with the method swapped, so that routers that
    FastAPI nests (its ``include_router`` no longer flattens them into the app's routes) answer too. Matched
    against the path as the app received it: a Mount that was entered (the static files, which raise their own
    405) has moved its prefix into the shared scope's ``root_path``, and ``/static/app.js`` read as ``/app.js``
    matched no route, which made an empty Allow."""
    scope = {
        **request.scope,
        "root_path": request.scope.get("app_root_path", request.scope.get("root_path", "")),
    }
    methods = {method for route in request.app.router.routes for method in _route_methods(route, scope)}
    listed = sorted(methods)
    return sorted([*listed, "HEAD"]) if "GET" in methods else listed  # HEAD: see middleware.HeadAsGet


def _route_methods(route: BaseRoute, scope: Mapping[str, Any]) -> list[str]:
    """The methods ``route`` serves at the scope's path (none where the path is not its own)."""
    if isinstance(route, Mount) and isinstance(route.app, StaticFiles):
        # A Mount matches every method; its static files serve only GET and HEAD and refuse the rest.
        return ["GET"] if route.matches(dict(scope))[0] == Match.FULL else []
    return [method for method in _METHODS if route.matches({**scope, "method": method})[0] == Match.FULL]


def internal_error_response(exc: BaseException, scope: Scope) -> JSONResponse:
    """The 500 for an unexpected exception met serving the request of ``scope`` (logged with its stack; the
    body says nothing internal), with the ErrorInfo metadata asked for the request (:func:`answer`)."""
    log.error("unhandled error", exc_info=exc)
    return answer(scope, errors.Internal("internal error"))


async def _on_client_disconnect(_: Request, exc: Exception) -> Response:
    # The client left while its body was being read (an upload cut off): nothing to answer and nothing went
    # wrong here. The status is for the access log and metrics; the server drops the response.
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(ClientDisconnect, _on_client_disconnect)
    app.add_exception_handler(errors.MeshError, _on_mesh_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_exception)
