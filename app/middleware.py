"""ASGI middleware: request id, one JSON log line per request, security headers, body size limit."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import internal_error_response, render_error
from app.logs import current_request_id

log = logging.getLogger("tunefit.request")

REQUEST_ID_HEADER = "X-Request-ID"
# An incoming id is echoed only if it is short and plain, so it cannot forge log lines or headers.
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# No inline script or style anywhere in the app's own pages (htmx is vendored under /static).
STRICT_CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# FastAPI's interactive docs load Swagger/ReDoc from a CDN with an inline bootstrap script; only
# those two pages get this looser policy.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https:; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'self'; frame-ancestors 'none'"
)
DOCS_PATHS = ("/docs", "/redoc")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "strict-origin-when-cross-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def new_request_id() -> str:
    """A fresh random request id."""
    return uuid.uuid4().hex


def pick_request_id(incoming: str | None) -> str:
    """Echo a sane incoming X-Request-ID, otherwise generate one."""
    if incoming and _SANE_REQUEST_ID.match(incoming):
        return incoming
    return new_request_id()


class RequestContextMiddleware:
    """Outermost layer: assigns the request id, adds headers, logs, and turns stray errors into JSON."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one HTTP request (other scope types pass through)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = pick_request_id(headers.get(REQUEST_ID_HEADER))
        scope.setdefault("state", {})["request_id"] = rid
        token = current_request_id.set(rid)
        path: str = scope.get("path", "")
        started = time.perf_counter()
        status = {"code": 0, "sent": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                status["sent"] = True
                out = MutableHeaders(scope=message)
                out[REQUEST_ID_HEADER] = rid
                for name, value in SECURITY_HEADERS.items():
                    out.setdefault(name, value)
                csp = DOCS_CSP if path.startswith(DOCS_PATHS) else STRICT_CSP
                out.setdefault("Content-Security-Policy", csp)
            await send(message)

        try:
            buffered = await self._read_limited_body(scope, receive, headers)
            if buffered is None:
                response = JSONResponse(
                    {"detail": f"request body larger than {self.max_body_bytes} bytes"}, status_code=413
                )
                await response(scope, receive, send_wrapper)
            else:
                await self.app(scope, _replay(buffered, receive), send_wrapper)
        except Exception as exc:  # the last line of defence: a JSON error, never a bare traceback
            if status["sent"]:
                log.exception("error after the response started (request_id=%s)", rid)
                raise
            request = Request(scope)
            try:
                err = render_error(request, exc)
            except Exception:
                log.exception("error while rendering an error (request_id=%s)", rid)
                err = internal_error_response(rid)
            await err(scope, receive, send_wrapper)
        finally:
            self._log(scope, rid, status["code"], started)
            current_request_id.reset(token)

    async def _read_limited_body(
        self, scope: Scope, receive: Receive, headers: Headers
    ) -> list[Message] | None:
        """Read the whole body up front (it is small); None when it exceeds the limit."""
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return []
        declared = headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    return None
            except ValueError:
                pass  # a malformed length is the server's (uvicorn's) business, not ours
        messages: list[Message] = []
        total = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        return messages

    def _log(self, scope: Scope, rid: str, status: int, started: float) -> None:
        record: dict[str, Any] = {
            "event": "request",
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": status,
            "ms": round((time.perf_counter() - started) * 1000, 2),
            "request_id": rid,
        }
        log.info(json.dumps(record, separators=(",", ":")))


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive callable that first replays the buffered body, then defers to the real one."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
