"""The catalog as plain core values, cached per process and reloaded when the catalog changes."""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sqlalchemy.orm import Session

from app import catalog, models
from app.core.gpu import MIB, BudgetTier, GpuSpec, PriceQuote


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


def gpu_spec(gpu: models.Gpu) -> GpuSpec:
    """The core's GpuSpec for a catalog GPU (VRAM as the total nvidia-smi reports, in bytes)."""
    return GpuSpec(
        slug=gpu.slug,
        name=gpu.name,
        vram_bytes=gpu.vram_total_mib * MIB,
        bandwidth_bytes_per_s=gpu.bandwidth_gbps * 1e9,
        bf16_tflops=gpu.bf16_tflops or 0.0,  # 0: no bf16 hardware; the core then uses fp16
        fp16_tflops=gpu.fp16_tflops,
        bf16_supported=gpu.bf16_supported,
        board_power_w=gpu.board_power_w,
        launch_price_usd=gpu.launch_price_usd,
        consumer=gpu.consumer,
        architecture=gpu.architecture,
        compute_capability=gpu.compute_capability,
        measured_bf16_tflops=gpu.measured_bf16_tflops,
        platform=gpu.platform,
        interconnect=gpu.interconnect,
    )


def price_quote(price: models.Price) -> PriceQuote:
    """The core's PriceQuote for a stored observation."""
    return PriceQuote(
        gpu_slug=price.gpu.slug,
        provider=price.provider,
        kind=price.kind,
        usd_per_hour=price.usd_per_gpu_hour,
        observed_on=price.observed_on,
        source=price.source,
    )


def budget_tier(tier: models.BudgetTier) -> BudgetTier:
    """The core's BudgetTier for a stored tier."""
    return BudgetTier(
        slug=tier.slug,
        name=tier.name,
        usd_min=tier.usd_min,
        usd_max=tier.usd_max,
        example_builds=tuple(tier.example_builds),
        good_for=tier.good_for,
        gpu_slugs=tuple(tier.gpu_slugs),
    )


_lock = threading.Lock()
_cache: dict[str, CatalogSnapshot] = {}


def _key(session: Session) -> str:
    return session.get_bind().engine.url.render_as_string(hide_password=False)


def load_snapshot(session: Session) -> CatalogSnapshot:
    """Read the whole catalog into plain values (a few dozen rows: milliseconds)."""
    gpus = catalog.list_gpus(session)
    return CatalogSnapshot(
        updated=catalog.catalog_last_updated(session),
        gpus=tuple(gpu_spec(listing.gpu) for listing in gpus),
        prices=tuple(price_quote(p) for listing in gpus for p in listing.latest_prices),
        tiers=tuple(budget_tier(t) for t in catalog.list_tiers(session)),
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
