"""Per-GPU buffers of DeepSpeed ZeRO-2/3 as the configs of engines.py run them (HF Trainer + DeepSpeed).

Read from DeepSpeed 0.19.6 (deepspeed/runtime/engine.py, zero/stage_1_and_2.py, zero/stage3.py,
zero/partitioned_param_coordinator.py) and the "auto" values that transformers/accelerate fill in
(accelerate accelerator.py `_prepare_deepspeed`, transformers integrations/deepspeed.py
`HfTrainerDeepSpeedConfig.trainer_config_finalize`: reduce_bucket_size = hidden^2,
stage3_prefetch_bucket_size = 0.9 hidden^2, stage3_param_persistence_threshold = 10 hidden).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from app.core.allocator import CUBLAS_WORKSPACE_BYTES, block_size
from app.core.architecture import Architecture
from app.core.fragment import fragmentation
from app.core.optim import optimizer_bytes
from app.core.params import param_groups, trainable_groups, weight_tensors
from app.core.setup import TrainingSetup
from app.core.zero_replay import zero_reserved

# engines.deepspeed_config hands these out; DeepSpeed's own defaults differ (stage3.py __init__).
STAGE3_MAX_REUSE_DISTANCE = 1_000_000_000
SUB_GROUP_SIZE = 1_000_000_000
# The ZeRO optimizer's master partition and Adam states: DeepSpeed keeps them in fp32 unless
# bf16_master_weights_and_gradients is set, which it accepts only with CPU offload and DeepSpeedCPUAdam
# (stage_1_and_2.py `_configure_master_weights` / `_enforce_cpu_offload`).
MASTER_BYTES = 4


def is_zero(setup: TrainingSetup) -> bool:
    """Whether this setup runs under DeepSpeed ZeRO (more than one GPU, zero2 or zero3)."""
    return setup.num_gpus > 1 and setup.parallelism in ("zero2", "zero3")


@lru_cache(maxsize=1024)
def engine_setup(setup: TrainingSetup) -> TrainingSetup:
    """The setup as DeepSpeed runs it: `bf16`/`fp16` enabled casts the whole module to 16 bits.

    engine.py `_configure_distributed_model` -> `_cast_module_mixed_precision` casts every floating
    parameter to the configured dtype (fp32-loaded amp weights included) and the HF integration runs no
    autocast, so an amp precision trains like its pure 16-bit one plus ZeRO's fp32 master partition.
    """
    if setup.precision == "amp_bf16":
        return replace(setup, precision="bf16")
    if setup.precision == "amp_fp16":
        return replace(setup, precision="fp16")
    return setup


@dataclass(frozen=True)
class ZeroTerms:
    """Bytes per GPU of ZeRO's own buffers (the rest of the estimate is the model's own memory)."""

    stage: int
    adapters: int  # LoRA adapters as the module holds them (zero2: bf16 full; zero3: partition)
    master: int  # fp32 master partition of the trainable parameters
    states: int  # optimizer states on the fp32 partition
    managed: int  # bitsandbytes paged states (cudaMallocManaged)
    grads: int  # persistent 16-bit gradient partition
    grad_transient: int  # the largest parameter's unsharded gradient before it is bucketed
    buckets: int  # ipg reduce buckets
    step_temp: int  # fp32 gradient (sub-)partition and the optimizer's temporaries at step time
    gathered: int  # ZeRO-3: all-gathered parameters kept live (reuse distance, prefetch)
    reserved: int = 0  # the caching allocator's peak reserved bytes, from replaying ZeRO (zero_replay.py)
    counted: int = 0  # what memory.py adds outside the phases: weights, adapters, workspaces, fragmentation


@lru_cache(maxsize=1024)  # a ranking asks for the same setup once per card
def zero_terms(arch: Architecture, setup: TrainingSetup, targets: frozenset[str]) -> ZeroTerms:
    """ZeRO-2/3 buffers for `setup` (already passed through engine_setup) over num_gpus ranks."""
    n = setup.num_gpus
    stage = 3 if setup.parallelism == "zero3" else 2
    lp = 4 if setup.precision == "fp32" else 2
    trainable = trainable_groups(arch, setup, targets)
    t_numel = sum(g.rows * g.cols * g.n for g in trainable)
    largest = max((g.rows * g.cols for g in trainable), default=0)
    # Partitions are cut from one flat buffer aligned to 2 x world size elements
    # (stage_1_and_2.py `flatten_dense_tensors_aligned`, nccl_start_alignment_factor = 2).
    part = -(-t_numel // (2 * n)) * 2
    lora = setup.method != "full"
    # zero2: the engine cast makes peft's fp32 adapters bf16. zero3: transformers loads the base model
    # under zero.Init; adapters added later are converted by the Stage3 optimizer without a cast
    # (partition_parameters.py `_convert_to_zero_parameters`), so they stay fp32.
    t_bytes = 4 if lora and stage == 3 else lp
    adapters = 0
    if lora:
        adapters = block_size(t_numel * t_bytes) if stage == 2 else block_size(part * t_bytes)
    # stage_1_and_2.py __init__: `weights_partition = ...detach().clone().to(master dtype)` always a
    # copy; stage3.py `_create_fp32_partitions` shares the partition when it is fp32 already.
    master = 0 if stage == 3 and t_bytes == MASTER_BYTES else block_size(part * MASTER_BYTES)
    # The client optimizer (HF Trainer's `optim`, e.g. torch AdamW) sees one flat fp32 tensor per
    # param group (stage_1_and_2.py: `param_group['params'] = [single_partition_of_fp32_groups[i]]`).
    opt = optimizer_bytes(setup.optimizer, [(part, 1, MASTER_BYTES, 1)])
    states = sum(block_size(b) * c for b, c in opt.state_groups)
    managed = sum(b * c for b, c in opt.managed_groups)
    opt_temp = sum(block_size(b) * c for b, c in opt.step_temp_groups)
    # Gradient accumulation dtype = the model dtype (engine.py `get_data_types`, grad_accum_dtype unset).
    grads = block_size(part * t_bytes)
    bucket = arch.hidden_size * arch.hidden_size  # reduce_bucket_size "auto"
    if stage == 2:
        # stage_1_and_2.py `setup_buckets`: one reduce_bucket_size buffer, a second with overlap_comm.
        buckets = 2 * block_size(bucket * t_bytes)
        # step(): flatten the bf16 grads (a copy), `.to(fp32)`, free the bf16 ones, then the optimizer
        # runs with the fp32 gradient: max(flat + fp32, fp32 + optimizer temporaries - freed grads).
        fp32_grad = block_size(part * MASTER_BYTES)
        step_temp = max(grads + fp32_grad, fp32_grad + opt_temp - grads)
        gathered = 0
    else:
        # stage3.py `_setup_for_real_optimizer`: one ipg bucket of reduce_bucket_size elements.
        buckets = block_size(bucket * t_bytes)
        # stage3.py step(): per sub-group (`_create_fp16_sub_groups`, >= sub_group_size elements then
        # cut) `_prepare_fp32_grad_for_sub_group` flattens and casts its gradients to fp32, then steps.
        sub = min(part, SUB_GROUP_SIZE + -(-largest // n))
        sub_opt = optimizer_bytes(setup.optimizer, [(sub, 1, MASTER_BYTES, 1)])
        sub_temp = sum(block_size(b) * c for b, c in sub_opt.step_temp_groups)
        fp32_grad = block_size(sub * MASTER_BYTES)
        step_temp = max(block_size(sub * t_bytes) + fp32_grad, fp32_grad + sub_temp)
        gathered = _stage3_gathered(arch, lp)
    # memory.py adds the weights, the adapters, cuBLAS's workspaces and the single-GPU replay's
    # reserved-but-free bytes (allocator_fragmentation) to the peak phase; ZeRO's own replay says what
    # the allocator really reserves (apply_zero).
    weights = sum(block_size(b) * c for b, c in weight_tensors(arch, setup)[0]) // (n if stage == 3 else 1)
    single = replace(setup, num_gpus=1, parallelism="ddp")
    counted = weights + adapters + CUBLAS_WORKSPACE_BYTES + fragmentation(arch, single, targets)[2]
    return ZeroTerms(
        stage=stage,
        adapters=adapters,
        master=master,
        states=states,
        managed=managed,
        grads=grads,
        grad_transient=block_size(largest * t_bytes),
        buckets=buckets,
        step_temp=step_temp,
        gathered=gathered,
        reserved=zero_reserved(arch, setup, targets, SUB_GROUP_SIZE, gathered),
        counted=counted,
    )


def _stage3_gathered(arch: Architecture, lp: int) -> int:
    """All-gathered 16-bit parameters ZeRO-3 keeps live during forward and backward.

    partitioned_param_coordinator.py `__params_to_release`: a module's parameters stay gathered when
    the trace uses them again within stage3_max_reuse_distance elements (with checkpointing, the top
    layers and the lm_head around the forward/backward turn); prefetching adds up to
    stage3_prefetch_bucket_size more (`fetch_sub_module`).  A module used now is gathered whole.
    """
    h = arch.hidden_size
    total = sum(g.rows * g.cols * g.n for g in param_groups(arch))
    largest_module = max([arch.vocab_size * h] + [lin.weight_numel for lin in arch.linears])
    prefetch = int(0.9 * h * h)
    return block_size(min(total, max(STAGE3_MAX_REUSE_DISTANCE, largest_module) + prefetch) * lp)


def apply_zero(phases: dict[str, dict[str, int]], z: ZeroTerms) -> None:
    """Replace the data-parallel gradient/optimizer terms of each phase by ZeRO's buffers."""
    for name, terms in phases.items():
        terms["optimizer_states"] = z.states
        terms["master_weights"] = z.master
        terms.pop("gathered_params", None)
        terms.pop("autocast_weight_copies", None)
        backward = name.startswith("backward")
        # ZeRO-2 allocates its gradient partition at the first bucketed gradient (stage_1_and_2.py
        # `copy_grads_in_partition`) and frees it in step(); ZeRO-3's grad_partitions_flat_buffer is
        # allocated once at init (stage3.py `_setup_for_real_optimizer`).
        held = (
            z.grads
            if (z.stage == 3 or name in ("backward_top", "backward_bottom", "backward_end", "optimizer_step"))
            else 0
        )
        producing = name in ("backward_top", "backward_bottom")
        terms["gradients"] = held + (z.grad_transient if producing else 0)
        if backward:
            terms["zero_buckets"] = z.buckets
        if z.gathered and name != "optimizer_step":
            terms["gathered_params"] = z.gathered
        if name == "optimizer_step":
            terms["optimizer_step_temporaries"] = z.step_temp
    # ZeRO's whole-partition tensors (flat buffers, fp32 partitions, the step's flat fp32 gradient, AdamW's
    # states and foreach sqrt) each take a segment of their own that stays reserved, free at the peak of
    # the forward/backward: what the replay reserves beyond the phases and memory.py's other terms is
    # kept by ZeRO's buffers (measured: h200-k-zero-2gpu, four part x 4-byte segments in the first step).
    best = max(sum(terms.values()) for terms in phases.values())
    cached = max(0, z.reserved - z.counted - best)
    for terms in phases.values():
        terms["zero_cached_segments"] = cached
