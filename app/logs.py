"""Structured logging: every line is one JSON object, carrying the current request id when there is one."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from typing import Any

# Set by the request middleware; read by the formatter so error lines name the request they belong to.
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# LogRecord attributes that are not "extra" fields passed by the caller.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "color_message",  # uvicorn adds an ANSI-coloured copy of the message
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a message that is already a JSON object is merged, not nested."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as a single line of JSON (tracebacks become a string field)."""
        message = record.getMessage()
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        parsed = _as_object(message)
        if parsed is not None:
            out.update(parsed)
        else:
            out["message"] = message
        rid = current_request_id.get()
        if rid is not None:
            out.setdefault("request_id", rid)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out.setdefault(key, value)
        if record.exc_info:
            out["error"] = repr(record.exc_info[1])
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def _as_object(message: str) -> dict[str, Any] | None:
    if not message.startswith("{"):
        return None
    try:
        value = json.loads(message)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def configure_logging(level: str) -> None:
    """Send tunefit's logs as JSON lines to stderr, unless the host application configured logging."""
    logger = logging.getLogger("tunefit")
    logger.setLevel(level.upper())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)


def uvicorn_log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging as JSON lines too (its start-up and error lines), for `tunefit serve`."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "tunefit": {"handlers": ["default"], "level": level.upper(), "propagate": False},
        },
    }
