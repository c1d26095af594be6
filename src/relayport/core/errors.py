"""RFC 9457 problem details: the one error family every module raises and every client receives.

`type` is a stable relative URI (`/problems/<slug>`); clients branch on it, never on `title`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError, InterfaceError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

log = logging.getLogger("relayport.errors")

PROBLEM_JSON = "application/problem+json"

# One slug per HTTP status for errors raised without a more specific type.
_STATUS_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Authentication required"),
    403: ("forbidden", "Not allowed"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    409: ("conflict", "Conflict"),
    412: ("precondition-failed", "Precondition failed"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("validation-error", "Validation failed"),
    429: ("rate-limited", "Too many requests"),
    500: ("internal-error", "Internal server error"),
    503: ("unavailable", "Service unavailable"),
}


def problem_type(slug: str) -> str:
    return f"/problems/{slug}"


class DatabaseUnavailable(Exception):
    """The database could not answer (unreachable, restarting, out of connections): a 503."""


class Problem(Exception):
    """An error with a stable type; raise it anywhere, it renders as problem+json."""

    status: int = 400
    slug: str = "bad-request"
    title: str = "Bad request"
    # True when the work done before the error is meant to stay (an audit row of a failed
    # login, the revocation of a reused refresh token): the request's session commits it.
    commit: bool = False

    def __init__(
        self,
        detail: str | None = None,
        *,
        status: int | None = None,
        slug: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        commit: bool | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail or title or self.title)
        if commit is not None:
            self.commit = commit
        if status is not None:
            self.status = status
        if slug is not None:
            self.slug = slug
        if title is not None:
            self.title = title
        self.detail = detail
        self.headers = dict(headers or {})
        self.extensions = extensions

    def body(self, instance: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": problem_type(self.slug),
            "title": self.title,
            "status": self.status,
        }
        if self.detail:
            doc["detail"] = self.detail
        if instance:
            doc["instance"] = instance
        doc.update(self.extensions)
        return doc


class BadRequest(Problem):
    pass


class Unauthorized(Problem):
    status, slug, title = 401, "unauthorized", "Authentication required"

    def __init__(self, detail: str | None = None, **kw: Any) -> None:
        headers = kw.pop("headers", None) or {"WWW-Authenticate": 'Bearer realm="relayport"'}
        super().__init__(detail, headers=headers, **kw)


class Forbidden(Problem):
    status, slug, title = 403, "forbidden", "Not allowed"


class NotFound(Problem):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(Problem):
    status, slug, title = 409, "conflict", "Conflict"


class PreconditionFailed(Problem):
    status, slug, title = 412, "precondition-failed", "Precondition failed"


class PayloadTooLarge(Problem):
    status, slug, title = 413, "payload-too-large", "Payload too large"


class UnsupportedMediaType(Problem):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class ValidationFailed(Problem):
    status, slug, title = 422, "validation-error", "Validation failed"

    def __init__(self, detail: str | None = None, *, errors: Sequence[Mapping[str, Any]] = ()):
        super().__init__(detail, errors=list(errors))


class RateLimited(Problem):
    status, slug, title = 429, "rate-limited", "Too many requests"


class Unavailable(Problem):
    status, slug, title = 503, "unavailable", "Service unavailable"


def problem_response(
    status: int,
    *,
    slug: str | None = None,
    title: str | None = None,
    detail: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> Response:
    default_slug, default_title = _STATUS_SLUGS.get(status, ("error", "Error"))
    problem = Problem(
        detail,
        status=status,
        slug=slug or default_slug,
        title=title or default_title,
        headers=headers,
        **extensions,
    )
    return render(problem)


def render(problem: Problem, instance: str | None = None) -> Response:
    return Response(
        orjson.dumps(problem.body(instance)),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )


def problem_bytes(status: int, slug: str, title: str, detail: str | None = None) -> bytes:
    """The body for pure-ASGI middleware that answers before FastAPI runs."""
    doc: dict[str, Any] = {"type": problem_type(slug), "title": title, "status": status}
    if detail:
        doc["detail"] = detail
    return orjson.dumps(doc)


def _pointer(loc: Sequence[Any]) -> str:
    # ("body", "email") -> "/email"; query and path parameters keep their origin.
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
        return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)
    return "#" + "/".join(parts)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        loc = err.get("loc", ())
        out.append(
            {
                "pointer": _pointer(loc),
                "location": str(loc[0]) if loc else "body",
                "message": str(err.get("msg", "invalid")),
                "code": str(err.get("type", "invalid")),
            }
        )
    return out


def install(app: FastAPI) -> None:
    """Route every exception FastAPI sees into problem+json."""

    def request_id(request: Request) -> str | None:
        rid = request.scope.get("state", {}).get("request_id")
        return str(rid) if rid else None

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return render(exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = _validation_errors(exc)
        if any(e["code"] == "json_invalid" for e in errors):
            return render(
                Problem(
                    "the request body is not valid JSON",
                    status=400,
                    slug="malformed-json",
                    title="Malformed JSON",
                )
            )
        return render(ValidationFailed(f"{len(errors)} invalid field(s)", errors=errors))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        slug, title = _STATUS_SLUGS.get(exc.status_code, ("error", "Error"))
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
        return render(
            Problem(detail, status=exc.status_code, slug=slug, title=title, headers=exc.headers)
        )

    async def on_dependency_down(request: Request, exc: Exception) -> Response:
        # A database or Redis that is unreachable or out of connections is an outage to wait
        # out, not a bug: 503 with Retry-After so clients and load balancers back off.
        log.warning(
            "dependency unavailable",
            extra={
                "event": "http.dependency_unavailable",
                "error": type(exc).__name__,
                "request_id": request_id(request),
            },
        )
        return problem_response(
            503,
            detail="a backing service is unavailable; retry shortly",
            headers={"Retry-After": "1"},
            request_id=request_id(request),
        )

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        # The client hung up while we read its body: nobody receives this answer, and it is
        # not a server error (logging a traceback per disconnect amplifies overload).
        log.info("client disconnected", extra={"event": "http.client_disconnected"})
        return problem_response(400, detail="the client disconnected", slug="client-disconnected")

    async def on_unhandled(request: Request, exc: Exception) -> Response:
        log.error(
            "unhandled error",
            exc_info=exc,
            extra={"event": "http.unhandled", "request_id": request_id(request)},
        )
        return problem_response(500, detail="the error was logged", request_id=request_id(request))

    async def on_database_error(request: Request, exc: Exception) -> Response:
        # A lost connection (a database restart, a terminated backend) surfaces as whatever
        # DBAPI error the driver raised at that moment; SQLAlchemy marks it invalidated.
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return await on_dependency_down(request, exc)
        return await on_unhandled(request, exc)

    app.add_exception_handler(DBAPIError, on_database_error)
    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(RedisError, on_dependency_down)
    app.add_exception_handler(SATimeoutError, on_dependency_down)
    app.add_exception_handler(InterfaceError, on_dependency_down)
    app.add_exception_handler(DatabaseUnavailable, on_dependency_down)
    app.add_exception_handler(Exception, on_unhandled)
