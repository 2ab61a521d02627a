"""Compare tunefit with published peak-memory measurements (data/published.yaml); prints markdown.

.venv/bin/python scripts/published_table.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.architecture import parse_config  # noqa: E402
from app.core.memory import MemoryEstimate, estimate_memory  # noqa: E402
from app.core.setup import TrainingSetup  # noqa: E402

GIB = float(1 << 30)


def _setup(raw: dict[str, Any], **over: Any) -> TrainingSetup:
    fields = {**raw, **over}
    if "lora_targets" in fields:
        fields["lora_targets"] = tuple(fields["lora_targets"])
    return TrainingSetup(**fields)


def _metric(est: MemoryEstimate, metric: str) -> float:
    """The part of the prediction that the published metric measures."""
    b = est.breakdown
    if metric == "nvidia_smi":
        return est.peak_bytes / GIB
    outside = ("cuda_context", "cuda_kernels_and_handles", "optimizer_states_paged")
    reserved = est.peak_bytes - sum(b.get(k, 0) for k in outside)
    if metric == "torch_reserved":
        return reserved / GIB
    cache = ("allocator_fragmentation", "cached_full_model_load")
    return (reserved - sum(b.get(k, 0) for k in cache)) / GIB


def _max_seq(arch: Any, raw: dict[str, Any], vram_gib: float) -> int:
    lo, hi = 1, 1 << 22
    while lo < hi:
        mid = (lo + hi + 1) // 2
        # "fits" on a real card: the allocator gives back its cache before it reports OOM
        if estimate_memory(arch, _setup(raw, seq_len=mid)).required_bytes <= vram_gib * GIB:
            lo = mid
        else:
            hi = mid - 1
    return lo


def main() -> None:
    """Print one row per published run."""
    data = yaml.safe_load((ROOT / "data" / "published.yaml").read_text())
    print("| id | metric | published | tunefit | difference |")
    print("|---|---|---:|---:|---:|")
    for run in data["runs"]:
        cfg = run.get("model_config") or json.loads(
            (ROOT / "data" / "models" / f"{run['model']}.json").read_text()
        )
        arch = parse_config(cfg)
        if run["metric"] == "max_seq_len_fits":
            pred = _max_seq(arch, run["setup"], run["vram_gib"])
            pub = run["value_tokens"]
            label = f"tokens fitting {run['vram_gib']:g} GiB"
            print(f"| {run['id']} | {label} | {pub:,} | {pred:,} | {pred / pub - 1:+.0%} |")
            continue
        est = estimate_memory(arch, _setup(run["setup"]))
        pred_gib = _metric(est, run["metric"])
        pub_gib = run["value_gib"]
        diff = pred_gib / pub_gib - 1
        print(f"| {run['id']} | {run['metric']} | {pub_gib:.2f} GiB | {pred_gib:.2f} GiB | {diff:+.0%} |")


if __name__ == "__main__":
    main()
