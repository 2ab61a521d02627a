"""Predicted training tokens/s against every measured single-GPU H200 run: each within 15%.

The table is printed (pytest -s) and reproduced by `.venv/bin/python scripts/fit_throughput.py`.
"""

from __future__ import annotations

import json
import statistics

import pytest

from app.core.architecture import parse_config
from app.core.calibration import setup_of
from app.core.throughput import CALIBRATION, estimate_throughput
from tests.core.catalog_values import H200
from tests.core.helpers import ROOT

TOLERANCE = 0.15


def _runs() -> list[dict]:
    out = []
    for path in sorted((ROOT / "data" / "calibration").glob("h200-*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if rec.get("status") == "ok" and rec.get("tokens_per_s") and int(rec.get("num_gpus", 1)) == 1:
                out.append(rec)
    return out


RUNS = _runs()


@pytest.mark.skipif(not RUNS, reason="no measured H200 runs in data/calibration/h200-*.jsonl yet")
def test_tokens_per_s_within_15_percent_of_every_h200_run() -> None:
    errors = {}
    for rec in RUNS:
        tp = estimate_throughput(parse_config(rec["model_config"]), setup_of(rec), H200)
        errors[rec["run_id"]] = tp.tokens_per_s / rec["tokens_per_s"] - 1
        assert tp.scaled_from is None  # the calibration GPU itself: not a scaled figure
    for run_id, err in errors.items():
        print(f"{run_id:40s} {err:+.1%}")
    print(f"median |error| {statistics.median(abs(e) for e in errors.values()):.1%}")
    bad = {k: f"{v:+.1%}" for k, v in errors.items() if abs(v) > TOLERANCE}
    assert not bad, f"runs off by more than {TOLERANCE:.0%}: {bad}"


@pytest.mark.skipif(not RUNS, reason="no measured H200 runs in data/calibration/h200-*.jsonl yet")
def test_calibration_names_its_runs() -> None:
    batches = {rec["batch"] for rec in RUNS}
    assert any(b in CALIBRATION.fitted_on for b in batches)
