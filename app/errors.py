"""Errors that carry their HTTP status, rendered by one handler into the API's JSON error shapes."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tunefit.errors")

Source = Literal["body", "query"]


class AppError(Exception):
    """Base of the app's errors: an HTTP status, a message and extra JSON members."""

    status_code: int = 400

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"detail": self.detail, **self.extra}


class NotFoundError(AppError):
    """A named catalog entry does not exist; `suggestions` lists the closest slugs."""

    status_code = 404

    def __init__(self, detail: str, suggestions: list[str] | None = None, field: str | None = None) -> None:
        super().__init__(detail, suggestions=list(suggestions or []))
        self.field = field


class UnknownModelError(NotFoundError):
    """No catalog model has this slug or Hugging Face id."""


class UnknownGpuError(NotFoundError):
    """No catalog GPU has this slug."""


class InputError(AppError):
    """A request field is invalid in a way the schema cannot express; rendered like FastAPI's 422."""

    status_code = 422

    def __init__(self, field: str, message: str, source: Source = "body", value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.source: Source = source
        self.value = value

    def body(self) -> dict[str, Any]:
        """FastAPI's validation shape: `detail` is a list of {loc, msg, type}."""
        item: dict[str, Any] = {"type": "value_error", "loc": [self.source, self.field], "msg": self.detail}
        if self.value is not None:
            item["input"] = jsonable_encoder(self.value)
        return {"detail": [item]}


def request_id_of(request: Request) -> str | None:
    """The request id the middleware assigned, if any."""
    return getattr(request.state, "request_id", None)


def _source_of(request: Request) -> Source:
    return "query" if request.method in ("GET", "HEAD") else "body"


def render_error(request: Request, exc: Exception) -> JSONResponse:
    """The one place that turns any exception into the API's JSON error response."""
    # Imported here so this module loads even before the core lands (the core is another helper's).
    core_input_error = _core_input_error_type()
    if core_input_error is not None and isinstance(exc, core_input_error):
        field = str(getattr(exc, "field", "") or "request")
        message = str(getattr(exc, "message", "") or exc)
        exc = InputError(field, message, source=_source_of(request))
    if isinstance(exc, AppError):
        return JSONResponse(exc.body(), status_code=exc.status_code)
    if isinstance(exc, RequestValidationError):
        return JSONResponse({"detail": clean_validation_errors(exc.errors())}, status_code=422)
    if isinstance(exc, StarletteHTTPException):
        headers = dict(exc.headers) if exc.headers else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
    rid = request_id_of(request)
    if isinstance(exc, SQLAlchemyError):
        # The database is down, unmigrated or broken underneath us: the client can retry later.
        log.error("database error (request_id=%s) on %s %s: %s", rid, request.method, request.url.path,
                  exc.__class__.__name__, exc_info=exc)
        body = {"detail": "the catalog database is unavailable; try again later", "request_id": rid}
        return JSONResponse(body, status_code=503)
    log.exception("unhandled error (request_id=%s) on %s %s", rid, request.method, request.url.path)
    return internal_error_response(rid)


# An error item echoes the offending input; a pasted config.json can be large, so past this many
# characters of JSON the echo is left out (the loc and msg still name the problem).
MAX_ECHO_CHARS = 2000


def clean_validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI's 422 items made JSON-safe: NaN/Infinity inputs as text, huge inputs left out."""
    out: list[dict[str, Any]] = []
    for err in errors:
        item: dict[str, Any] = {
            "type": str(err.get("type", "value_error")),
            "loc": [p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
        }
        if "input" in err:
            echoed = _json_safe(err["input"])
            if len(json.dumps(echoed, default=str)) <= MAX_ECHO_CHARS:
                item["input"] = echoed
        if err.get("ctx"):
            item["ctx"] = {str(k): _json_safe(v) for k, v in err["ctx"].items()}
        out.append(item)
    return out


def _json_safe(value: Any) -> Any:
    try:
        encoded = jsonable_encoder(value)
    except (TypeError, ValueError, RecursionError):
        return repr(value)[:MAX_ECHO_CHARS]
    return _finite(encoded)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def internal_error_response(request_id: str | None) -> JSONResponse:
    """A JSON 500 that names the request id instead of showing a traceback."""
    body = {"detail": "internal error; the server log has details", "request_id": request_id}
    return JSONResponse(body, status_code=500)


def _core_input_error_type() -> type[Exception] | None:
    try:
        from app.core.errors import CoreInputError
    except ImportError:
        return None
    return CoreInputError


async def _handler(request: Request, exc: Exception) -> JSONResponse:
    return render_error(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    """Register the one handler for every error type the app renders."""
    app.add_exception_handler(AppError, _handler)
    app.add_exception_handler(RequestValidationError, _handler)
    app.add_exception_handler(StarletteHTTPException, _handler)
    core_input_error = _core_input_error_type()
    if core_input_error is not None:
        app.add_exception_handler(core_input_error, _handler)
    # `Exception` handlers run in Starlette's outermost middleware, outside ours; the request-id
    # middleware therefore also catches stray exceptions itself (see app/middleware.py).
    app.add_exception_handler(Exception, _handler)
