"""The allocator replica against real allocation traces: fed a run's own recorded allocations and frees
(data/calibration/profiles/trace-*.jsonl.gz, recorded on the H200 by profiles/m-trace.py), it must reserve
what PyTorch's caching allocator reserved after each of the three steps."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from app.core.allocsim import AllocatorSim

PROFILES = Path(__file__).resolve().parents[2] / "data" / "calibration" / "profiles"
TRACES = sorted(PROFILES.glob("trace-*.jsonl.gz"))
# The replica lacks a placement rule of CUDACachingAllocator that this run hits: fed its own events it
# reserves 19.59 GiB where the real allocator reserved 23.63 (tests/core/test_calibration.py names it).
DIVERGES = {"e-gemma3-mixtral-fp16-007"}


def _replay(path: Path) -> tuple[dict, dict[str, int]]:
    """(the trace's header, the replica's reserved bytes at each step's end)."""
    with gzip.open(path, "rt") as f:
        head = json.loads(f.readline())
        ends = {v: k for k, v in head["marks"].items() if k.startswith("step")}
        sim = AllocatorSim()
        handles: dict[int, int] = {}
        reserved: dict[str, int] = {}
        for i, line in enumerate(f, 1):
            action, size, addr, _stream, _label = json.loads(line)
            if action == "alloc":
                sim.handles += 1
                handles[addr] = sim.handles
                sim.malloc(sim.handles, size)
            elif action == "free_completed" and addr in handles:
                sim.free(handles.pop(addr))
            if i in ends:
                reserved[ends[i]] = sim.reserved
    return head, reserved


def test_there_are_traces() -> None:
    assert len(TRACES) >= 13


@pytest.mark.parametrize("path", TRACES, ids=[p.name[6:-9] for p in TRACES])
def test_replica_reserves_what_the_allocator_reserved(path: Path) -> None:
    head, reserved = _replay(path)
    real = [s["reserved"] for s in head["steps"]]
    got = [reserved[f"step{n}"] for n in (1, 2, 3)]
    if head["run_id"] in DIVERGES:
        assert got[2] < real[2] - 2**32  # still missing the real 4 GiB segment of the second step
        return
    # the replica counts the small pool (<= 1 MiB blocks) by its peak bytes in 2 MiB segments, not block
    # by block: 12 traces agree to 4 MiB, l-blind-load-005 (Phi-3, 82 MiB over) is the widest
    for g, r in zip(got, real, strict=True):
        assert abs(g - r) <= 96 * 2**20, (got, real)
