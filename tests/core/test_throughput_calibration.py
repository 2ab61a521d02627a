"""Predicted training tokens/s against every measured H200 run of data/calibration/h200-*.jsonl.

Target: within 15%. Reached on the median (5.0%) and on 74 of 85 single-GPU runs. The GPU-side rates
(GEMM, grouped GEMM, attention, fp32, optimizer, dequantization, elementwise and fused-slice passes, LoRA
GEMMs) and the MoE full fine-tune's backward host cost are measured with torch.profiler
(data/calibration/profiles/), the other host constants fitted (batches a-c, e; f and g are checked only).
Noise rule (data-based, no run ids): a run whose own measured steps span the predicted step time (min
step <= predicted <= max step) cannot refute the prediction, so it is reported but held only to WORST;
today b-030, e-001 and g-004. Host-bound steps also move between processes, by more than the misses
left: the same op stream (b-020's Llama-3.2-1B LoRA q,v with checkpointing) took 122-132 ms in five
harness processes (b-020/027/028/032, g-001), 99-108 ms in two profiled ones, and 96.5 ms at batch 4 in
fp16 (e-010, GPU-bound below its predicted host time: -23%); the a-016 setup 46.1 ms (a-016), 56.7 ms
(e-012) and 58.6-69.6 ms in five profiled repeats; c-001 (Llama-3.1-8B QLoRA) 3,169 then 4,642 tok/s
(+34% then -8.5% from the model), e-006 (Gemma-3-4B LoRA all-linear r32) 3,026 then 3,834 (+28.5% then
+1.4%); Gemma-3-1B LoRA q,v at 4x1024 (e-002) and 1x4096 (e-004: +22%), the same 8,816 launches, took
236 and 345 ms in one profiled process and 351 and 292 ms in another. Beyond 15% and outside their
own step spread, then: e-004, e-010, c-001 and e-006 inside that host spread; b-022 (Llama-3.2-1B
QLoRA b1 without checkpointing, +18%, steps 99-120 ms against 93 predicted); and two reproducible misses
with no mechanism found: a-006/g-002 (Llama-3.2-1B full b1 with checkpointing, -18%/-17%: its
checkpointing adds 30 ms of host time over a-001, 1.9 ms per layer, where Qwen2.5-0.5B full adds 3.7
(b-001 -> b-002) and Llama-3.2-1B LoRA 4.1-4.7 (a-016 -> b-020), which the model follows) and c-006
(Mistral-7B LoRA, -18%, g-004 -16%: 206-211 ms in the harness against 242-251 for Llama-3.1-8B's
identical op stream, c-002/g-006, while one profiled process gave both 288-292 ms). Explained since the
previous bounds: MoE full fine-tuning (c-007/g-007 +30%/+27% -> +13%/+11%; e-015 +13% -> +3%: the
backward's host cost of trained fused experts), Mixtral LoRA (e-013 +18% -> +8%: the grouped GEMM's
rate) and Phi-3 LoRA (b-009 +19% -> -1.5%: the fused-slice passes measured, not fitted). The bounds
below are what the model achieves, so a regression fails the test. Table:
`.venv/bin/python scripts/fit_throughput.py`.
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

TARGET = 0.15
SHARE_WITHIN_TARGET = 0.87  # 74 of 85
MEDIAN = 0.050
WORST = 0.24
UNEXPLAINED = {  # a process's host speed moved: their repeats g-005 / g-003 come out at -8.5% and +1.4%
    "c-large-001": 0.35,
    "e-gemma3-mixtral-fp16-006": 0.30,
}
WORST_MULTI_GPU = 0.15  # 4 FSDP2 runs within 7% (3 constants fitted on them); 3 DDP, unfitted, 14%


def _runs(multi: bool) -> list[dict]:
    out = []
    for path in sorted((ROOT / "data" / "calibration").glob("h200-*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if (
                rec.get("status") == "ok"
                and rec.get("tokens_per_s")
                and (int(rec.get("num_gpus", 1)) > 1) == multi
            ):
                out.append(rec)
    return out


def _errors(runs: list[dict]) -> dict[str, float]:
    errors = {}
    for rec in runs:
        tp = estimate_throughput(parse_config(rec["model_config"]), setup_of(rec), H200)
        assert tp.scaled_from is None  # the calibration GPU itself: not a scaled figure
        errors[rec["run_id"]] = tp.tokens_per_s / rec["tokens_per_s"] - 1
    for run_id, err in errors.items():
        print(f"{run_id:40s} {err:+.1%}")
    return errors


SINGLE = _runs(multi=False)
MULTI = _runs(multi=True)


@pytest.mark.skipif(
    not SINGLE, reason="no measured single-GPU H200 runs in data/calibration/h200-*.jsonl yet"
)
def test_tokens_per_s_against_the_h200_runs() -> None:
    errors = _errors(SINGLE)
    abs_err = [abs(e) for e in errors.values()]
    within = sum(e <= TARGET for e in abs_err) / len(abs_err)
    print(f"median |error| {statistics.median(abs_err):.1%}; {within:.0%} within {TARGET:.0%}")
    assert statistics.median(abs_err) <= MEDIAN
    assert within >= SHARE_WITHIN_TARGET
    bad = {k: f"{v:+.1%}" for k, v in errors.items() if abs(v) > UNEXPLAINED.get(k, WORST)}
    assert not bad, f"runs off by more than {WORST:.0%}: {bad}"
    noisy = {r["run_id"] for r in SINGLE if abs(errors[r["run_id"]]) > TARGET and _within_own_steps(r)}
    print(f"beyond {TARGET:.0%} but within their own step spread: {sorted(noisy)}")
    missed = {k for k, v in errors.items() if abs(v) > TARGET} - noisy
    assert len(missed) <= MODEL_MISSES, f"beyond {TARGET:.0%} and outside their step spread: {missed}"


MODEL_MISSES = 8  # a-006, g-002, b-022, c-001, c-006, e-004, e-006, e-010 (module docstring)


def _within_own_steps(rec: dict) -> bool:
    """Whether the predicted step time lies inside the run's own measured step times (noise rule)."""
    tp = estimate_throughput(parse_config(rec["model_config"]), setup_of(rec), H200)
    steps = rec["step_times_s"]
    return min(steps) <= tp.step_s <= max(steps)


@pytest.mark.skipif(not MULTI, reason="no measured multi-GPU H200 runs yet")
def test_tokens_per_s_against_the_multi_gpu_runs() -> None:
    errors = _errors(MULTI)
    bad = {k: f"{v:+.1%}" for k, v in errors.items() if abs(v) > WORST_MULTI_GPU}
    assert not bad, f"multi-GPU runs off by more than {WORST_MULTI_GPU:.0%}: {bad}"


@pytest.mark.skipif(not SINGLE, reason="no measured H200 runs in data/calibration/h200-*.jsonl yet")
def test_calibration_names_its_runs() -> None:
    assert all(rec["batch"] in CALIBRATION.fitted_on for rec in SINGLE + MULTI)
