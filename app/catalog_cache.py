"""The catalog as plain core values, cached per process and reloaded when the catalog changes."""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sqlalchemy.orm import Session

from app import catalog
from app.core.gpu import BudgetTier, GpuSpec, PriceQuote


@dataclass(frozen=True)
class CatalogModel:
    """A catalog model as plain values (its config.json and how it is named)."""

    slug: str
    hf_id: str
    name: str
    config: MappingProxyType[str, Any]


@dataclass(frozen=True)
class CatalogSnapshot:
    """Everything an estimate needs from the catalog, as immutable plain values."""

    updated: dt.datetime | None
    gpus: tuple[GpuSpec, ...]
    prices: tuple[PriceQuote, ...]  # the newest observation per GPU, provider and kind
    tiers: tuple[BudgetTier, ...]
    models: tuple[CatalogModel, ...]
    _gpu_index: dict[str, GpuSpec] = field(default_factory=dict, repr=False, compare=False)
    _model_index: dict[str, CatalogModel] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._gpu_index.update({g.slug.lower(): g for g in self.gpus})
        for m in self.models:
            self._model_index[m.hf_id.lower()] = m
        # Slugs win over HF ids on a clash: a slug is what the catalog promises.
        self._model_index.update({m.slug.lower(): m for m in self.models})

    def gpu(self, slug: str) -> GpuSpec | None:
        """The GPU with this slug (case-insensitive)."""
        return self._gpu_index.get(slug.strip().lower())

    def model(self, key: str) -> CatalogModel | None:
        """The model with this slug or Hugging Face id (case-insensitive)."""
        return self._model_index.get(key.strip().lower())

    def prices_for(self, gpu_slug: str) -> tuple[PriceQuote, ...]:
        """The newest prices of one GPU."""
        return tuple(p for p in self.prices if p.gpu_slug == gpu_slug)


_lock = threading.Lock()
_cache: dict[str, CatalogSnapshot] = {}


def _key(session: Session) -> str:
    return session.get_bind().engine.url.render_as_string(hide_password=False)


def load_snapshot(session: Session) -> CatalogSnapshot:
    """Read the whole catalog into plain values (a few dozen rows: milliseconds)."""
    gpus = catalog.list_gpus(session)
    return CatalogSnapshot(
        updated=catalog.catalog_last_updated(session),
        gpus=tuple(catalog.gpu_spec(listing.gpu) for listing in gpus),
        prices=tuple(catalog.price_quote(p) for listing in gpus for p in listing.latest_prices),
        tiers=tuple(catalog.budget_tier(t) for t in catalog.list_tiers(session)),
        models=tuple(
            CatalogModel(m.slug, m.hf_id, m.name, MappingProxyType(dict(m.config)))
            for m in catalog.list_models(session)
        ),
    )


def snapshot(session: Session) -> CatalogSnapshot:
    """The cached snapshot for this database, reloaded when `catalog_last_updated` has moved."""
    key = _key(session)
    # One indexed single-row read per request decides whether the cache is still current; every
    # catalog write goes through catalog.touch(), so this also sees other replicas' writes.
    updated = catalog.catalog_last_updated(session)
    cached = _cache.get(key)
    if cached is not None and cached.updated == updated:
        return cached
    with _lock:
        cached = _cache.get(key)
        if cached is not None and cached.updated == updated:
            return cached
        fresh = load_snapshot(session)
        _cache[key] = fresh
        return fresh


def clear() -> None:
    """Forget every cached snapshot (tests; a process that rewrites the catalog without touch())."""
    with _lock:
        _cache.clear()
