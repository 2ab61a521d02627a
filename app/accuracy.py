"""Service view of the calibration set: each measured run's peak next to the core's prediction."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from app.core.calibration import Comparison, compare, load_runs, settings_label
from app.core.errors import CoreInputError

GIB = float(1 << 30)
STACK_KEYS = ("torch", "transformers", "peft", "bitsandbytes", "cuda", "python")


def _row(c: Comparison) -> dict[str, Any]:
    """One run as the page and tests read it (GiB = 2^30 bytes, error in percent)."""
    return {
        "run_id": c.run_id,
        "model": c.model,
        "method": c.setup.method,
        "settings": settings_label(c.setup),
        "measured_gib": round(c.measured_bytes / GIB, 2),
        "predicted_gib": round(c.predicted.peak_bytes / GIB, 2),
        "error_pct": round(100 * c.error, 1) + 0.0,  # + 0.0: no "-0.0"
        "gpu_name": c.record.get("gpu_name"),
    }


def _stack(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The measured stack: every distinct version, GPU and driver seen in the runs."""
    versions: dict[str, set[str]] = {k: set() for k in STACK_KEYS}
    gpus: set[str] = set()
    drivers: set[str] = set()
    for rec in records:
        for key, value in (rec.get("versions") or {}).items():
            if key in versions and value:
                versions[key].add(str(value))
        if rec.get("gpu_name"):
            gpus.add(str(rec["gpu_name"]))
        if rec.get("driver"):
            drivers.add(str(rec["driver"]))
    return {
        "versions": {k: sorted(v) for k, v in versions.items() if v},
        "gpus": sorted(gpus),
        "drivers": sorted(drivers),
    }


def accuracy_report(paths: Iterable[Path] | None = None) -> dict[str, Any]:
    """Rows (measured vs predicted peak per run), a summary and the reference stack."""
    records = load_runs(paths)
    comparisons: list[Comparison] = []
    skipped: list[str] = []
    for rec in records:
        try:
            comparisons.append(compare(rec))
        except (CoreInputError, KeyError, ValueError) as exc:
            # A run the current core cannot read is listed, not hidden.
            skipped.append(f"{rec.get('run_id')}: {exc}")
    rows = [_row(c) for c in comparisons]
    errors = [abs(c.error) for c in comparisons]
    summary = None
    if errors:
        summary = {
            "runs": len(errors),
            "median_abs_error_pct": round(100 * statistics.median(errors), 1),
            "max_abs_error_pct": round(100 * max(errors), 1),
            "within_5_pct": sum(1 for e in errors if e <= 0.05),
            "within_10_pct": sum(1 for e in errors if e <= 0.10),
            "under_predicted": sum(1 for c in comparisons if c.error < 0),
        }
    return {"rows": rows, "summary": summary, "stack": _stack(records), "skipped": skipped}
