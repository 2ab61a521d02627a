"""Fixtures for the catalog tests: a migrated database (SQLite and PostgreSQL) and sessions on it."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dbhelp import DATA_DIR
from sqlalchemy.orm import Session

from app.db import engine_for, session_factory
from app.migrate import upgrade_to_head


@pytest.fixture
def migrated_url(db_url: str) -> str:
    """A fresh database (each backend) migrated to head."""
    upgrade_to_head(db_url)
    return db_url


@pytest.fixture
def new_session(migrated_url: str) -> Iterator[Callable[[], Session]]:
    """A factory of sessions on the migrated database (the caller commits)."""
    factory = session_factory(engine_for(migrated_url))
    yield factory
    engine_for(migrated_url).dispose()


@pytest.fixture
def seeded(new_session: Callable[[], Session]) -> Callable[[], Session]:
    """The same factory after the seed catalog was loaded once."""
    from app import catalog

    with new_session() as s:
        catalog.load_seed(s)
        s.commit()
    return new_session


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    """A writable copy of data/ (seed files and model configs) to edit in a test."""
    dest = tmp_path / "data"
    shutil.copytree(DATA_DIR, dest, ignore=shutil.ignore_patterns("calibration"))
    return dest
