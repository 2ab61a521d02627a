"""Alembic migrations on SQLite and PostgreSQL: empty -> head -> base -> head, and concurrent starts."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

from sqlalchemy import create_engine, inspect, pool

from app.migrate import current_revision, downgrade_to, head_revision, upgrade_to_head

CATALOG_TABLES = {"gpu", "price", "model", "budget_tier", "catalog_meta"}


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    head = head_revision()
    assert head is not None
    assert current_revision(db_url) is None
    assert not _tables(db_url) & CATALOG_TABLES

    assert upgrade_to_head(db_url) == head
    assert _tables(db_url) >= CATALOG_TABLES

    downgrade_to(db_url, "base")
    assert current_revision(db_url) is None
    assert not _tables(db_url) & CATALOG_TABLES

    assert upgrade_to_head(db_url) == head
    assert _tables(db_url) >= CATALOG_TABLES
    # Upgrading a database already at head is a no-op, not an error.
    assert upgrade_to_head(db_url) == head


def test_price_table_constraints_exist(db_url: str) -> None:
    upgrade_to_head(db_url)
    engine = create_engine(db_url, poolclass=pool.NullPool)
    try:
        insp = inspect(engine)
        uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints("price")}
        fks = insp.get_foreign_keys("price")
    finally:
        engine.dispose()
    assert ("gpu_id", "provider", "kind", "observed_on") in uniques
    assert fks and fks[0]["referred_table"] == "gpu"


def test_replicas_migrating_at_once_all_succeed(db_url: str) -> None:
    # Four processes start together, as replicas behind a load balancer would; the lock serialises them.
    with ProcessPoolExecutor(max_workers=4) as pool_:
        revisions = list(pool_.map(upgrade_to_head, [db_url] * 4))
    assert revisions == [head_revision()] * 4
    assert _tables(db_url) >= CATALOG_TABLES


def test_replicas_preparing_at_once_load_the_seed_once(db_url: str) -> None:
    from dbhelp import DATA_DIR, counts
    from sqlalchemy.orm import Session

    from app.migrate import prepare_database

    with ProcessPoolExecutor(max_workers=4) as pool_:
        revisions = list(pool_.map(prepare_database, [db_url] * 4))
    assert revisions == [head_revision()] * 4
    engine = create_engine(db_url, poolclass=pool.NullPool)
    try:
        with Session(engine) as s:
            n = counts(s)
    finally:
        engine.dispose()
    price_rows = len((DATA_DIR / "prices.csv").read_text().splitlines()) - 1
    assert n["price"] == price_rows and n["gpu"] >= 34 and n["catalog_meta"] == 1
