"""Shared fixtures: a fresh SQLite or PostgreSQL database per test, and the 'missing part' policy."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

PG_ADMIN_URL = os.environ.get("TUNEFIT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REQUIRE_ALL = os.environ.get("TUNEFIT_REQUIRE_ALL") == "1"


def missing_part(what: str, why: str) -> None:
    """Skip (saying what and why) on a machine that lacks a part; fail where CI requires every part."""
    if REQUIRE_ALL:
        pytest.fail(f"{what} is required here (TUNEFIT_REQUIRE_ALL=1) but unavailable: {why}")
    pytest.skip(f"skipped {what}: {why}")


def _pg_admin_engine():  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine

    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture
def sqlite_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A fresh, empty SQLite database file."""
    return f"sqlite:///{tmp_path / 'tunefit-test.sqlite3'}"


@pytest.fixture
def settings_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """settings_database(url): the in-process CLI's get_settings() reads that database (cache cleared)."""
    from app.config import get_settings

    def point(url: str) -> str:
        monkeypatch.setenv("TUNEFIT_DATABASE_URL", url)
        get_settings.cache_clear()
        return url

    yield point
    get_settings.cache_clear()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the real server, dropped afterwards."""
    from sqlalchemy import text

    try:
        admin = _pg_admin_engine()
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # the server is absent on this machine
        missing_part("PostgreSQL tests", f"cannot reach {PG_ADMIN_URL}: {exc.__class__.__name__}")
        raise  # unreachable: missing_part skips or fails
    name = f"tunefit_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from app.db import engine_for

        engine_for(url).dispose()
        engine_for.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request) -> str:  # type: ignore[no-untyped-def]
    """Each test using this runs twice: on SQLite and on the real PostgreSQL server."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))
