"""SQLAlchemy 2 tables of the catalog: GPUs, dated prices, models, budget tiers, catalog metadata."""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints so Alembic migrations (and their downgrades) are stable on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

PRICE_KINDS = ("spot", "on_demand", "community", "marketplace", "serverless", "reserved")
TIER_KINDS = ("buy", "rent")


class Base(DeclarativeBase):
    """Declarative base with the naming convention."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[str]: JSON}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Gpu(Base):
    """One GPU model with its spec-sheet facts; `source` names where each number came from."""

    __tablename__ = "gpu"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    vendor: Mapped[str] = mapped_column(String(32))
    architecture: Mapped[str] = mapped_column(String(64))
    compute_capability: Mapped[str] = mapped_column(String(16))
    # Software stack the card trains with: cuda | rocm | metal (bitsandbytes QLoRA needs cuda).
    platform: Mapped[str] = mapped_column(String(16), default="cuda")
    vram_gb: Mapped[float] = mapped_column(Float)  # marketing figure (decimal GB as sold)
    # What nvidia-smi reports as the total (MiB); the estimator's "does it fit" uses this.
    vram_total_mib: Mapped[int] = mapped_column(Integer)
    vram_total_source: Mapped[str] = mapped_column(Text)
    bandwidth_gbps: Mapped[float] = mapped_column(Float)
    # Dense tensor TFLOPS with fp32 accumulate (the training-relevant rate); None: no bf16 hardware.
    bf16_tflops: Mapped[float | None] = mapped_column(Float, nullable=True)
    fp16_tflops: Mapped[float] = mapped_column(Float)
    bf16_supported: Mapped[bool] = mapped_column(Boolean)
    measured_bf16_tflops: Mapped[float | None] = mapped_column(Float, nullable=True)
    board_power_w: Mapped[float] = mapped_column(Float)
    launch_price_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    consumer: Mapped[bool] = mapped_column(Boolean)
    interconnect: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)

    prices: Mapped[list[Price]] = relationship(back_populates="gpu", cascade="all, delete-orphan")

    __table_args__ = (
        CheckConstraint("vram_total_mib > 0", name="vram_positive"),
        CheckConstraint("fp16_tflops > 0", name="fp16_positive"),
    )


class Price(Base):
    """One observed rental price per GPU-hour; rows are appended, never overwritten (history)."""

    __tablename__ = "price"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    gpu_id: Mapped[int] = mapped_column(ForeignKey("gpu.id", ondelete="CASCADE"), index=True)
    provider: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    usd_per_gpu_hour: Mapped[float] = mapped_column(Float)
    observed_on: Mapped[dt.date] = mapped_column(Date)
    source: Mapped[str] = mapped_column(Text)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)

    gpu: Mapped[Gpu] = relationship(back_populates="prices")

    __table_args__ = (
        UniqueConstraint("gpu_id", "provider", "kind", "observed_on", name="uq_price_observation"),
        CheckConstraint("usd_per_gpu_hour > 0", name="usd_positive"),
        CheckConstraint("kind IN (" + ", ".join(f"'{k}'" for k in PRICE_KINDS) + ")", name="kind_known"),
        CheckConstraint("source <> ''", name="source_present"),
    )


class Model(Base):
    """One open LLM: its whole Hugging Face config.json and the facts the estimator needs."""

    __tablename__ = "model"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(128), unique=True)
    hf_id: Mapped[str] = mapped_column(String(200), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    family: Mapped[str] = mapped_column(String(64))  # config.json model_type
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    params_total: Mapped[int] = mapped_column(BigInteger)
    params_active: Mapped[int] = mapped_column(BigInteger)
    license: Mapped[str] = mapped_column(String(200))
    gated: Mapped[bool] = mapped_column(Boolean)
    moe_experts: Mapped[int | None] = mapped_column(Integer, nullable=True)
    experts_per_token: Mapped[int | None] = mapped_column(Integer, nullable=True)
    source: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class BudgetTier(Base):
    """A hardware budget band (buy) or the rent-instead option, as data from the seed article."""

    __tablename__ = "budget_tier"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(8), default="buy")
    position: Mapped[int] = mapped_column(Integer, default=0)
    usd_min: Mapped[float] = mapped_column(Float)
    usd_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    example_builds: Mapped[list[str]] = mapped_column(JSON)
    good_for: Mapped[str] = mapped_column(Text)
    gpu_slugs: Mapped[list[str]] = mapped_column(JSON)
    notes: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(Text)

    __table_args__ = (CheckConstraint("kind IN ('buy', 'rent')", name="kind_known"),)


class CatalogMeta(Base):
    """One row: when the catalog last changed (shown in every response's `meta`)."""

    __tablename__ = "catalog_meta"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_updated: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    note: Mapped[str] = mapped_column(Text, default="")
