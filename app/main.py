"""The ASGI app: `create_app()` wires settings, database, routers, static files, errors and middleware."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from app.config import Settings, get_settings
from app.db import engine_for, session_factory
from app.errors import install_error_handlers
from app.logs import configure_logging
from app.middleware import REQUEST_ID_HEADER, RequestContextMiddleware
from app.version import VERSION

ROOT = Path(__file__).resolve().parent.parent
STATIC_DIR = ROOT / "static"
# Routers by module; a part that has not landed (or was left out of a slim install) is skipped.
ROUTER_MODULES = ("app.routes.api", "app.routes.admin", "app.routes.web")


def _include_routers(app: FastAPI) -> None:
    for name in ROUTER_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        # An existing module that fails to import is a bug: let it raise rather than hide a router.
        module = importlib.import_module(name)
        app.include_router(module.router)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for `settings` (default: the cached environment settings)."""
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="tunefit",
        version=VERSION,
        summary="Will my LLM fine-tune fit, how long will it take, what will it cost, where to run it?",
    )
    engine = engine_for(settings.database_url)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = session_factory(engine)

    _include_routers(app)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_error_handlers(app)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER],
            max_age=600,
        )
    # Added last = outermost: every response, CORS preflights and errors included, gets its headers.
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    return app


app = create_app()
