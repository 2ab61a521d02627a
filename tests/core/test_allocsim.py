"""The allocator replay: pinned results (speed-ups must not change them) and allocator basics."""

from __future__ import annotations

import pytest

from app.core.allocsim import LARGE_BUFFER, MIB, AllocatorSim
from app.core.fragment import build_plan
from app.core.memory import _shape_key, _static
from app.core.setup import TrainingSetup
from app.core.trace import simulate
from tests.core.helpers import arch

# (peak allocated, peak reserved) of the replay as committed in 8917dd5..e91e335 (before the faster
# allocator and the cached post-load state): the rewrite must replay the same trace to the byte.
PINNED = [
    ("llama-3.1-8b", TrainingSetup("qlora", batch_size=4, seq_len=512), (12179587072, 13421772800)),
    (
        "llama-3.2-1b",
        TrainingSetup("full", seq_len=1024, gradient_checkpointing=False),
        (12358144000, 13096714240),
    ),
    (
        "mistral-7b-v0.3",
        TrainingSetup("full", precision="amp_bf16", batch_size=4, seq_len=512),
        (144960471040, 151076732928),
    ),
    (
        "llama-3.2-1b",
        TrainingSetup("full", batch_size=4, num_gpus=2, parallelism="fsdp"),
        (19331782656, 21015560192),
    ),
]


@pytest.mark.parametrize(("slug", "setup", "expected"), PINNED)
def test_replay_is_unchanged(slug: str, setup: TrainingSetup, expected: tuple[int, int]) -> None:
    a = arch(slug)
    plan = build_plan(a, setup, _static(a, _shape_key(setup)).targets)
    assert simulate(plan) == expected
    assert simulate(plan) == expected  # the second replay starts from the cached loaded state


def test_split_merge_and_copy_independence() -> None:
    sim = AllocatorSim()
    a = sim.new(4 * MIB)  # a 20 MiB segment, split: 16 MiB stay free
    b = sim.new(4 * MIB)  # best fit: the free 16 MiB remainder
    assert sim.reserved == LARGE_BUFFER and sim.allocated == 8 * MIB
    other = sim.copy()
    sim.free(a)
    sim.free(b)
    assert sim.new(20 * MIB) and sim.reserved == LARGE_BUFFER  # the three parts merged back
    other.new(16 * MIB)  # the copy still holds a and b: only 12 MiB free there
    assert other.reserved == LARGE_BUFFER + 16 * MIB
