"""Predict every measured run of the calibration set; the peak must be within 10%, median within 5%."""

from __future__ import annotations

import pytest

from app.core.calibration import compare, load_runs, markdown_table, summary

RUNS = load_runs()


@pytest.mark.skipif(not RUNS, reason="no measured runs in data/calibration/*.jsonl yet")
def test_calibration_accuracy() -> None:
    comparisons = [compare(r) for r in RUNS]
    print("\n" + markdown_table(comparisons))
    med, _worst = summary(comparisons)
    bad = [
        f"{c.run_id} {c.model} {c.setup.method}: {c.error:+.1%}" for c in comparisons if abs(c.error) > 0.10
    ]
    assert med <= 0.05, f"median |error| {med:.1%}"
    assert not bad, "runs off by more than 10%:\n" + "\n".join(bad)


@pytest.mark.skipif(not RUNS, reason="no measured runs in data/calibration/*.jsonl yet")
def test_calibration_param_counts() -> None:
    """The harness counts parameters on the real model; the core must agree exactly."""
    for rec in RUNS:
        c = compare(rec)
        assert c.predicted.params_total == rec["params_total"], c.run_id
        assert c.predicted.params_trainable == rec["params_trainable"], c.run_id
