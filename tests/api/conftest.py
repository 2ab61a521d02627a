"""Fixtures for the API tests: a fresh migrated+seeded database per test and a client on a new app."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.api.apihelp import prepare_database


@pytest.fixture
def seeded_url(sqlite_url: str) -> str:
    """A fresh SQLite database, migrated and seeded."""
    return prepare_database(sqlite_url)


@pytest.fixture
def make_client() -> Iterator[Callable[..., TestClient]]:
    """Build clients on new apps (settings overridable per test); all closed afterwards."""
    clients: list[TestClient] = []

    def make(url: str, **settings: Any) -> TestClient:
        client = TestClient(create_app(Settings(database_url=url, **settings)), raise_server_exceptions=False)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(seeded_url: str, make_client: Callable[..., TestClient]) -> TestClient:
    """A client on an app over a fresh seeded SQLite database."""
    return make_client(seeded_url)


@pytest.fixture
def any_db_client(db_url: str, make_client: Callable[..., TestClient]) -> TestClient:
    """A client over a fresh seeded database, once on SQLite and once on the real PostgreSQL."""
    return make_client(prepare_database(db_url))
