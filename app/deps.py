"""FastAPI dependency aliases: SettingsDep and SessionDep (the session owns commit/rollback)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """A request-scoped session: committed when the endpoint returns, rolled back on error."""
    yield from session_scope(request.app.state.session_factory)


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
# scope="function": the transaction ends before the response is sent, so a failed commit is never
# reported to the client as a success.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
