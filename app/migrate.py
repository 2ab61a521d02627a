"""Run Alembic to head programmatically, under a database-wide lock so replicas can start together."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, pool, text
from sqlalchemy.engine import make_url

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Any constant works; it only has to be the same in every replica (ASCII "tunefit" as an int).
PG_LOCK_KEY = 0x74756E65666974


def alembic_config(url: str) -> Config:
    """An Alembic Config pointing at migrations/ and `url`, without touching logging."""
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logging"] = False
    return cfg


def head_revision() -> str | None:
    """The newest revision in migrations/versions."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    """The revision the database at `url` is at (None: never migrated)."""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


@contextlib.contextmanager
def _sqlite_file_lock(url: str) -> Iterator[None]:
    """An exclusive flock beside the SQLite file (SQLite replicas necessarily share one host)."""
    database = make_url(url).database
    if not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).resolve().with_name(Path(database).name + ".migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def _pg_advisory_lock(conn: Connection) -> Iterator[None]:
    """Session-level advisory lock: held across Alembic's own transactions, released explicitly."""
    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_LOCK_KEY})
    conn.commit()
    try:
        yield
    finally:
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
        conn.commit()


@contextlib.contextmanager
def database_lock(url: str) -> Iterator[Connection]:
    """Hold the database-wide start-up lock; yields the connection it is held on (migrate on it)."""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn, _pg_advisory_lock(conn):
                yield conn
        else:
            with _sqlite_file_lock(url), engine.connect() as conn:
                yield conn
    finally:
        engine.dispose()


def _upgrade_on(conn: Connection, url: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")
    conn.commit()


def upgrade_to_head(url: str) -> str | None:
    """Migrate the database at `url` to head under the lock; returns the revision it ends at."""
    with database_lock(url) as conn:
        _upgrade_on(conn, url)
    return current_revision(url)


def prepare_database(url: str, *, seed: bool = True) -> str | None:
    """Start-up: under one lock, migrate to head and load the seed catalog if it is empty.

    Holding the lock through the seed load keeps replicas that start together from loading it twice.
    """
    from app import catalog
    from app.db import engine_for, session_factory, session_scope

    with database_lock(url) as conn:
        _upgrade_on(conn, url)
        if seed:
            for session in session_scope(session_factory(engine_for(url))):
                catalog.load_seed(session, only_if_empty=True)
    return current_revision(url)


def downgrade_to(url: str, revision: str = "base") -> None:
    """Downgrade the database at `url` (tests and operators; the app never downgrades itself)."""
    cfg = alembic_config(url)
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
            conn.commit()
    finally:
        engine.dispose()
