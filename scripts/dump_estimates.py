"""Dump estimate_memory's full output over a fixed grid of setups and every calibration run, as JSON.

.venv/bin/python scripts/dump_estimates.py OUT.json [--n 5000] [--seed 0] [--python]
.venv/bin/python scripts/dump_estimates.py --compare A.json B.json

A speed change must leave every estimate byte-identical: dump before, dump after, compare (the
grid is sampled with a fixed seed over models x methods x precisions x optimizers x checkpointing x
attention x GPUs/parallelism, each at several batch x seq, so two dumps hold the same setups).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core import calibration, trace  # noqa: E402
from app.core.architecture import Architecture, parse_config  # noqa: E402
from app.core.errors import CoreInputError  # noqa: E402
from app.core.memory import MemoryEstimate, estimate_memory  # noqa: E402
from app.core.setup import (  # noqa: E402
    ATTENTIONS,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    TrainingSetup,
)

BATCHES = (1, 2, 3, 4, 5, 6, 7, 8)
SEQS = (128, 200, 256, 512, 777, 1000, 1024, 2048, 3000, 4096, 8192)
GPUS = ((1, "ddp"), (2, "ddp"), (2, "fsdp"), (4, "fsdp"), (2, "zero2"), (2, "zero3"), (8, "zero3"))
TARGETS = (("q_proj", "v_proj"), ("all-linear",))
BATCHES_PER_SETUP = 7


def _models() -> dict[str, Architecture]:
    return {
        p.stem: parse_config(json.loads(p.read_text()))
        for p in sorted((ROOT / "data" / "models").glob("*.json"))
    }


def grid(n: int, seed: int) -> list[tuple[str, TrainingSetup]]:
    """About `n` (model, setup) pairs drawn with a fixed seed: setups drawn whole, each then at
    BATCHES_PER_SETUP batch x seq (a search's pattern, which the replay serves from a template)."""
    rng = random.Random(seed)
    models = sorted(p.stem for p in (ROOT / "data" / "models").glob("*.json"))
    out: list[tuple[str, TrainingSetup]] = []
    while len(out) < n:
        gpus, par = rng.choice(GPUS)
        slug = rng.choice(models)
        try:
            base = TrainingSetup(
                rng.choice(METHODS),  # type: ignore[arg-type]
                precision=rng.choice(PRECISIONS),  # type: ignore[arg-type]
                optimizer=rng.choice(OPTIMIZERS),  # type: ignore[arg-type]
                gradient_checkpointing=rng.random() < 0.6,
                attention=rng.choice(ATTENTIONS),  # type: ignore[arg-type]
                lora_targets=rng.choice(TARGETS),
                num_gpus=gpus,
                parallelism=par,  # type: ignore[arg-type]
                full_model_load_per_gpu=gpus > 1 and rng.random() < 0.3,
            )
        except CoreInputError:
            continue
        for _ in range(BATCHES_PER_SETUP):
            setup = replace(base, batch_size=rng.choice(BATCHES), seq_len=rng.choice(SEQS))
            out.append((slug, setup))
    return out


def record(est: MemoryEstimate) -> dict[str, Any]:
    """Everything an estimate says, as JSON."""
    return {
        "peak": est.peak_bytes,
        "breakdown": est.breakdown,
        "params": [est.params_total, est.params_trainable],
        "warnings": [[w.code, w.message] for w in est.warnings],
        "assumptions": list(est.assumptions),
    }


def dump(n: int, seed: int) -> dict[str, Any]:
    """The grid's and the calibration runs' estimates, keyed by a stable label."""
    models = _models()
    out: dict[str, Any] = {}
    for i, (slug, setup) in enumerate(grid(n, seed)):
        key = f"grid{i} {slug} {setup}"
        try:
            out[key] = record(estimate_memory(models[slug], setup))
        except CoreInputError as e:
            out[key] = {"error": str(e)}
    for rec in calibration.load_runs():
        out[f"run {rec['run_id']}"] = record(calibration.compare(rec).predicted)
    return out


def compare(a: Path, b: Path) -> int:
    """Print the keys whose estimates differ; the count."""
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    diff = [k for k in x.keys() | y.keys() if x.get(k) != y.get(k)]
    for k in sorted(diff)[:20]:
        print("DIFF", k, x.get(k), y.get(k))
    print(f"{len(x)} vs {len(y)} entries, {len(diff)} differ")
    return len(diff)


def main() -> None:
    """Dump, or compare two dumps."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--python", action="store_true", help="use the Python allocator replay")
    parser.add_argument("--compare", nargs=2, type=Path)
    args = parser.parse_args()
    if args.compare:
        sys.exit(1 if compare(*args.compare) else 0)
    if args.python:
        trace._replay = None  # type: ignore[assignment]
    Path(args.out).write_text(json.dumps(dump(args.n, args.seed), sort_keys=True))


if __name__ == "__main__":
    main()
