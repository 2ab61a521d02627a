"""Predict every measured run of the calibration set; the peak must be within 10%, median within 5%."""

from __future__ import annotations

import pytest

from app.core.calibration import compare, load_runs, markdown_table, summary

RUNS = load_runs()

# Runs over 10% whose cause is found but not yet modelled, each bounded (a test below fails when one is
# fixed, so it leaves this list).  None now: c-large-008 (Qwen3-30B-A3B cut to 8 layers, LoRA) was -10.2%
# while the MoE checkpoint conversion at load was only estimated; replayed (loading._convert_experts,
# from its allocation trace) it is -6.4%.
# o-multi-blind-007 (Qwen3-8B LoRA all-linear, ZeRO-3 on two GPUs, predicted blind at -11.7%) is -9.8%
# with DeepSpeed's own NCCL bytes measured per engine (allocator.NCCL_BYTES_BY_ENGINE); what stays is the
# caching allocator's free-in-segment bytes under ZeRO-3 (reserved 23.97 GiB for 18.11 allocated).
KNOWN_MISSES: dict[str, float] = {}


@pytest.mark.skipif(not RUNS, reason="no measured runs in data/calibration/*.jsonl yet")
def test_calibration_accuracy() -> None:
    comparisons = [compare(r) for r in RUNS]
    print("\n" + markdown_table(comparisons))
    med, _worst = summary(comparisons)
    bad = [
        f"{c.run_id} {c.model} {c.setup.method}: {c.error:+.1%}"
        for c in comparisons
        if abs(c.error) > 0.10 and c.run_id not in KNOWN_MISSES
    ]
    assert med <= 0.05, f"median |error| {med:.1%}"
    assert not bad, "runs off by more than 10%:\n" + "\n".join(bad)


@pytest.mark.skipif(not RUNS, reason="no measured runs in data/calibration/*.jsonl yet")
def test_known_misses_are_still_missed_and_bounded() -> None:
    found = {c.run_id: c.error for c in (compare(r) for r in RUNS) if c.run_id in KNOWN_MISSES}
    assert found.keys() == KNOWN_MISSES.keys()
    for run_id, error in found.items():
        assert 0.10 < abs(error) <= KNOWN_MISSES[run_id], f"{run_id}: {error:+.1%}"


@pytest.mark.skipif(not RUNS, reason="no measured runs in data/calibration/*.jsonl yet")
def test_calibration_param_counts() -> None:
    """The harness counts parameters on the real model; the core must agree exactly."""
    for rec in RUNS:
        c = compare(rec)
        assert c.predicted.params_total == rec["params_total"], c.run_id
        assert c.predicted.params_trainable == rec["params_trainable"], c.run_id


def _all_lines() -> list[dict]:
    import json

    from app.core.calibration import CALIBRATION_DIR

    lines = []
    for path in sorted(CALIBRATION_DIR.glob("h200-*.jsonl")):
        lines += [json.loads(t) for t in path.read_text().splitlines() if t.strip()]
    return lines


def test_fit_decisions_against_the_card() -> None:
    """Every run that ran out of memory is predicted not to fit its card; no run that fit is predicted
    more than 2% over it (batch i: 125.86 and 139.42 GiB measured on a 140.40 GiB H200, batch 12 OOM)."""
    from app.core.architecture import parse_config
    from app.core.calibration import setup_of
    from app.core.memory import estimate_memory

    lines = [r for r in _all_lines() if int(r.get("num_gpus", 1)) == 1 and r.get("gpu_total_memory")]
    ooms = [r for r in lines if r["status"] == "oom"]
    assert ooms, "the calibration set has an out-of-memory run (h200-i-fit-limit)"
    for rec in lines:
        peak = estimate_memory(parse_config(rec["model_config"]), setup_of(rec)).peak_bytes
        total = rec["gpu_total_memory"]
        if rec["status"] == "oom":
            assert peak > total, rec["run_id"]
        elif rec["status"] == "ok":
            assert peak <= total * 1.02, rec["run_id"]
