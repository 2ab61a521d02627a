"""Fixtures for the web page tests: a client on a fresh migrated+seeded SQLite database per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.migrate import prepare_database


@pytest.fixture
def client(sqlite_url: str) -> Iterator[TestClient]:
    """A client on a new app over a fresh seeded database."""
    prepare_database(sqlite_url)
    with TestClient(create_app(Settings(database_url=sqlite_url)), raise_server_exceptions=False) as c:
        yield c
