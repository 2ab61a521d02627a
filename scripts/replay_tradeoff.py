"""What the allocator replay costs (time) and buys (accuracy): the numbers behind README's "Speed".

.venv/bin/python scripts/replay_tradeoff.py

Prints the calibration set's memory errors three ways: the core as it is (the allocator replay of
fragment.py), the core with the replayed fragmentation left out, and the same plus the single
proportional overhead that fits the calibration set best (what a fast closed-form calculator could
at most do with one fitted constant); then the replay's share of a cold estimate's time.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core import fragment, memory  # noqa: E402
from app.core.calibration import Comparison, compare, load_runs  # noqa: E402
from scripts.bench_core import _model, cold  # noqa: E402


def _summary(errors: list[float]) -> str:
    e = [abs(x) * 100 for x in errors]
    return (
        f"median |error| {statistics.median(e):4.1f}%, max {max(e):5.1f}%, "
        f"over 5%: {sum(x > 5 for x in e):2d}, over 10%: {sum(x > 10 for x in e):2d} of {len(e)}"
    )


def _without_replay(arch, setup, targets):  # type: ignore[no-untyped-def]
    """fragment.fragmentation with its reserved-minus-allocated term set to zero."""
    alloc, _, _ = fragment.fragmentation(arch, setup, targets)
    return alloc, alloc, 0


def _accuracy() -> None:
    runs = load_runs()
    with_replay = [compare(r) for r in runs]
    memory.fragmentation = _without_replay  # type: ignore[assignment]
    try:
        without = [compare(r) for r in runs]
    finally:
        memory.fragmentation = fragment.fragmentation
    print(f"calibration runs: {len(runs)} (memory, H200)")
    print(f"  with the allocator replay:           {_summary([c.error for c in with_replay])}")
    print(f"  without it (no fragmentation term):  {_summary([c.error for c in without])}")
    best = min(
        ((k, [_scaled(c, k) for c in without]) for k in (i / 200 for i in range(0, 81))),
        key=lambda kv: statistics.median(abs(x) for x in kv[1]),
    )
    print(f"  without it, best fitted overhead {best[0]:.1%}: {_summary(best[1])}")


def _scaled(c: Comparison, k: float) -> float:
    return c.predicted.peak_bytes * (1 + k) / c.measured_bytes - 1


def _timing(clear_each: bool) -> None:
    """Median microseconds of bench_core's cold estimates, with the replay and with a stub for it."""
    llama = _model("llama-3.1-8b")
    real = fragment.simulate
    with_replay = statistics.median(cold(llama, clear_each))
    fragment.simulate = lambda plan, steps=2: (0, 0)  # a zero-cost stand-in isolates the replay's share
    try:
        stubbed = statistics.median(cold(llama, clear_each))
    finally:
        fragment.simulate = real
    label = "every core cache cleared" if clear_each else "new batch x seq, model seen"
    print(f"cold estimate ({label}), llama-3.1-8b qlora: median {with_replay:.0f} us, ", end="")
    print(f"replay stubbed {stubbed:.0f} us")


if __name__ == "__main__":
    _accuracy()
    _timing(clear_each=False)
    _timing(clear_each=True)
