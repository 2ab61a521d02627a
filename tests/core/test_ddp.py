"""DistributedDataParallel's wrap and buckets (app/core/ddp.py) against torch's rules and the DDP runs."""

from __future__ import annotations

import pytest

from app.core import activations as act
from app.core import ddp, loading
from app.core.allocsim import AllocatorSim
from app.core.architecture import parse_config
from app.core.calibration import load_runs, setup_of
from app.core.memory import _single_gpu
from app.core.trace import run_script

MIB = 1 << 20
DDP_RUNS = [r for r in load_runs() if r.get("parallelism") == "ddp" and r.get("num_gpus", 1) > 1]


def test_groups_close_once_they_reach_their_limit_per_dtype() -> None:
    tensors = [(600 * 1024, 2), (600 * 1024, 2), (30 * MIB, 2), (4, 4), (10 * MIB, 2), (20 * MIB, 2)]
    # the 2-byte groups: 1.2 MiB reaches the first 1 MiB limit; then 30 MiB alone; then 10 + 20
    rebuilt = [(1200 * 1024, 2), (30 * MIB, 1), (4, 1), (30 * MIB, 2)]
    assert ddp.group_by_size(tensors, ddp.REBUILT_LIMITS) == rebuilt
    # the first iteration: one bucket per dtype
    assert ddp.group_by_size(tensors, ddp.FIRST_BUCKET) == [(60 * MIB + 1200 * 1024, 5), (4, 1)]


def test_a_single_tensor_broadcast_allocates_nothing() -> None:
    big = 2 * ddp.BROADCAST_BUCKET_BYTES
    assert ddp.broadcast_ops([(big, 2)]) == []
    # two groups of two in flight, the first freed before the third is made
    t = [(200 * MIB, 2)] * 6
    assert ddp.broadcast_ops(t) == [400 * MIB, 400 * MIB, -1, 400 * MIB, -2, -3]


@pytest.mark.skipif(not DDP_RUNS, reason="no two-GPU DDP runs in data/calibration yet")
@pytest.mark.parametrize("rec", DDP_RUNS, ids=[r["run_id"] for r in DDP_RUNS])
def test_the_wrap_reserves_what_the_runs_reserved(rec: dict) -> None:
    """Load, peft, the broadcast and the first bucket against `stages.shard` (after DDP(model))."""
    arch = parse_config(rec["model_config"])
    setup = _single_gpu(setup_of(rec))
    targets = act.lora_target_names(arch, setup.lora_targets) if setup.method != "full" else frozenset()
    sim = AllocatorSim()
    run_script(sim, [], loading.load_script(arch, setup, targets))
    for size in loading.ddp_buckets(arch, setup, targets)[0]:
        sim.new(size)
    assert abs(sim.reserved - rec["stages"]["shard"]["reserved"]) <= 130 * MIB, rec["run_id"]
