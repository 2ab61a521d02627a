"""Helpers for the API and CLI tests: a migrated, seeded database and an app on it."""

from __future__ import annotations

from app import catalog
from app.db import engine_for, session_factory, session_scope
from app.migrate import upgrade_to_head


def prepare_database(url: str) -> str:
    """Migrate `url` to head and load the seed catalog, as `tunefit serve` does; returns the URL."""
    upgrade_to_head(url)
    for session in session_scope(session_factory(engine_for(url))):
        catalog.load_seed(session, only_if_empty=True)
    return url
