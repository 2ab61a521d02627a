"""Print microseconds per estimate_memory call, cold and warm (a script, not a timed test).

.venv/bin/python scripts/bench_core.py [--python]

--python: time the Python allocator replay (the fallback where app/core/_replay.c was not compiled).

cold: every call is a setup the process has not seen (Llama-3.1-8B QLoRA over batch x seq, and the
same with every core cache cleared before each call); warm: a mix of setups estimated again and again.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402

from app.core import activations as act  # noqa: E402
from app.core import fragment, loading, memory, params, throughput, trace, zero  # noqa: E402
from app.core.architecture import Architecture, parse_config  # noqa: E402
from app.core.memory import estimate_memory  # noqa: E402
from app.core.setup import TrainingSetup  # noqa: E402


def clear_core_caches() -> None:
    """Forget every per-process cache of the core (replays, static terms, loaded weights, work)."""
    fragment.fragmentation.cache_clear()
    fragment._dequant.cache_clear()
    fragment._param_shapes.cache_clear()
    fragment._shape.cache_clear()
    fragment._unit_batch.cache_clear()
    fragment._setup_of.cache_clear()
    loading._stages.cache_clear()
    loading._ddp_buckets.cache_clear()
    loading._script.cache_clear()
    loading.model_tensors.cache_clear()
    loading._layer_linears.cache_clear()
    loading._layer_tensors.cache_clear()
    loading._checkpoint_order.cache_clear()
    memory._static.cache_clear()
    memory._shape_key.cache_clear()
    act._shape_of.cache_clear()
    act._dtypes.cache_clear()
    act.layer_activations.cache_clear()
    memory._single_gpu.cache_clear()
    zero.zero_terms.cache_clear()
    zero.engine_setup.cache_clear()
    trace._loaded.cache_clear()
    trace._loaded_c.cache_clear()
    trace._optimizer_tensors.cache_clear()
    trace._grad_bytes.cache_clear()
    params.param_groups.cache_clear()
    throughput._work.cache_clear()


def _model(slug: str) -> Architecture:
    return parse_config(json.loads((ROOT / "data" / "models" / f"{slug}.json").read_text()))


def cold(arch: Architecture, clear_each: bool) -> list[float]:
    """Microseconds of estimate_memory for 40 setups never seen before (QLoRA, batch x seq)."""
    clear_core_caches()
    times = []
    for b in (1, 2, 3, 4, 5, 6, 7, 8):
        for s in (256, 512, 1000, 2048, 4096):
            if clear_each:
                clear_core_caches()
            setup = TrainingSetup("qlora", batch_size=b, seq_len=s)
            t0 = time.perf_counter()
            estimate_memory(arch, setup)
            times.append((time.perf_counter() - t0) * 1e6)
    return times


def main() -> None:
    """Time cold setups on Llama-3.1-8B, then a warm mix of setups on a few architectures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python", action="store_true", help="use the Python allocator replay")
    if parser.parse_args().python:
        trace._replay = None  # type: ignore[assignment]
    print("allocator replay:", "C (app/core/_replay.c)" if trace._replay is not None else "Python (trace.py)")
    llama = _model("llama-3.1-8b")
    for label, clear_each in (("new setups", False), ("all caches cleared", True)):
        t = cold(llama, clear_each)
        print(
            f"cold ({label}, llama-3.1-8b qlora, {len(t)} batch x seq): "
            f"median {statistics.median(t):.0f} us, max {max(t):.0f} us"
        )
    archs = [llama] + [_model(s) for s in ("qwen3-30b-a3b", "gemma-2-9b", "phi-3-mini-4k-instruct")]
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
    for a, s in pairs:  # first sight: the replays, not timed here
        estimate_memory(a, s)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        for a, s in pairs:
            estimate_memory(a, s)
            n += 1
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(200):
        _model("llama-3.1-8b")
    parse_us = (time.perf_counter() - t1) / 200 * 1e6
    print(f"warm (same setups again): {dt / n * 1e6:.1f} us/estimate over {n} calls")
    print(f"parse_config + read: {parse_us:.1f} us")


if __name__ == "__main__":
    main()
