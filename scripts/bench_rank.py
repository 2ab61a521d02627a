"""Time ranking the whole seed catalog x 1/2/4/8 GPUs for one request, and whole estimates (ms).

.venv/bin/python scripts/bench_rank.py [--repeat 20]

cold: every core cache cleared before each call (an API process's first request for a setup);
warm: the same call repeated (the replays cached).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.estimate import estimate  # noqa: E402
from app.core.ranking import Job, rank  # noqa: E402
from app.core.setup import TrainingSetup  # noqa: E402
from scripts.bench_core import clear_core_caches  # noqa: E402
from tests.core.catalog_values import seed_gpus, seed_prices, seed_tiers  # noqa: E402
from tests.core.helpers import arch, config  # noqa: E402

CASES = {
    "llama-3.1-8b qlora b4 s512": ("llama-3.1-8b", TrainingSetup(method="qlora", batch_size=4, seq_len=512)),
    "mistral-7b full amp b4 s512": (
        "mistral-7b-v0.3",
        TrainingSetup(method="full", precision="amp_bf16", batch_size=4, seq_len=512),
    ),
    "llama-3.1-70b lora b1 s2048": (
        "llama-3.1-70b",
        TrainingSetup(method="lora", batch_size=1, seq_len=2048),
    ),
}


def _ms(fn, repeat: int, cold: bool = False) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        if cold:
            clear_core_caches()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times)


def main() -> None:
    """Time rank() and whole estimates (cold and warm) on the seed catalog; print median and worst ms."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    gpus, prices, tiers = seed_gpus(), seed_prices(), seed_tiers()
    print(f"catalog: {len(gpus)} GPUs x counts 1/2/4/8, {len(prices)} prices")
    for name, (slug, setup) in CASES.items():
        a = arch(slug)
        med, worst = _ms(lambda a=a, setup=setup: rank(a, setup, gpus, prices, Job(10_000, 3)), args.repeat)
        rows = len(rank(a, setup, gpus, prices))
        print(f"rank   {name:32s} {rows} rows: median {med:6.1f} ms, worst {worst:6.1f} ms")
    for name, kwargs in {
        "estimate 70B, method+gpu open": {"config": config("llama-3.1-70b"), "dataset_samples": 10_000},
        "estimate 8B, method+gpu open": {
            "config": config("llama-3.1-8b"),
            "batch_size": 4,
            "seq_len": 512,
            "dataset_samples": 5_000,
            "epochs": 3,
        },
    }.items():
        for cold in (True, False):
            med, worst = _ms(
                lambda kw=kwargs: estimate(gpus=gpus, prices=prices, tiers=tiers, **kw),
                max(3, args.repeat // 4) if cold else args.repeat,
                cold,
            )
            label = "cold" if cold else "warm"
            print(f"{name:33s} {label}: median {med:6.1f} ms, worst {worst:6.1f} ms")


if __name__ == "__main__":
    main()
