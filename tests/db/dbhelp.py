"""Helpers shared by the catalog tests (plain module: the test folders are not packages)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import BudgetTier, CatalogMeta, Gpu, Model, Price

DATA_DIR = Path(__file__).resolve().parents[2] / "data"


def counts(session: Session) -> dict[str, int]:
    """Row count of every catalog table."""
    return {
        t.__tablename__: session.scalar(select(func.count()).select_from(t)) or 0
        for t in (Gpu, Price, Model, BudgetTier, CatalogMeta)
    }
