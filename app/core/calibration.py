"""The calibration set: measured runs (data/calibration/*.jsonl) and the core's prediction of each."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.architecture import parse_config
from app.core.memory import MemoryEstimate, estimate_memory
from app.core.setup import TrainingSetup

CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "data" / "calibration"


@dataclass(frozen=True)
class Comparison:
    """One measured run next to its prediction (bytes)."""

    run_id: str
    model: str
    setup: TrainingSetup
    measured_bytes: int
    predicted: MemoryEstimate
    record: Mapping[str, Any]

    @property
    def error(self) -> float:
        """Signed relative error of the predicted peak against NVML's measured peak."""
        return self.predicted.peak_bytes / self.measured_bytes - 1


def load_runs(paths: Iterable[Path] | None = None) -> list[dict[str, Any]]:
    """Every line with status ok and an NVML peak, from the given or all calibration JSONL files."""
    files = sorted(paths) if paths is not None else sorted(CALIBRATION_DIR.glob("*.jsonl"))
    runs: list[dict[str, Any]] = []
    for path in files:
        for n, text in enumerate(path.read_text().splitlines(), 1):
            if not text.strip():
                continue
            rec = json.loads(text)
            if rec.get("status") == "ok" and rec.get("nvml_peak_used"):
                rec.setdefault("run_id", f"{path.stem}:{n}")
                rec["_source"] = f"{path.name}:{n}"
                runs.append(rec)
    return runs


def setup_of(rec: Mapping[str, Any]) -> TrainingSetup:
    """The TrainingSetup a measured run used."""
    targets = rec.get("lora_targets") or ("q_proj", "v_proj")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    rank = int(rec.get("lora_rank", 16))
    return TrainingSetup(
        method=rec["method"],
        precision=rec.get("precision", "bf16"),
        optimizer=rec.get("optimizer", "adamw"),
        batch_size=int(rec.get("batch_size", 1)),
        seq_len=int(rec.get("seq_len", 2048)),
        gradient_checkpointing=bool(rec.get("gradient_checkpointing", True)),
        attention=rec.get("attention", "sdpa"),
        lora_rank=rank,
        lora_alpha=int(rec.get("lora_alpha") or 2 * rank),
        lora_targets=tuple(targets),
        double_quant=bool(rec.get("double_quant", True)),
        num_gpus=int(rec.get("num_gpus", 1)),
        parallelism=rec.get("parallelism", "ddp"),
        # The harness loads the whole model onto each rank's GPU (device_map {'': rank}) before sharding.
        full_model_load_per_gpu=int(rec.get("num_gpus", 1)) > 1
        and str((rec.get("settings") or {}).get("device_map", "")).startswith("{"),
    )


def compare(rec: Mapping[str, Any]) -> Comparison:
    """Predict one measured run from its inputs only (never from its measurements)."""
    arch = parse_config(rec["model_config"])
    setup = setup_of(rec)
    return Comparison(
        run_id=str(rec.get("run_id")),
        model=str(rec.get("model") or rec["model_config"].get("model_type")),
        setup=setup,
        measured_bytes=int(rec["nvml_peak_used"]),
        predicted=estimate_memory(arch, setup),
        record=rec,
    )


def summary(comparisons: list[Comparison]) -> tuple[float, float]:
    """(median |error|, max |error|) over the comparisons."""
    errs = [abs(c.error) for c in comparisons]
    return statistics.median(errs), max(errs)


def settings_label(s: TrainingSetup) -> str:
    """A short human description of a setup for tables."""
    parts = [
        s.precision,
        s.optimizer,
        f"b{s.batch_size}",
        f"s{s.seq_len}",
        "gc" if s.gradient_checkpointing else "no-gc",
    ]
    if s.attention != "sdpa":
        parts.append(s.attention)
    if s.method != "full":
        targets = (
            "all"
            if s.lora_targets == ("all-linear",)
            else "+".join(t.removesuffix("_proj") for t in s.lora_targets)
        )
        parts.append(f"r{s.lora_rank} {targets}")
    if s.method == "qlora" and not s.double_quant:
        parts.append("no-dq")
    if s.num_gpus > 1:
        parts.append(f"{s.num_gpus}x {s.parallelism}")
    return " ".join(parts)


def markdown_table(comparisons: list[Comparison]) -> str:
    """The accuracy table for the README (GiB = 2^30 bytes)."""
    gib = float(1 << 30)
    lines = [
        "| run | model | method | settings | measured GiB | predicted GiB | error |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.run_id} | {c.model} | {c.setup.method} | {settings_label(c.setup)} | "
            f"{c.measured_bytes / gib:.2f} | {c.predicted.peak_bytes / gib:.2f} | {c.error:+.1%} |"
        )
    if comparisons:
        med, worst = summary(comparisons)
        lines.append("")
        lines.append(f"{len(comparisons)} runs: median |error| {med:.1%}, max |error| {worst:.1%}.")
    return "\n".join(lines)
