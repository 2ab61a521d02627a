"""Use cases: request -> catalog values -> core -> response dict (one call feeds API, web page and CLI)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from app import catalog, catalog_cache
from app.catalog_cache import CatalogSnapshot
from app.config import Settings
from app.core.errors import CoreInputError
from app.core.gpu import GpuSpec
from app.errors import InputError, Source, UnknownGpuError, UnknownModelError
from app.schemas import EstimateRequest
from app.version import VERSION

# ------------------------------------------------------------------ resolution


def resolve_model(
    session: Session, snap: CatalogSnapshot, request: EstimateRequest, source: Source
) -> tuple[str | None, Mapping[str, Any]]:
    """The model's name (catalog slug, or None for a pasted config) and its config.json."""
    if request.model is not None and request.hf_config is not None:
        raise InputError("model_config", "give either model or model_config, not both", source)
    if request.hf_config is not None:
        return None, request.hf_config
    if request.model is None:
        raise InputError("model", "give a catalog model (slug or Hugging Face id) or a model_config", source)
    found = snap.model(request.model)
    if found is None:
        raise UnknownModelError(
            f"unknown model {request.model!r}; pass a catalog slug, a Hugging Face id in the catalog, "
            "or the model's config.json as model_config",
            suggestions=catalog.suggestions(session, request.model, "model"),
            field="model",
        )
    return found.slug, found.config


def resolve_gpu(session: Session, snap: CatalogSnapshot, slug: str | None, field: str) -> GpuSpec | None:
    """The catalog GPU named by `field` (None when not given); 404 with the closest slugs otherwise."""
    if slug is None:
        return None
    gpu = snap.gpu(slug)
    if gpu is None:
        raise UnknownGpuError(
            f"unknown GPU {slug!r} in {field}",
            suggestions=catalog.suggestions(session, slug, "gpu"),
            field=field,
        )
    return gpu


# ------------------------------------------------------------------ the estimate


def run_estimate(session: Session, request: EstimateRequest, source: Source = "body") -> dict[str, Any]:
    """The API's response for one request (raises AppError subclasses for 4xx)."""
    snap = catalog_cache.snapshot(session)
    model_name, config = resolve_model(session, snap, request, source)
    gpu = resolve_gpu(session, snap, request.gpu, "gpu")
    owned = resolve_gpu(session, snap, request.owned_gpu, "owned_gpu")
    try:
        result = _call_core(snap, request, model_name, config, gpu, owned)
    except CoreInputError as exc:
        raise InputError(exc.field, exc.message, source) from exc
    body = to_jsonable(result)
    body["meta"] = _meta(snap)
    return body


def run_estimate_for_settings(settings: Settings, request: EstimateRequest) -> dict[str, Any]:
    """run_estimate in its own transaction on the settings' database (the CLI's entry)."""
    from app.db import engine_for, session_factory, session_scope

    for session in session_scope(session_factory(engine_for(settings.database_url))):
        return run_estimate(session, request, source="body")
    raise AssertionError("unreachable: session_scope yields once")


def _call_core(
    snap: CatalogSnapshot,
    request: EstimateRequest,
    model_name: str | None,
    config: Mapping[str, Any],
    gpu: GpuSpec | None,
    owned: GpuSpec | None,
) -> Any:
    """Hand the request and the catalog's plain values to the pure core."""
    from app.core.estimate import estimate

    return estimate(
        config=config,
        model_name=model_name,
        method=request.method,
        precision=request.precision,
        optimizer=request.optimizer,
        batch_size=request.batch_size,
        seq_len=request.seq_len,
        gradient_checkpointing=request.gradient_checkpointing,
        attention=request.attention,
        lora_rank=request.lora_rank,
        lora_alpha=request.effective_lora_alpha,
        lora_targets=tuple(request.lora_targets),
        double_quant=request.double_quant,
        gpu=gpu,
        num_gpus=request.num_gpus,
        parallelism=request.parallelism,
        dataset_samples=request.dataset_samples,
        epochs=request.epochs,
        grad_accum=request.grad_accum,
        tokens_per_sample=request.effective_tokens_per_sample,
        owned_gpu=owned,
        budget_usd=request.budget_usd,
        electricity_usd_per_kwh=request.electricity_usd_per_kwh,
        ranking=request.ranking,
        gpus=snap.gpus,
        prices=snap.prices,
        tiers=snap.tiers,
    )


def to_jsonable(value: Any) -> Any:
    """Plain JSON values: dataclasses to dicts, dates to ISO text, non-finite floats to null."""
    # Hand-rolled rather than dataclasses.asdict: asdict deep-copies every leaf, which made the
    # conversion cost half as much as the estimate itself.
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        # JSON has no Infinity/NaN (an impossible job's hours): null says "no finite answer".
        return value if math.isfinite(value) else None
    names = _field_names(kind)
    if names is not None:
        return {name: to_jsonable(getattr(value, name)) for name in names}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}


def _field_names(kind: type) -> tuple[str, ...] | None:
    """A dataclass type's field names (None for other types), computed once per type."""
    try:
        return _FIELD_NAMES[kind]
    except KeyError:
        names = tuple(f.name for f in fields(kind)) if is_dataclass(kind) else None
        _FIELD_NAMES[kind] = names
        return names


# ------------------------------------------------------------------ catalog views


def _meta(snap: CatalogSnapshot) -> dict[str, Any]:
    """The `meta` object of every response: tunefit's version and the catalog's last update."""
    return {"version": VERSION, "catalog_updated": snap.updated.isoformat() if snap.updated else None}


def gpus_view(session: Session) -> dict[str, Any]:
    """GET /api/gpus: every GPU's facts and its latest prices (each dated, with its source)."""
    listings = catalog.list_gpus(session)
    gpus = []
    for listing in listings:
        g = listing.gpu
        gpus.append({
            "slug": g.slug, "name": g.name, "vendor": g.vendor, "architecture": g.architecture,
            "compute_capability": g.compute_capability, "platform": g.platform,
            "vram_gb": g.vram_gb, "vram_total_mib": g.vram_total_mib,
            "vram_gib": round(g.vram_total_mib / 1024, 3),
            "bandwidth_gbps": g.bandwidth_gbps, "bf16_tflops": g.bf16_tflops, "fp16_tflops": g.fp16_tflops,
            "bf16_supported": g.bf16_supported, "board_power_w": g.board_power_w,
            "launch_price_usd": g.launch_price_usd, "consumer": g.consumer, "interconnect": g.interconnect,
            "source": g.source,
            "prices": [
                {
                    "provider": p.provider, "kind": p.kind, "usd_per_hour": p.usd_per_gpu_hour,
                    "observed_on": p.observed_on.isoformat(), "source": p.source, "note": p.note,
                }
                for p in listing.latest_prices
            ],
        })
    snap = catalog_cache.snapshot(session)
    return {"gpus": gpus, "meta": _meta(snap)}


def models_view(session: Session) -> dict[str, Any]:
    """GET /api/models: every model with its size and dates, the budget tiers and the dated prices."""
    models = [
        {
            "slug": m.slug, "hf_id": m.hf_id, "name": m.name, "family": m.family,
            "params_total": m.params_total, "params_active": m.params_active,
            "moe_experts": m.moe_experts, "experts_per_token": m.experts_per_token,
            "license": m.license, "gated": m.gated, "source": m.source,
            "updated_at": m.updated_at.isoformat() if m.updated_at else None,
        }
        for m in catalog.list_models(session)
    ]
    snap = catalog_cache.snapshot(session)
    prices = [
        {"gpu": p.gpu_slug, "provider": p.provider, "kind": p.kind, "usd_per_hour": p.usd_per_hour,
         "observed_on": p.observed_on.isoformat(), "source": p.source}
        for p in sorted(snap.prices, key=lambda p: (p.gpu_slug, p.usd_per_hour))
    ]
    tiers = to_jsonable(list(snap.tiers))
    return {"models": models, "prices": prices, "tiers": tiers, "meta": _meta(snap)}


def health(session: Session) -> dict[str, Any]:
    """Liveness/readiness: the database answers and the catalog has rows."""
    session.execute(text("SELECT 1"))
    updated = catalog.catalog_last_updated(session)
    empty = catalog.catalog_is_empty(session)
    return {
        "status": "empty" if empty else "ok",
        "version": VERSION,
        "database": session.get_bind().dialect.name,
        "catalog_updated": updated.isoformat() if updated else None,
    }


# ------------------------------------------------------------------ text for the CLI


def summary_text(result: Mapping[str, Any]) -> str:
    """A few human-readable lines of an estimate (the CLI without --json)."""
    lines: list[str] = []
    mem = result.get("memory") or {}
    params = result.get("params") or {}
    if params:
        lines.append(f"params: {params.get('total'):,} total, {params.get('trainable'):,} trainable")
    if mem:
        fit = mem.get("fits")
        fit_text = "" if fit is None else (" — fits" if fit else " — does NOT fit")
        head = mem.get("headroom_gib")
        head_text = "" if head is None else f" (headroom {head:.2f} GiB)"
        lines.append(f"peak memory: {mem.get('peak_gib', 0):.2f} GiB per GPU{fit_text}{head_text}")
        for name, gib in (mem.get("breakdown_gib") or {}).items():
            lines.append(f"  {name:<24} {gib:8.2f} GiB")
    thr = result.get("throughput") or {}
    if thr.get("tokens_per_s") is not None:
        lines.append(f"throughput: {thr['tokens_per_s']:,.0f} tokens/s")
    time_ = result.get("time") or {}
    if time_.get("steps") is not None:
        hours = time_.get("hours")
        hours_text = "" if hours is None else f", {hours:,.2f} h"
        lines.append(f"time: {time_['steps']:,} optimizer steps{hours_text}")
    options = (result.get("cost") or {}).get("options") or []
    if options:
        cheapest = min(options, key=lambda o: o.get("usd_total") or math.inf)
        lines.append(
            f"cheapest rental: ${cheapest.get('usd_total', 0):,.2f} at {cheapest.get('provider')} "
            f"{cheapest.get('kind')} (${cheapest.get('usd_per_hour')}/h, "
            f"observed {cheapest.get('observed_on')})"
        )
    rec = result.get("recommendation") or {}
    if rec:
        lines.append(
            f"recommendation: {rec.get('method')} on {rec.get('num_gpus')}× {rec.get('gpu')} "
            f"({rec.get('where')})"
        )
        lines.extend(f"  - {reason}" for reason in rec.get("reasons") or [])
    for warning in result.get("warnings") or []:
        lines.append(f"warning [{warning.get('code')}]: {warning.get('message')}")
    return "\n".join(lines)
