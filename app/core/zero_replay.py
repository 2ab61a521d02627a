"""DeepSpeed ZeRO-2/3's allocations replayed on the caching-allocator replica: the bytes a ZeRO run reserves.

ZeRO works on whole-partition flat tensors (the bf16 flat buffer, the fp32 master partition, the flat
fp32 gradient of step(), each AdamW state, AdamW's foreach sqrt over the flat partition), each far larger
than any block the forward/backward frees.  The caching allocator serves a request from one free block
and never merges segments, so each of these takes a segment of its own that stays reserved: on two H200s
the first optimizer step of Llama-3.2-1B ZeRO-2/3 added exactly four part x 4-byte segments (fp32
gradient, exp_avg, exp_avg_sq, sqrt; h200-k-zero-2gpu-001..004), and NVML showed 8-22% more than the
tensors alive at the peak.  The order below follows DeepSpeed 0.19.6 (deepspeed/runtime/zero/
stage_1_and_2.py, stage3.py, utils.py `defragment`), torch 2.11's AdamW and transformers 5.17's loader;
the forward/backward is the single-GPU trace's (trace.py `_forward_backward`) with the weight gradients
taken out, since ZeRO copies each into its reduce bucket as soon as it is made.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import NamedTuple

from app.core.allocator import CUBLAS_WORKSPACE_BYTES
from app.core.allocsim import NEXT, PREV, AllocatorSim
from app.core.architecture import Architecture
from app.core.fragment import MAX_REPLAYED_LAYERS, build_plan
from app.core.optim import param_state_tensors
from app.core.params import ParamGroup, lora_groups, param_bytes, param_groups, weight_tensors
from app.core.setup import TrainingSetup
from app.core.trace import TracePlan, _forward_backward, _Tracer

# Steps replayed: the second step adds ZeRO-3's params kept gathered once the trace is complete; the
# measured runs' third and later steps reserved nothing more.
STEPS = 2
SKIP_SECOND_STEP_BELOW = 100
# HF Trainer's no-weight-decay names (trainer.py `get_decay_parameter_names`): norms and biases.
_NO_DECAY = ("norm", "bias")


class _Sim(AllocatorSim):
    """The allocator replica plus torch.cuda.empty_cache(), which DeepSpeed calls while it initializes."""

    def empty_cache(self) -> None:
        """Release every large segment that is one free block (c10 `release_cached_blocks`)."""
        keep: list[tuple[int, int]] = []
        for size, addr in self._free:
            block = self._blocks[addr]
            if block[PREV] == -1 and block[NEXT] == -1:
                del self._blocks[addr]
                self.reserved -= size
            else:
                keep.append((size, addr))
        self._free = keep


def _order(arch: Architecture, groups: list[ParamGroup]) -> list[ParamGroup]:
    """One group per tensor in model.parameters() order: per-layer kinds interleaved layer by layer."""
    L = arch.num_layers
    head = [g for g in groups if g.kind == "embed"]
    layered = [g for g in groups if g.kind != "embed" and g.n >= L and g.n % L == 0]
    rest = [g for g in groups if g not in head and g not in layered]
    out = [ParamGroup(g.kind, g.rows, g.cols, 1) for g in head]
    for _ in range(L):
        for g in layered:
            out.extend([ParamGroup(g.kind, g.rows, g.cols, 1)] * (g.n // L))
    for g in rest:
        out.extend([ParamGroup(g.kind, g.rows, g.cols, 1)] * g.n)
    return out


def _trainable(arch: Architecture, setup: TrainingSetup, targets: frozenset[str]) -> list[ParamGroup]:
    """Every trainable tensor, one per entry, in model.parameters() order."""
    if setup.method == "full":
        return _order(arch, list(param_groups(arch)))
    return _order(arch, lora_groups(arch, targets, setup.lora_rank))


def _split(tensors: list[ParamGroup]) -> list[list[int]]:
    """HF Trainer's two optimizer groups (decay, no decay) as element counts; DeepSpeed drops an empty
    one (engine.py `_configure_optimizer`: "Removing param_group that has no 'params'")."""
    decay = [t.rows * t.cols for t in tensors if t.kind not in _NO_DECAY]
    other = [t.rows * t.cols for t in tensors if t.kind in _NO_DECAY]
    return [g for g in (decay, other) if g]


def _sub_groups(parts: list[int], sub_group_size: int) -> list[int]:
    """stage3.py `_create_fp16_sub_groups`: cut a group's partitions once a sub-group reaches the size."""
    if sub_group_size >= sum(parts):
        return [sum(parts)]
    out: list[int] = []
    acc = 0
    for i, p in enumerate(parts):
        acc += p
        if acc >= sub_group_size or i == len(parts) - 1:
            out.append(acc)
            acc = 0
    return out


def _fb_plan(arch: Architecture, setup: TrainingSetup, targets: frozenset[str]) -> TracePlan:
    """The single-GPU trace of one forward/backward, without weight gradients (ZeRO buckets them)."""
    plan = build_plan(arch, replace(setup, num_gpus=1, parallelism="ddp"), targets)
    ops = tuple((count, (), grad_in, scratch) for count, _params, grad_in, scratch in plan.layer_ops)
    plan = replace(plan, layer_ops=ops, grad_size=0, head_grads=(), embed_grad=0, tied_accumulate=0)
    if plan.layers > MAX_REPLAYED_LAYERS:
        plan = replace(plan, layers=MAX_REPLAYED_LAYERS)
    return plan


class _Loaded:
    """The loaded model's handles and byte sizes: frozen weights, then trainable tensors in order."""

    def __init__(self, frozen: list[tuple[int, int]], trainable: list[tuple[int, int]]) -> None:
        self.frozen = frozen  # (handle, bytes)
        self.trainable = trainable


def _load(sim: _Sim, arch: Architecture, setup: TrainingSetup, targets: frozenset[str]) -> _Loaded:
    """Allocate the model as loaded (from_pretrained, then peft's adapters)."""
    weights = [b for b, c in weight_tensors(arch, setup)[0] for _ in range(c)]
    if setup.full_model_load_per_gpu:
        # transformers modeling_utils.py `caching_allocator_warmup`: one torch.empty of the model's bytes,
        # freed at once, so the weights are carved out of a single segment.
        sim.free(sim.new(sum(weights)))
    tensors = _trainable(arch, setup, targets)
    if setup.method != "full":
        frozen = [(sim.new(b), b) for b in weights]
        # peft's adapters are fp32 (autocast_adapter_dtype=True)
        return _Loaded(frozen, [(sim.new(4 * t.rows * t.cols), 4 * t.rows * t.cols) for t in tensors])
    size = param_bytes(setup)
    return _Loaded([], [(sim.new(t.rows * t.cols * size), t.rows * t.cols * size) for t in tensors])


def _step_temporaries(sim: AllocatorSim, setup: TrainingSetup, sub: int, lp: int, first: bool) -> int:
    """One (sub-)group of step(): flat gradient, its fp32 copy, the optimizer's states and temporary.

    Returns the bytes of the states created here that went into blocks freed earlier, not new segments.
    """
    flat = sim.new(sub * lp)
    g32 = sim.new(sub * 4) if lp != 4 else flat  # `.to(fp32)` of an fp32 tensor is the tensor itself
    if g32 != flat:
        sim.free(flat)
    sizes, _managed, temp = param_state_tensors(setup.optimizer, sub, 1, 4)
    displaced = 0
    if first:  # torch optimizers create their states lazily in the first step()
        for b in sizes:
            before = sim.reserved
            sim.new(b)
            displaced += b if sim.reserved == before else 0
    if temp:  # AdamW foreach: `exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)`
        sim.free(sim.new(temp))
    sim.free(g32)
    return displaced


def _norm_copies(sim: AllocatorSim, pieces: tuple[int, ...]) -> None:
    """get_grad_norm_direct: every gradient piece `.to(float64).norm(2)` (stage3.py, stage_1_and_2.py)."""
    for numel in pieces:
        sim.free(sim.new(numel * 8))


class _Init(NamedTuple):
    """The allocator after deepspeed.initialize, and what the steps need from it."""

    sim: AllocatorSim
    subs: tuple[int, ...]  # elements of each (sub-)group partition the step works on, in order
    pieces: tuple[int, ...]  # elements of each gradient piece whose norm step() takes
    grads_in_partition: tuple[int, ...]  # ZeRO-2's bytes per group (reduction stream), else ()
    t_bytes: int  # bytes per element of the trainable partitions and their gradients


@lru_cache(maxsize=64)
def _initialized(
    arch: Architecture, setup: TrainingSetup, targets: frozenset[str], sub_group_size: int
) -> _Init:
    """Load and deepspeed.initialize: the same for every batch shape (`setup`'s shape is normalized)."""
    n = setup.num_gpus
    lp = 4 if setup.precision == "fp32" else 2
    sim = _Sim()
    loaded = _load(sim, arch, setup, targets)
    groups = _split(_trainable(arch, setup, targets))
    if setup.parallelism == "zero2":
        subs, pieces, grad_bytes = _init_zero2(sim, setup, loaded, groups, n, lp)
        t_bytes = lp
    else:
        # LoRA under ZeRO-3 keeps peft's fp32 adapters (partition_parameters.py converts them uncast)
        t_bytes = 4 if setup.method != "full" else lp
        subs, pieces, grad_bytes = _init_zero3(sim, arch, setup, loaded, groups, n, t_bytes, sub_group_size)
    return _Init(sim, tuple(subs), tuple(pieces), tuple(grad_bytes), t_bytes)


@lru_cache(maxsize=256)
def zero_reserved(
    arch: Architecture, setup: TrainingSetup, targets: frozenset[str], sub_group_size: int, gathered: int
) -> int:
    """Peak bytes the caching allocator reserves per GPU over the training steps of a ZeRO-2/3 run.

    `setup` is already passed through zero.engine_setup; `gathered` is ZeRO-3's gathered 16-bit
    parameters once the trace is complete (zero.py `_stage3_gathered`).  Init transients are left out:
    DeepSpeed flattens on the CPU when the GPU lacks room (stage_1_and_2.py `flatten_on_accelerator`).
    0 for stacks deeper than the replay follows (fragment.MAX_REPLAYED_LAYERS).
    """
    if arch.num_layers > MAX_REPLAYED_LAYERS:
        return 0
    shape = replace(setup, batch_size=1, seq_len=1, gradient_checkpointing=True, attention="sdpa")
    init = _initialized(arch, shape, targets, sub_group_size)
    sim = init.sim.copy(keep_live=False)  # its live tensors stay allocated for good
    sim.peak_reserved = sim.reserved
    lp = 4 if setup.precision == "fp32" else 2
    bucket = arch.hidden_size * arch.hidden_size  # reduce_bucket_size "auto"
    red, ag = AllocatorSim(), AllocatorSim()  # the reduction and all-gather streams' own pools
    if setup.parallelism == "zero3":
        # fetch_sub_module gathers on the all-gather stream: one module at a time while the first step
        # records the trace, then whatever the reuse distance and prefetch keep (partitioned_param_
        # coordinator.py); reduce_scatter_coalesced's bucket on the reduce-and-partition stream
        largest = max([arch.vocab_size * arch.hidden_size] + [lin.weight_numel for lin in arch.linears])
        ag.free(ag.new(largest * lp))
        ag.free(ag.new(gathered))
        red.free(red.new(bucket * lp))
    plan = _fb_plan(arch, setup, targets)
    tr = _Tracer(sim)
    sim.new(CUBLAS_WORKSPACE_BYTES)  # cuBLAS/cuBLASLt workspaces at the first matmul, kept
    for step in range(STEPS):
        held: list[int] = []
        if setup.parallelism == "zero2":
            # setup_buckets: two reduce_bucket_size buffers (overlap_comm) at the first gradient hook;
            # copy_grads_in_partition allocates grads_in_partition under `stream(self.reduction_stream)`
            held = [sim.new(bucket * lp), sim.new(bucket * lp)]
            grads_in_partition = [red.new(g) for g in init.grads_in_partition]
        sim.free_all(_forward_backward(plan, tr))
        sim.free_all(held)  # _release_ipg_buffers at the end of backward
        _norm_copies(sim, init.pieces)
        displaced = 0
        for i, sub in enumerate(init.subs):
            displaced += _step_temporaries(sim, setup, sub, init.t_bytes, step == 0)
            if setup.parallelism == "zero2":
                red.free(grads_in_partition[i])  # averaged_gradients[i] = None in step()
        if displaced * SKIP_SECOND_STEP_BELOW <= sim.reserved:
            # The next forward/backward can need new segments only where the first step's states took
            # blocks it had used, so it reserves at most `displaced` more: replay it only when that
            # could move the peak by more than 1/SKIP_SECOND_STEP_BELOW (a speed bound, not a fit).
            break
    return sim.peak_reserved + red.peak_reserved + ag.peak_reserved


def _init_zero2(
    sim: _Sim, setup: TrainingSetup, loaded: _Loaded, groups: list[list[int]], n: int, lp: int
) -> tuple[list[int], list[int], list[int]]:
    """stage_1_and_2.py __init__: per group empty_cache, flat buffer, fp32 partition; then the zeroed grads.

    Returns (partition per group, rank 0's gradient pieces, grads_in_partition bytes per group).
    """
    trainable = [h for h, _ in loaded.trainable]
    if setup.method != "full" and lp != 4:
        # engine.py `_configure_distributed_model`: the module is cast to bf16/fp16, adapters included
        cast = []
        for h, b in loaded.trainable:
            cast.append(sim.new(b * lp // 4))
            sim.free(h)
        trainable = cast
    live: list[int] = []
    parts: list[int] = []
    start = 0
    for numels in groups:
        sim.empty_cache()  # L400, at the top of each group: releases what the last group's flatten freed
        part = -(-sum(numels) // (2 * n)) * 2  # flatten_dense_tensors_aligned, nccl_start_alignment_factor 2
        live.append(sim.new(part * n * lp))
        sim.free_all(trainable[start : start + len(numels)])  # the params become views of the flat buffer
        start += len(numels)
        # weights_partition = partition.detach().clone().to(fp32)
        clone = sim.new(part * lp)
        if lp != 4:
            live.append(sim.new(part * 4))
            sim.free(clone)
        else:
            live.append(clone)
        parts.append(part)
    # initialize_optimizer_states: a zeroed fp32 gradient per group, dropped again (grad = None)
    sim.free_all([sim.new(p * 4) for p in parts])
    pieces: list[int] = []
    for numels, part in zip(groups, parts, strict=True):
        left = part  # rank 0 owns the first `part` elements of each flat group
        for numel in numels:
            if left <= 0:
                break
            pieces.append(min(numel, left))
            left -= numel
    del live  # allocated for good
    return parts, pieces, [p * lp for p in parts]


def _init_zero3(
    sim: _Sim,
    arch: Architecture,
    setup: TrainingSetup,
    loaded: _Loaded,
    groups: list[list[int]],
    n: int,
    t_bytes: int,
    sub_group_size: int,
) -> tuple[list[int], list[int], list[int]]:
    """stage3.py __init__: partition every parameter, defragment, fp32 sub-groups, grad flat buffer."""
    tensors = loaded.frozen + loaded.trainable
    if setup.full_model_load_per_gpu:
        # partition_parameters.py `partition`: each param's ds_tensor is made, then its full data freed
        parts_h = []
        for h, b in tensors:
            parts_h.append(sim.new(-(-b // n)))
            sim.free(h)
    else:
        # zero.Init (HF Trainer loads under it for ZeRO-3): parameters are only ever created as partitions
        sim.free_all([h for h, _ in tensors])
        sim.empty_cache()
        parts_h = [sim.new(-(-b // n)) for _, b in tensors]
    # utils.py `defragment`: partitions to the CPU, freed, empty_cache(), one flat buffer back on the GPU
    sim.free_all(parts_h[len(loaded.frozen) :])
    sim.empty_cache()
    parts_by_group = [[-(-x // n) for x in numels] for numels in groups]
    total = sum(sum(p) for p in parts_by_group)
    live = [sim.new(total * t_bytes)]
    subs = [s for p in parts_by_group for s in _sub_groups(p, sub_group_size)]
    # _create_fp32_partitions: `converted = flat.to(fp32)` then `.clone()`; the old `converted` is freed
    # only when the name is rebound to the next sub-group's, the last at the function's return
    prev = -1
    for s in subs:
        if t_bytes == 4:
            continue  # an fp32 partition is used as the master copy itself
        t = sim.new(s * 4)
        if prev >= 0:
            sim.free(prev)
        prev = t
        live.append(sim.new(s * 4))
    if prev >= 0:
        sim.free(prev)
    sim.free(sim.new(max(subs) * 4))  # initialize_optimizer_states' zeroed gradient_buffer
    lp = 4 if setup.precision == "fp32" else 2
    live.append(sim.new(arch.hidden_size * arch.hidden_size * lp))  # _setup_for_real_optimizer: ipg bucket
    live.append(sim.new(total * t_bytes))  # grad_partitions_flat_buffer
    del live  # allocated for good
    return subs, [p for group in parts_by_group for p in group], []
