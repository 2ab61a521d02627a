"""Helpers for the API and CLI tests: a migrated, seeded database."""

from __future__ import annotations

from app import migrate


def prepare_database(url: str) -> str:
    """Migrate `url` to head and load the seed catalog, as `tunefit serve` does; returns the URL."""
    migrate.prepare_database(url)
    return url
