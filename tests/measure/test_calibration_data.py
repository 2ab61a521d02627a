"""The committed calibration set: each line matches its batch's plan, is self-consistent, covers the terms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from app.measure.spec import load_plan

CAL = Path(__file__).parents[2] / "data" / "calibration"
FILES = sorted(CAL.glob("h200-*.jsonl"))
LINES = [(f, json.loads(x)) for f in FILES for x in f.read_text().splitlines() if x.strip()]
INPUTS = ("model", "method", "precision", "optimizer", "batch_size", "seq_len", "gradient_checkpointing",
          "attention", "lora_rank", "lora_alpha", "double_quant", "num_gpus", "parallelism", "steps")


def test_there_is_a_calibration_set() -> None:
    assert len(LINES) >= 40
    assert len({x["run_id"] for _, x in LINES}) == len(LINES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_line_is_a_run_of_its_plan(path: Path) -> None:
    batch = path.stem.removeprefix("h200-")
    name, specs, _ = load_plan(CAL / "plans" / f"{batch}.json")
    for line in (json.loads(x) for x in path.read_text().splitlines()):
        assert line["schema_version"] == 1 and line["batch"] == name
        idx = int(line["run_id"].removeprefix(f"{name}-")) - 1
        spec = specs[idx].inputs()
        assert {k: line[k] for k in INPUTS} == {k: spec[k] for k in INPUTS}, line["run_id"]
        assert line["lora_targets"] == spec["lora_targets"]
        assert f"--plan data/calibration/plans/{batch}.json" in line["command"]


@pytest.mark.parametrize(("path", "line"), LINES, ids=[x["run_id"] for _, x in LINES])
def test_measured_numbers_are_consistent(path: Path, line: dict) -> None:
    assert line["gpu_name"] == "NVIDIA H200" and line["gpu_total_memory"] == 143771 * 2**20
    assert line["versions"]["torch"].startswith("2.11.0") and line["versions"]["bitsandbytes"] == "0.50.2"
    if line["status"] != "ok":
        return
    used = line["nvml_peak_used"] - line["nvml_baseline_used"]
    byte_fields = ("nvml_peak_used", "torch_peak_reserved", "torch_peak_allocated", "cuda_context_bytes")
    assert all(isinstance(line[k], int) for k in byte_fields)
    assert used >= line["torch_peak_reserved"] >= line["torch_peak_allocated"] > 0
    assert line["cuda_context_bytes"] > 0
    n = line["batch_size"] * line["seq_len"] * line["num_gpus"]
    assert line["tokens_per_s"] == pytest.approx(n / line["median_step_s"], rel=1e-3)
    assert len(line["step_times_s"]) == line["steps"] - 1
    # Pure fp16 full fine-tuning with AdamW has no loss scaling and eps=1e-8 underflows to 0 in fp16:
    # e-gemma3-mixtral-fp16-008 turns NaN after its first step. NaNs cost the same FLOPs and bytes, so
    # its memory and speed stay valid; every other run must stay finite.
    nan_ok = line["precision"] == "fp16" and line["method"] == "full"
    assert math.isfinite(line["losses"][0]) and (nan_ok or all(math.isfinite(v) for v in line["losses"]))
    assert 0 < line["params_trainable"] <= line["params_total"]


def test_the_set_covers_every_term_of_the_memory_model() -> None:
    ok = [x for _, x in LINES if x["status"] == "ok"]
    def seen(key: str) -> set:
        return {x[key] for x in ok}
    assert seen("method") == {"full", "lora", "qlora"}
    assert {"bf16", "amp_bf16"} <= seen("precision")
    assert {"adamw", "adamw_8bit", "paged_adamw_8bit"} <= seen("optimizer")
    assert seen("gradient_checkpointing") == {True, False} and {"sdpa", "eager"} <= seen("attention")
    assert len(seen("batch_size")) >= 3 and len(seen("seq_len")) >= 3 and len(seen("lora_rank")) >= 3
    assert len({x["model_config"]["model_type"] for x in ok}) >= 6
    vocabs = {x["model_config"]["vocab_size"] for x in ok}
    assert min(vocabs) <= 32768 and max(vocabs) >= 256000
    assert {x["model_config"].get("tie_word_embeddings", False) for x in ok} == {True, False}
    assert any("num_experts" in x["model_config"] for x in ok)
    sizes = [x["params_total"] for x in ok]
    assert min(sizes) < 0.6e9 and max(sizes) >= 14e9
    assert any(x["num_gpus"] == 2 and x["parallelism"] == "fsdp" for x in ok)
