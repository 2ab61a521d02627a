"""Print microseconds per estimate_memory call (a script, not a timed test).

.venv/bin/python scripts/bench_core.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.architecture import parse_config  # noqa: E402
from app.core.memory import estimate_memory  # noqa: E402
from app.core.setup import TrainingSetup  # noqa: E402


def main() -> None:
    """Time a mix of setups on a few architectures."""
    archs = [
        parse_config(json.loads((ROOT / "data" / "models" / f"{s}.json").read_text()))
        for s in ("llama-3.1-8b", "qwen3-30b-a3b", "gemma-2-9b", "phi-3-mini-4k-instruct")
    ]
    setups = [
        TrainingSetup("full", precision="amp_bf16", batch_size=4, seq_len=512),
        TrainingSetup("lora", lora_targets=("all-linear",), gradient_checkpointing=False),
        TrainingSetup("qlora", batch_size=4, seq_len=512, optimizer="paged_adamw_8bit"),
        TrainingSetup("full", num_gpus=8, parallelism="zero3", attention="eager"),
    ]
    pairs = [
        (a, s)
        for a in archs
        for s in setups
        if s.method == "full" or a.family != "phi3" or s.lora_targets == ("all-linear",)
    ]
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        for a, s in pairs:
            estimate_memory(a, s)
            n += 1
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(200):
        parse_config(json.loads((ROOT / "data" / "models" / "llama-3.1-8b.json").read_text()))
    parse_us = (time.perf_counter() - t1) / 200 * 1e6
    print(f"estimate_memory: {dt / n * 1e6:.1f} us/estimate over {n} calls; parse_config: {parse_us:.1f} us")


if __name__ == "__main__":
    main()
