"""Load the versioned seed catalog (data/*.csv, data/budget_tiers.yaml, data/models/*.json) idempotently."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.orm import Session

from app import catalog
from app.catalog_rows import (
    GPU_FIELDS,
    GPU_OPTIONAL,
    MODEL_FIELDS,
    MODEL_OPTIONAL,
    PRICE_FIELDS,
    PRICE_OPTIONAL,
    TIER_FIELDS,
    ImportReport,
    RowError,
    RowIssue,
    model_values,
    parse_csv,
    parse_row,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SEED_PARTS = ("gpus", "prices", "models", "tiers")


def _tier_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[RowIssue]]:
    """Validated tiers from the YAML file; a tier's 'line' is its position (1-based) in the list."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    default_source = str(doc.get("source_default") or "")
    good: list[tuple[int, dict[str, Any]]] = []
    bad: list[RowIssue] = []
    for i, raw in enumerate(doc.get("tiers") or [], start=1):
        try:
            if not isinstance(raw, dict):
                raise RowError("tier", "must be a mapping")
            v = parse_row({"source": default_source, "notes": "", **raw}, TIER_FIELDS, {"usd_max", "notes"})
            for key in ("example_builds", "gpu_slugs"):
                items = raw.get(key)
                if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
                    raise RowError(key, "must be a list of strings")
                v[key] = list(items)
            v["position"] = i
            good.append((i, v))
        except RowError as exc:
            bad.append(RowIssue(i, f"tier {i}: {exc}"))
    return good, bad


def _model_rows(data_dir: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[RowIssue]]:
    """models.csv rows joined with data/models/<slug>.json (the whole config.json)."""
    rows, bad = parse_csv((data_dir / "models.csv").read_text(encoding="utf-8"), MODEL_FIELDS, MODEL_OPTIONAL)
    good: list[tuple[int, dict[str, Any]]] = []
    for line, row in rows:
        path = data_dir / "models" / f"{row['slug']}.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            good.append((line, model_values(row, config)))
        except FileNotFoundError:
            bad.append(RowIssue(line, f"no config file {path.name} in {path.parent}"))
        except json.JSONDecodeError as exc:
            bad.append(RowIssue(line, f"{path.name} is not JSON: {exc}"))
        except RowError as exc:
            bad.append(RowIssue(line, str(exc)))
    return good, bad


def load_seed_files(session: Session, data_dir: Path) -> dict[str, ImportReport]:
    """Upsert GPUs, models and tiers and append new prices; any bad row anywhere changes nothing."""
    data_dir = Path(data_dir)
    def read(name: str) -> str:
        return (data_dir / name).read_text(encoding="utf-8")

    parsed = {
        "gpus": parse_csv(read("gpus.csv"), GPU_FIELDS, GPU_OPTIONAL),
        "prices": parse_csv(read("prices.csv"), PRICE_FIELDS, PRICE_OPTIONAL),
        "models": _model_rows(data_dir),
        "tiers": _tier_rows(data_dir / "budget_tiers.yaml"),
    }
    reports = {part: ImportReport(errors=list(parsed[part][1])) for part in SEED_PARTS}
    if any(r.errors for r in reports.values()):
        return reports
    stages: dict[str, Callable[[dict[str, Any]], str]] = {
        "gpus": lambda v: catalog.upsert_gpu(session, v),
        "prices": lambda v: catalog.stage_price(session, v),
        "models": lambda v: catalog.upsert_model(session, v),
        "tiers": lambda v: catalog.upsert_tier(session, v),
    }
    nested = session.begin_nested()
    for part in SEED_PARTS:  # GPUs before prices: prices refer to them
        report = reports[part]
        for line, values in parsed[part][0]:
            try:
                outcome = stages[part](values)
            except catalog.CatalogWriteError as exc:
                report.errors.append(RowIssue(line, f"{exc.field}: {exc.message}"))
                continue
            setattr(report, outcome, getattr(report, outcome) + 1)
    if any(r.errors for r in reports.values()):
        nested.rollback()
        for r in reports.values():
            r.inserted = r.updated = r.unchanged = 0
        return reports
    nested.commit()
    if any(r.inserted or r.updated for r in reports.values()):
        summary = ", ".join(f"{p} +{reports[p].inserted}/~{reports[p].updated}" for p in SEED_PARTS)
        catalog.touch(session, f"seed load from {data_dir.name}/: {summary}")
    return reports


def seed_ok(reports: dict[str, ImportReport]) -> bool:
    """True when every part loaded without a rejected row."""
    return all(r.ok for r in reports.values())
