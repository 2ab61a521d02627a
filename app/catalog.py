"""Catalog queries and writes: the only module that builds select() against the catalog tables."""

from __future__ import annotations

import datetime as dt
import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from app.catalog_rows import (
    GPU_FIELDS,
    GPU_OPTIONAL,
    MODEL_FIELDS,
    MODEL_OPTIONAL,
    PRICE_FIELDS,
    PRICE_OPTIONAL,
    ImportReport,
    RowError,
    RowIssue,
    model_values,
    parse_csv,
    parse_row,
)
from app.models import BudgetTier, CatalogMeta, Gpu, Model, Price


class CatalogWriteError(ValueError):
    """A catalog write was refused: `field` names the offending input, `status` the HTTP status."""

    status = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class PriceConflictError(CatalogWriteError):
    """A price for this GPU/provider/kind/date is already recorded with another value (history is kept)."""

    status = 409


# ---------------------------------------------------------------- reads


@dataclass
class GpuListing:
    """A GPU with its latest price per (provider, kind), and the full history when asked for."""

    gpu: Gpu
    latest_prices: list[Price]
    history: list[Price] = field(default_factory=list)


def _latest_per_key(prices: Iterable[Price]) -> list[Price]:
    """Newest observation per (provider, kind), cheapest first."""
    newest: dict[tuple[str, str], Price] = {}
    for p in prices:
        key = (p.provider, p.kind)
        if key not in newest or p.observed_on > newest[key].observed_on:
            newest[key] = p
    return sorted(newest.values(), key=lambda p: (p.usd_per_gpu_hour, p.provider, p.kind))


def list_gpus(session: Session, *, with_history: bool = False) -> list[GpuListing]:
    """Every GPU (ordered by slug) with its latest prices, and its whole price history on request."""
    gpus = session.scalars(select(Gpu).options(selectinload(Gpu.prices)).order_by(Gpu.slug)).all()
    out = []
    for g in gpus:
        history = sorted(g.prices, key=lambda p: (p.observed_on, p.provider, p.kind), reverse=True)
        out.append(GpuListing(g, _latest_per_key(g.prices), history if with_history else []))
    return out


def get_gpu(session: Session, slug: str) -> Gpu | None:
    """The GPU with this slug (case-insensitive), or None."""
    key = slug.strip().lower()
    return session.scalars(select(Gpu).where(func.lower(Gpu.slug) == key)).first()


def list_models(session: Session) -> list[Model]:
    """Every catalog model, ordered by slug."""
    return list(session.scalars(select(Model).order_by(Model.slug)).all())


def get_model(session: Session, key: str) -> Model | None:
    """The model whose slug or Hugging Face id equals `key` (case-insensitive), or None."""
    k = key.strip().lower()
    stmt = select(Model).where((func.lower(Model.slug) == k) | (func.lower(Model.hf_id) == k))
    return session.scalars(stmt).first()


def suggestions(session: Session, name: str, kind: str = "model", n: int = 5) -> list[str]:
    """The catalog slugs closest to `name` (substring matches first, then difflib's ratio)."""
    table = Model if kind == "model" else Gpu
    slugs = list(session.scalars(select(table.slug).order_by(table.slug)).all())
    key = name.strip().lower().rsplit("/", 1)[-1]  # an HF id: compare its name part
    if not key:
        return slugs[:n]
    contains = [s for s in slugs if key in s or (len(s) >= 3 and s in key)]
    close = difflib.get_close_matches(key, slugs, n=n, cutoff=0.5)
    return list(dict.fromkeys([*contains, *close]))[:n]


def list_prices(
    session: Session,
    *,
    gpu_slug: str | None = None,
    provider: str | None = None,
    kind: str | None = None,
    latest_only: bool = False,
) -> list[Price]:
    """Price observations (newest first), filtered; `latest_only` keeps the newest per GPU/provider/kind."""
    stmt = select(Price).join(Price.gpu).options(selectinload(Price.gpu))
    if gpu_slug:
        stmt = stmt.where(func.lower(Gpu.slug) == gpu_slug.lower())
    if provider:
        stmt = stmt.where(Price.provider == provider)
    if kind:
        stmt = stmt.where(Price.kind == kind)
    rows = list(session.scalars(stmt.order_by(Price.observed_on.desc(), Gpu.slug, Price.provider)).all())
    if not latest_only:
        return rows
    seen: set[tuple[int, str, str]] = set()
    latest = []
    for p in rows:
        key = (p.gpu_id, p.provider, p.kind)
        if key not in seen:
            seen.add(key)
            latest.append(p)
    return latest


def list_tiers(session: Session) -> list[BudgetTier]:
    """Budget tiers in the article's order."""
    return list(session.scalars(select(BudgetTier).order_by(BudgetTier.position, BudgetTier.slug)).all())


def catalog_last_updated(session: Session) -> dt.datetime | None:
    """When the catalog last changed, in UTC (None: never loaded)."""
    when = session.scalars(select(CatalogMeta.last_updated).order_by(CatalogMeta.id)).first()
    # SQLite hands back naive datetimes; every value written here is UTC.
    return when.replace(tzinfo=dt.UTC) if when is not None and when.tzinfo is None else when


def catalog_is_empty(session: Session) -> bool:
    """True when no GPU and no model is stored (serve loads the seed then)."""
    has_gpu = session.scalars(select(Gpu.id).limit(1)).first() is not None
    has_model = session.scalars(select(Model.id).limit(1)).first() is not None
    return not (has_gpu or has_model)


def touch(session: Session, note: str = "") -> None:
    """Record that the catalog changed now."""
    meta = session.scalars(select(CatalogMeta).order_by(CatalogMeta.id)).first()
    now = dt.datetime.now(dt.UTC)
    if meta is None:
        session.add(CatalogMeta(last_updated=now, note=note))
    else:
        meta.last_updated = now
        meta.note = note


# ---------------------------------------------------------------- writes


def _assign(obj: Any, values: dict[str, Any]) -> bool:
    """Set attributes that differ; True when anything changed (unchanged rows stay untouched)."""
    changed = False
    for k, v in values.items():
        if getattr(obj, k) != v:
            setattr(obj, k, v)
            changed = True
    return changed


def _upsert(session: Session, table: type[Gpu | Model | BudgetTier], row: Any, values: dict[str, Any]) -> str:
    """Insert `values` as a new row of `table` when `row` is None, else update `row` in place."""
    if row is None:
        session.add(table(**values))
        session.flush()
        return "inserted"
    return "updated" if _assign(row, values) else "unchanged"


def upsert_gpu(session: Session, values: dict[str, Any]) -> str:
    """Insert or update a GPU by slug; returns 'inserted', 'updated' or 'unchanged'."""
    gpu = session.scalars(select(Gpu).where(Gpu.slug == values["slug"])).first()
    return _upsert(session, Gpu, gpu, values)


def _gpu_ids(session: Session) -> dict[str, int]:
    return {slug: gid for slug, gid in session.execute(select(Gpu.slug, Gpu.id)).all()}


def _find_price(session: Session, gpu_id: int, v: dict[str, Any]) -> Price | None:
    stmt = select(Price).where(
        Price.gpu_id == gpu_id,
        Price.provider == v["provider"],
        Price.kind == v["kind"],
        Price.observed_on == v["observed_on"],
    )
    return session.scalars(stmt).first()


def _stage_price(session: Session, gpu_id: int, v: dict[str, Any]) -> str:
    """Append one observation; the same key again is 'unchanged' if equal, a conflict if not."""
    existing = _find_price(session, gpu_id, v)
    if existing is None:
        session.add(Price(gpu_id=gpu_id, **{k: x for k, x in v.items() if k != "gpu_slug"}))
        session.flush()
        return "inserted"
    if abs(existing.usd_per_gpu_hour - v["usd_per_gpu_hour"]) > 1e-9:
        raise PriceConflictError(
            "observed_on",
            f"{v['gpu_slug']} {v['provider']} {v['kind']} on {v['observed_on']} is already recorded at "
            f"${existing.usd_per_gpu_hour}/h; prices are history and never overwritten — give the new "
            "observation its own date",
        )
    return "unchanged"


def add_price(session: Session, payload: dict[str, Any]) -> Price:
    """Append one price observation (validated); raises CatalogWriteError / PriceConflictError."""
    try:
        v = parse_row(payload, PRICE_FIELDS, PRICE_OPTIONAL)
    except RowError as exc:
        raise CatalogWriteError(exc.field, exc.message) from None
    gpu = get_gpu(session, v["gpu_slug"])
    if gpu is None:
        hint = ", ".join(suggestions(session, v["gpu_slug"], "gpu")) or "none"
        raise CatalogWriteError("gpu_slug", f"unknown GPU {v['gpu_slug']!r} (closest: {hint})")
    if _stage_price(session, gpu.id, v) == "unchanged":
        raise PriceConflictError("observed_on", "this observation is already recorded")
    touch(session, f"price {v['gpu_slug']} {v['provider']} {v['kind']} {v['observed_on']}")
    price = _find_price(session, gpu.id, v)
    assert price is not None
    return price


def add_gpu(session: Session, payload: dict[str, Any]) -> tuple[Gpu, str]:
    """Insert or update one GPU from a JSON payload; returns it and 'inserted'/'updated'/'unchanged'."""
    try:
        v = parse_row(payload, GPU_FIELDS, GPU_OPTIONAL)
    except RowError as exc:
        raise CatalogWriteError(exc.field, exc.message) from None
    outcome = upsert_gpu(session, v)
    if outcome != "unchanged":
        touch(session, f"gpu {v['slug']} {outcome}")
    gpu = get_gpu(session, v["slug"])
    assert gpu is not None
    return gpu, outcome


Rows = Sequence[tuple[int, dict[str, Any]]]


def _run_import(session: Session, report: ImportReport, stage: Any, rows: Rows) -> None:
    """Apply rows inside a SAVEPOINT; any rejected row rolls every one of them back."""
    nested = session.begin_nested()
    for line, v in rows:
        try:
            outcome = stage(v)
        except CatalogWriteError as exc:
            report.errors.append(RowIssue(line, f"{exc.field}: {exc.message}"))
            continue
        setattr(report, outcome, getattr(report, outcome) + 1)
    if report.errors:
        nested.rollback()
        report.inserted = report.updated = report.unchanged = 0
        return
    nested.commit()
    if report.inserted or report.updated:
        touch(session, f"import: {report.inserted} inserted, {report.updated} updated")


def import_prices_csv(session: Session, text: str) -> ImportReport:
    """Append the price rows of a CSV file (header as data/prices.csv); all-or-nothing."""
    rows, issues = parse_csv(text, PRICE_FIELDS, PRICE_OPTIONAL)
    report = ImportReport(errors=list(issues))
    ids = _gpu_ids(session)
    seen: dict[tuple[str, str, str, dt.date], int] = {}
    for line, v in rows:
        key = (v["gpu_slug"], v["provider"], v["kind"], v["observed_on"])
        if v["gpu_slug"] not in ids:
            hint = ", ".join(suggestions(session, v["gpu_slug"], "gpu")) or "none"
            report.errors.append(RowIssue(line, f"gpu_slug: unknown GPU {v['gpu_slug']!r} (closest: {hint})"))
        elif key in seen:
            dup = f"duplicates line {seen[key]} (same gpu, provider, kind, date)"
            report.errors.append(RowIssue(line, dup))
        seen.setdefault(key, line)
    if report.errors:
        report.errors.sort(key=lambda e: e.line)
        return report
    _run_import(session, report, lambda v: _stage_price(session, ids[v["gpu_slug"]], v), rows)
    return report


def import_gpus_csv(session: Session, text: str) -> ImportReport:
    """Insert or update the GPU rows of a CSV file (header as data/gpus.csv); all-or-nothing."""
    rows, issues = parse_csv(text, GPU_FIELDS, GPU_OPTIONAL)
    report = ImportReport(errors=list(issues))
    seen: dict[str, int] = {}
    for line, v in rows:
        if v["slug"] in seen:
            report.errors.append(RowIssue(line, f"slug {v['slug']!r} duplicates line {seen[v['slug']]}"))
        seen.setdefault(v["slug"], line)
    if report.errors:
        report.errors.sort(key=lambda e: e.line)
        return report
    _run_import(session, report, lambda v: upsert_gpu(session, v), rows)
    return report


def upsert_model(session: Session, values: dict[str, Any]) -> str:
    """Insert or update a model by slug; returns 'inserted', 'updated' or 'unchanged'."""
    model = session.scalars(select(Model).where(Model.slug == values["slug"])).first()
    if model is None:
        clash = get_model(session, values["hf_id"])
        if clash is not None:
            raise CatalogWriteError("hf_id", f"{values['hf_id']!r} is already the model {clash.slug!r}")
    return _upsert(session, Model, model, values)


def add_model(session: Session, payload: dict[str, Any]) -> tuple[Model, str]:
    """Insert or update one model from a JSON payload with its whole `config` (config.json)."""
    try:
        row = parse_row(payload, MODEL_FIELDS, MODEL_OPTIONAL)
        values = model_values(row, payload.get("config") or {})
    except RowError as exc:
        raise CatalogWriteError(exc.field, exc.message) from None
    outcome = upsert_model(session, values)
    if outcome != "unchanged":
        touch(session, f"model {values['slug']} {outcome}")
    model = get_model(session, values["slug"])
    assert model is not None
    return model, outcome


def upsert_tier(session: Session, values: dict[str, Any]) -> str:
    """Insert or update a budget tier by slug; returns 'inserted', 'updated' or 'unchanged'."""
    tier = session.scalars(select(BudgetTier).where(BudgetTier.slug == values["slug"])).first()
    return _upsert(session, BudgetTier, tier, values)


def stage_price(session: Session, values: dict[str, Any]) -> str:
    """Append one validated price row by GPU slug (seed loading); 'inserted' or 'unchanged'."""
    gpu = get_gpu(session, values["gpu_slug"])
    if gpu is None:
        raise CatalogWriteError("gpu_slug", f"unknown GPU {values['gpu_slug']!r}")
    return _stage_price(session, gpu.id, values)


class SeedError(ValueError):
    """The seed files have rejected rows; nothing was loaded. `reports` says which and why."""

    def __init__(self, reports: dict[str, ImportReport]) -> None:
        issues = [f"{part} line {e.line}: {e.message}" for part, r in reports.items() for e in r.errors]
        super().__init__("seed catalog not loaded: " + "; ".join(issues[:10]))
        self.reports = reports


def load_seed(
    session: Session, data_dir: Any = None, *, only_if_empty: bool = False
) -> dict[str, ImportReport]:
    """Load data/ (GPUs, prices, models, tiers) idempotently; bad rows raise SeedError, changing nothing.

    Running it again changes nothing; after the files change it updates facts and appends new prices.
    With `only_if_empty`, a catalog that already has rows is left alone (returns {}).
    """
    from app.catalog_seed import DATA_DIR, load_seed_files, seed_ok

    if only_if_empty and not catalog_is_empty(session):
        return {}
    reports = load_seed_files(session, data_dir or DATA_DIR)
    if not seed_ok(reports):
        raise SeedError(reports)
    return reports
