"""The C allocator replay gives the Python replay's bytes exactly: calibration runs, catalog setups,
random plans."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.core import fragment, trace
from app.core.architecture import parse_config
from app.core.calibration import load_runs, setup_of
from app.core.fragment import build_plan
from app.core.loading import EMPTY_CACHE
from app.core.memory import _shape_key, _single_gpu, _static
from app.core.setup import TrainingSetup
from app.core.trace import TracePlan, simulate_py
from tests.conftest import missing_part
from tests.core.helpers import arch


def _c(plan: TracePlan) -> tuple[int, int]:
    """The C replay as trace.simulate runs it: steps resumed from the cached loaded-model snapshot."""
    if trace._replay is None:
        missing_part("the C allocator replay (app/core/_replay.c)", "not built: no C compiler at install")
    assert trace._replay is not None
    loaded = trace._loaded_c(plan.load, plan.shards)
    return trace._replay.resume(loaded, *trace._flat(plan)[2:], 2)


def _plan(a, setup: TrainingSetup) -> TracePlan:  # type: ignore[no-untyped-def]
    setup = _single_gpu(setup)
    return build_plan(a, setup, _static(a, _shape_key(setup)).targets)


@pytest.mark.parametrize("rec", load_runs(), ids=lambda r: r["run_id"])
def test_every_calibration_run_replays_the_same(rec) -> None:  # type: ignore[no-untyped-def]
    plan = _plan(parse_config(rec["model_config"]), setup_of(rec))
    assert _c(plan) == simulate_py(plan)


SETUPS = [
    TrainingSetup("qlora", batch_size=4, seq_len=512),
    TrainingSetup("qlora", batch_size=1, seq_len=4096, gradient_checkpointing=False, double_quant=False),
    TrainingSetup("lora", batch_size=2, seq_len=1000, lora_targets=("all-linear",), optimizer="adafactor"),
    TrainingSetup("lora", precision="amp_bf16", batch_size=3, seq_len=700, attention="eager"),
    TrainingSetup("full", batch_size=2, seq_len=1024, optimizer="adamw_8bit"),
    TrainingSetup("full", precision="amp_bf16", batch_size=4, seq_len=512, gradient_checkpointing=False),
    TrainingSetup("full", batch_size=1, seq_len=2048, optimizer="paged_adamw_8bit"),
    TrainingSetup("full", batch_size=4, seq_len=512, num_gpus=4, parallelism="fsdp", optimizer="sgd"),
    TrainingSetup("lora", batch_size=4, seq_len=512, num_gpus=8, parallelism="fsdp"),
]
MODELS = ["llama-3.2-1b", "qwen2.5-0.5b", "gemma-2-2b", "qwen3-0.6b", "mixtral-8x7b-v0.1"]


@pytest.mark.parametrize("slug", MODELS)
@pytest.mark.parametrize("setup", SETUPS, ids=[f"setup{i}" for i in range(len(SETUPS))])
def test_catalog_setups_replay_the_same(slug: str, setup: TrainingSetup) -> None:
    plan = _plan(arch(slug), setup)
    assert _c(plan) == simulate_py(plan)


_size = st.one_of(
    st.integers(0, 4096),
    st.integers(4096, 3 << 20),
    st.integers(3 << 20, 64 << 20),
    st.integers(64 << 20, 4 << 30),
)
_sizes = st.lists(_size, max_size=6).map(tuple)
_pairs = st.lists(st.tuples(_size, _size), max_size=3).map(lambda ps: tuple(x for pair in ps for x in pair))
_op = st.tuples(
    st.integers(0, 2),
    st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 5000)), max_size=3).map(tuple),
    _size,
    _sizes,
)


@st.composite
def _load_scripts(draw: st.DrawFn) -> tuple[int, ...]:
    """A valid load script (loading.py's encoding): allocations, frees of live ones, empty_cache."""
    ops: list[int] = []
    live: list[int] = []
    made = 0
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["alloc", "alloc", "free", "empty"]))
        if kind == "alloc" or (kind == "free" and not live):
            ops.append(draw(_size))
            live.append(made)
            made += 1
        elif kind == "free":
            k = live.pop(draw(st.integers(0, len(live) - 1)))
            ops.append(-1 - k)
        else:
            ops.append(EMPTY_CACHE)
    return tuple(ops)


@st.composite
def _plans(draw: st.DrawFn) -> TracePlan:
    ops = draw(st.lists(_op, min_size=1, max_size=5))
    saved = draw(st.lists(_size, min_size=sum(o[0] for o in ops), max_size=sum(o[0] for o in ops)))
    full = draw(st.booleans())
    shards = draw(st.sampled_from([1, 1, 2, 3, 8]))
    layer_params = [shape for o in ops for shape in o[1]]
    layers = draw(st.integers(1, 6))
    return TracePlan(
        load=draw(_load_scripts()),
        layers=layers,
        layer_ops=tuple(ops),
        opt_params=tuple(layer_params * layers),
        head_grads=draw(_sizes) if full else (),
        embed_grad=draw(_size) if full else 0,
        tied_accumulate=draw(_size) if full else 0,
        grad_size=draw(st.sampled_from([2, 4])),
        optimizer=draw(st.sampled_from(["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor"])),
        layer_saved=tuple(saved),
        layer_transient=draw(_sizes),
        layer_copies=draw(_sizes),
        head_copy=draw(_size),
        cache_copies=draw(st.booleans()),
        checkpoint=draw(st.booleans()),
        hidden=draw(_size),
        final_saved=draw(_sizes),
        logits=draw(_size),
        logits_fp32=draw(_size),
        vocab_fp32=draw(_size),
        shared=draw(_sizes),
        dequant=draw(_size),
        shards=shards,
        layer_weights=draw(_sizes) if shards > 1 else (),
        root_weights=draw(_sizes) if shards > 1 else (),
        softcap=draw(st.booleans()),
        held_input=draw(st.booleans()),
        workspace=draw(st.sampled_from([0, 32 << 20])),
        # QLoRA's (dequantized weight, product) pairs per op, which the checkpointed first pass makes
        op_dequant=tuple(draw(_pairs) for _ in ops) if draw(st.booleans()) else (),
        transient_op=draw(st.integers(0, len(ops) - 1)),
        # DDP's Reducer buckets: the first made before step 1, rebuilt (freed, made anew) before step 2
        ddp_buckets=(ddp := draw(_sizes) if shards == 1 else ()),
        ddp_rebuilt=draw(_sizes) if ddp else (),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_plans(), st.integers(1, 3))
def test_random_plans_replay_the_same(plan: TracePlan, steps: int) -> None:
    expected = simulate_py(plan, steps)
    if trace._replay is None:
        missing_part("the C allocator replay (app/core/_replay.c)", "not built: no C compiler at install")
    assert trace._replay.simulate(*trace._flat(plan), steps) == expected


def test_a_loaded_snapshot_is_never_changed_by_the_replays_resumed_from_it() -> None:
    a = arch("llama-3.1-8b")
    plans = [
        _plan(a, TrainingSetup("qlora", batch_size=b, seq_len=s)) for b, s in ((1, 256), (8, 4096), (3, 1000))
    ]
    assert len({(p.load, p.shards) for p in plans}) == 1  # one snapshot serves all three
    first = [_c(p) for p in plans]
    assert [_c(p) for p in reversed(plans)] == first[::-1]
    assert first == [simulate_py(p) for p in plans]
    assert len(set(first)) == 3


def test_huge_tensors_replay_in_python() -> None:
    # a 10^15-token request: tensors past the C replay's 64-bit range go to the Python replay
    plan = _plan(arch("llama-3.2-1b"), TrainingSetup("lora", batch_size=1, seq_len=10**15))
    if trace._replay is None:
        missing_part("the C allocator replay (app/core/_replay.c)", "not built: no C compiler at install")
    assert trace._replay.simulate(*trace._flat(plan), 2) is None
    alloc, reserved = trace.simulate(plan)
    assert (alloc, reserved) == simulate_py(plan)
    assert reserved >= alloc > 10**18


def test_simulate_uses_c_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(arch("llama-3.2-1b"), TrainingSetup("qlora", batch_size=2, seq_len=256))
    if trace._replay is None:
        missing_part("the C allocator replay (app/core/_replay.c)", "not built: no C compiler at install")
    expected = simulate_py(plan)
    monkeypatch.setattr(trace, "simulate_py", lambda *_: (0, 0))  # the Python replay must not run
    assert trace.simulate(plan) == expected


def _template(a, setup: TrainingSetup) -> object:  # type: ignore[no-untyped-def]
    """The replay template fragment.py fits for `setup` (at every batch x seq)."""
    if trace._replay is None:
        missing_part("the C allocator replay (app/core/_replay.c)", "not built: no C compiler at install")
    targets = _static(a, _shape_key(setup)).targets
    shape = fragment._Shape(a, fragment._unit_batch(_single_gpu(setup)), targets)
    shape.template()
    tmpl = shape.template()  # fitted at the second sight
    assert tmpl is not None
    return tmpl


@pytest.mark.parametrize("slug", MODELS)
@pytest.mark.parametrize("setup", SETUPS, ids=[f"setup{i}" for i in range(len(SETUPS))])
def test_templates_replay_every_batch_shape_as_its_own_plan(slug: str, setup: TrainingSetup) -> None:
    a = arch(slug)
    tmpl = _template(a, setup)
    for b, s in ((1, 1), (1, 128), (3, 777), (8, 4096), (2, 8192), (16, 333)):
        plan = _plan(a, replace(setup, batch_size=b, seq_len=s))
        assert trace.simulate_at(tmpl, b, s) == simulate_py(plan), (b, s)


@pytest.mark.parametrize("attention", ["eager", "sdpa", "flash_attention_2"])
def test_templates_cover_attention_scores_and_windows(attention: str) -> None:
    # eager's and SDPA math's b x heads x s^2 scores, Gemma's sliding windows past their length
    for slug, method in (("gemma-2-2b", "lora"), ("qwen3-0.6b", "qlora"), ("llama-3.2-1b", "full")):
        setup = TrainingSetup(method, attention=attention)  # type: ignore[arg-type]
        a = arch(slug)
        tmpl = _template(a, setup)
        for b, s in ((1, 100), (2, 4096), (5, 5000)):
            plan = _plan(a, replace(setup, batch_size=b, seq_len=s))
            assert trace.simulate_at(tmpl, b, s) == simulate_py(plan), (slug, b, s)


def test_a_template_answers_none_past_the_c_range() -> None:
    a = arch("llama-3.2-1b")
    tmpl = _template(a, TrainingSetup("lora"))
    assert trace.simulate_at(tmpl, 1, 10**15) is None
    assert trace.simulate_at(tmpl, 1 << 40, 10**18) is None  # past int64 on the way
    assert fragment.fragmentation(a, TrainingSetup("lora", seq_len=10**15), frozenset({"q_proj", "v_proj"}))


def test_a_gathered_buffer_past_the_c_range_replays_in_python() -> None:
    # FSDP's flat all-gather buffer sums a layer's weights: three of 1 TiB pass the 2 TiB that one
    # allocation holds in the C replay (its 512-byte units in 32 bits), which then answers None, and
    # trace.simulate replays the plan in Python
    tib = 1 << 40
    plan = TracePlan(
        load=(),
        layers=1,
        opt_params=(),
        head_grads=(),
        embed_grad=0,
        tied_accumulate=0,
        grad_size=4,
        optimizer="sgd",
        layer_saved=(),
        layer_ops=((0, (), 1 << 20, ()),),
        layer_transient=(),
        layer_copies=(),
        head_copy=0,
        cache_copies=False,
        checkpoint=False,
        hidden=1 << 20,
        final_saved=(),
        logits=1 << 20,
        logits_fp32=0,
        vocab_fp32=1 << 20,
        shared=(),
        dequant=0,
        shards=2,
        layer_weights=(tib, tib, tib),
    )
    assert _c(plan) is None
    assert trace.simulate(plan) == simulate_py(plan)
