"""Peak GPU memory per GPU of one training setup, as nvidia-smi shows it, with a named breakdown."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from app.core import activations as act
from app.core import moe_lora
from app.core.allocator import (
    CUBLAS_WORKSPACE_BYTES,
    GIB,
    NCCL_BYTES_BY_ENGINE,
    block_size,
    cuda_context_bytes,
    kernel_bytes,
    managed_bytes,
    uvm_resident_bytes,
)
from app.core.architecture import Architecture
from app.core.errors import CoreInputError
from app.core.fragment import fragmentation
from app.core.moe_load import moe_load_excess
from app.core.notices import Notice
from app.core.optim import optimizer_bytes
from app.core.params import Group, grad_size, param_bytes, trainable_groups, weight_tensors
from app.core.setup import TrainingSetup
from app.core.zero import apply_zero, engine_setup, is_zero, zero_terms


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak per-GPU memory (bytes) and the named terms that add up to it."""

    peak_bytes: int
    breakdown: dict[str, int]
    params_total: int
    params_trainable: int
    warnings: tuple[Notice, ...]
    assumptions: tuple[str, ...]

    @property
    def peak_gib(self) -> float:
        """Peak in GiB (2^30 bytes)."""
        return self.peak_bytes / GIB

    @property
    def required_bytes(self) -> int:
        """The least memory the run needs on a smaller card.

        On a card with room to spare, PyTorch's caching allocator keeps every segment it ever made
        (`peak_bytes`, what nvidia-smi shows on the calibration H200); when cudaMalloc fails it frees
        its cached free segments and retries (c10/cuda/CUDACachingAllocator.cpp `release_cached_blocks`),
        so a card smaller than `peak_bytes` but larger than this still runs the step.
        """
        slack = self.breakdown.get("allocator_fragmentation", 0) + self.breakdown.get(
            "cached_full_model_load", 0
        )
        return self.peak_bytes - slack


def _allocated(groups: list[Group]) -> int:
    """Bytes the caching allocator hands out for these tensors (512-byte blocks)."""
    return sum(block_size(b) * n for b, n in groups)


@dataclass(frozen=True)
class _Static:
    """What does not depend on the batch shape or GPU count: computed once per architecture/setup."""

    targets: frozenset[str]
    weight_groups: list[Group]
    dequant_bytes: int
    grad_size: int
    params_trainable: int
    train_groups: list[Group]
    weights: int
    adapters: int
    grads: int
    states: int
    managed: int
    step_temp: int
    layer: act.LayerActivations
    layer_masked: act.LayerActivations
    moe_extra: int
    expert_folds: tuple[int, int]  # one layer's W + BA of LoRA-wrapped experts (gate_up, down)
    dense_mlp: int
    logits: act.LogitsBytes
    dtypes: act.Dtypes
    sdpa_math: bool  # act.sdpa_math: SDPA falls back to its math kernel
    kernels: int  # cuda_kernels_and_handles


_shape_key = act.shape_key

# A fixed notice (frozen): made once, not on every estimate that gets it.
_PROBABILITIES_STORED = Notice(
    "attention_probabilities_stored",
    "Attention runs in fp32 with grouped k/v heads, which PyTorch's flash and memory-efficient "
    "kernels do not take: SDPA falls back to its math kernel and stores the attention "
    "probabilities (batch x heads x seq^2 x 4 bytes per layer).",
)


@lru_cache(maxsize=1024)
def _static(arch: Architecture, setup: TrainingSetup) -> _Static:
    targets = act.lora_target_names(arch, setup.lora_targets) if setup.method != "full" else frozenset()
    if setup.method != "full":
        linear_names = {lin.name for lin in arch.linears} | moe_lora.mapping(arch).keys()
        unknown = [
            t
            for t in setup.lora_targets
            if t.lower() not in (act.ALL_LINEAR, "all_linear") and t not in linear_names
        ]
        if unknown:
            raise CoreInputError(
                "lora_targets",
                f"{', '.join(unknown)} not a Linear module of {arch.model_type}; "
                f"choose from {', '.join(sorted(linear_names))} or all-linear",
            )
    weight_groups, dequant_bytes = weight_tensors(arch, setup)
    g_size = grad_size(setup)
    trainable = trainable_groups(arch, setup, targets)
    train_groups: list[Group] = [(t.rows * t.cols * g_size, t.n) for t in trainable]
    opt = optimizer_bytes(setup.optimizer, ((t.rows, t.cols, g_size, t.n) for t in trainable))
    return _Static(
        targets=targets,
        weight_groups=weight_groups,
        dequant_bytes=dequant_bytes,
        grad_size=g_size,
        params_trainable=sum(t.rows * t.cols * t.n for t in trainable),
        train_groups=train_groups,
        weights=_allocated(weight_groups),
        adapters=_allocated(train_groups) if setup.method != "full" else 0,
        grads=_allocated(train_groups),
        states=_allocated(list(opt.state_groups)),
        managed=sum(managed_bytes(b) * n for b, n in opt.managed_groups),
        step_temp=_allocated(list(opt.step_temp_groups)),
        layer=act.layer_activations(arch, setup, targets),
        layer_masked=act.layer_activations(arch, setup, targets, masked=True),
        moe_extra=act.moe_extra(arch, setup, targets),
        expert_folds=moe_lora.folded(arch, targets, moe_lora.weight_bytes(setup.method, param_bytes(setup))),
        dense_mlp=act.moe_dense_mlp_saved(arch, setup),
        logits=act.logits_bytes(arch, setup),
        dtypes=act.dtypes_for(setup),
        sdpa_math=act.sdpa_math(arch, setup),
        kernels=kernel_bytes(act.flash_kernels(arch, setup)),
    )


def estimate_memory(
    arch: Architecture, setup: TrainingSetup, *, fragmentation_like: TrainingSetup | None = None
) -> MemoryEstimate:
    """Predict peak per-GPU memory (NVML used) for one training setup on one architecture.

    The allocator replay behind `allocator_fragmentation` costs milliseconds (cached per setup); a
    search over batch sizes or lengths can pass `fragmentation_like=<the base setup>` to reuse that
    setup's replay, scaled to this setup's allocated bytes, and stay at microseconds per call.
    """
    warnings: list[Notice] = []
    assumptions: list[str] = []
    ds_zero = is_zero(setup)
    if ds_zero:
        setup = engine_setup(setup)  # DeepSpeed casts the module to 16 bits (zero.py)
    st = _static(arch, _shape_key(setup))
    targets = st.targets
    n = setup.num_gpus
    multi = n > 1
    dtypes = st.dtypes
    tokens = setup.batch_size * setup.seq_len
    weight_groups, dequant_bytes = st.weight_groups, st.dequant_bytes
    g_size = st.grad_size
    params_trainable = st.params_trainable
    train_groups = st.train_groups

    shard_params = multi and setup.parallelism in ("fsdp", "zero3")
    shard_grads = multi and setup.parallelism in ("fsdp", "zero2", "zero3")
    shard_states = multi and setup.parallelism != "ddp"

    weights, adapters, grads = st.weights, st.adapters, st.grads
    states, managed, step_temp = st.states, st.managed, st.step_temp
    if shard_params:
        weights //= n
        adapters //= n
    if shard_grads:
        grads //= n
    if shard_states:
        states //= n
        managed //= n
        step_temp //= n

    # --- activations --------------------------------------------------------------------------
    layer = st.layer
    moe = st.moe_extra
    dense_mlp = st.dense_mlp
    moe_delta = moe - dense_mlp if arch.is_moe else 0
    scores = setup.batch_size * arch.num_heads * setup.seq_len * setup.seq_len
    square = setup.batch_size * setup.seq_len * setup.seq_len
    eager_mask = square * dtypes.attn if setup.attention == "eager" else 0
    # Windowed layers beyond the window attend through a materialized mask: transformers builds one
    # bool mask per forward (shared), and each such layer's SDPA keeps it as an additive bias.
    n_masked = arch.sliding_layers if act.masked_sliding(arch, setup) else 0
    masked = st.layer_masked
    shared_mask = square if n_masked else 0
    # (layers, saved bytes each) of the plain and the masked layers, those there are
    layer_kinds: list[tuple[int, int]] = []
    if arch.num_layers - n_masked:
        plain = layer.saved * tokens + layer.attn_scores_saved * scores
        layer_kinds.append((arch.num_layers - n_masked, plain))
    if n_masked:
        bias = square * dtypes.attn
        layer_kinds.append((n_masked, masked.saved * tokens + masked.attn_scores_saved * scores + bias))
    moe_share = arch.num_moe_layers / arch.num_layers if arch.num_layers else 0.0
    layer_saved_max = max(b for _, b in layer_kinds) + (moe_delta * tokens if arch.num_moe_layers else 0)
    # LoRA-wrapped experts save their folded W + BA per MoE layer (moe_lora)
    folds = sum(st.expert_folds)
    layer_saved_max += folds
    final_norm = 4 * arch.hidden_size + dtypes.residual * arch.hidden_size
    logits = st.logits

    if setup.gradient_checkpointing:
        kept_per_layer = layer.checkpoint_input * tokens
        kept_all = arch.num_layers * kept_per_layer + eager_mask + shared_mask
        recompute = layer_saved_max
    else:
        kept_all = sum(k * b for k, b in layer_kinds) + int(arch.num_layers * moe_share * moe_delta * tokens)
        kept_all += arch.num_moe_layers * folds
        kept_all += eager_mask + shared_mask
        kept_per_layer = layer_saved_max
        recompute = 0
    # SDPA's math kernel (fp32 attention with grouped k/v heads) has its own busiest moment, the
    # attention's backward (activations.math_attention_backward); the MLP's backward holds none of its scores.
    sdpa_math = st.sdpa_math
    math = sdpa_math and arch.num_layers > n_masked
    transient = layer.transient * tokens + (0 if math else layer.attn_scores_transient) * scores
    if arch.num_moe_layers:
        # plus the weight gradient of the fold being back-propagated
        transient += act.moe_backward_scratch(arch, setup) * tokens + max(st.expert_folds)
    embed_out = dtypes.residual * arch.hidden_size * tokens

    head_grads = 0
    if setup.method == "full":
        head_grads = block_size(arch.vocab_size * arch.hidden_size * g_size) + block_size(
            arch.hidden_size * g_size
        )
        if shard_grads:
            head_grads //= n
    layer_grads = max(grads - head_grads, 0)
    # A tied embedding (Llama-3.2, Qwen small, Gemma) gets two gradients, from the lm_head at the start of
    # backward and from the embedding at its end; autograd's InputBuffer holds the first and adds the
    # second out of place, so the end of backward briefly holds three V x h tensors.
    tied_end = 0
    if setup.method == "full" and arch.tie_embeddings:
        tied_end = 2 * block_size(arch.vocab_size * arch.hidden_size * g_size)
        if shard_grads:
            tied_end //= n

    # Phases: forward end (loss computed), backward start (top layer), backward end (bottom layer),
    # optimizer step.  Optimizer states exist from the first step on, so the forward/backward of the
    # second step see them; gradients are None at the forward (zero_grad(set_to_none=True)).
    bwd_top = kept_all + recompute + transient + head_grads
    bwd_bottom = kept_per_layer + recompute + transient + embed_out + layer_grads + head_grads
    if math:
        top, bottom = act.math_attention_backward(
            arch, setup, layer, tokens, scores, kept_all, kept_per_layer, dtypes.residual
        )
        bwd_top = max(bwd_top, top + head_grads)
        bwd_bottom = max(bwd_bottom, bottom + embed_out + layer_grads + head_grads)
    phases: dict[str, dict[str, int]] = {
        "forward": {
            "activations": kept_all + final_norm * tokens + embed_out,
            "logits_and_loss": logits.forward_peak * tokens,
            "optimizer_states": states,
        },
        "backward_loss": {
            "activations": kept_all + final_norm * tokens,
            "logits_and_loss": logits.backward_peak * tokens,
            "optimizer_states": states,
        },
        "backward_top": {
            "activations": bwd_top - head_grads,
            "gradients": head_grads,
            "optimizer_states": states,
        },
        "backward_bottom": {
            "activations": bwd_bottom - layer_grads - head_grads,
            "gradients": layer_grads + head_grads,
            "optimizer_states": states,
        },
        "backward_end": {
            "activations": embed_out,
            "gradients": grads + tied_end,
            "optimizer_states": states,
        },
        "optimizer_step": {
            "gradients": grads,
            "optimizer_states": states,
            "optimizer_step_temporaries": step_temp,
        },
    }
    if dequant_bytes:
        for name in ("forward", "backward_top", "backward_bottom"):
            # bnb MatMul4Bit dequantizes the whole weight to bf16 for the matmul (and again in backward).
            phases[name]["qlora_dequant_workspace"] = dequant_bytes
    # accelerate's FSDP2 with mixed_precision bf16/fp16 (not the harness's bare fully_shard): the sharded
    # fp32 parameters are all-gathered in the 16-bit MixedPrecisionPolicy.param_dtype, so no autocast
    # copies and 16-bit unsharded layers (accelerate utils/fsdp_utils.py `fsdp2_prepare_model`).
    accel_mp = (
        shard_params and setup.parallelism == "fsdp" and dtypes.autocast and not setup.full_model_load_per_gpu
    )
    if dtypes.autocast and not accel_mp:
        _autocast_copies(arch, setup, phases, shard=n if shard_params else 1)
    if shard_params:
        fsdp = _fsdp_terms(arch, setup, weight_groups, grads * n if shard_grads else grads, g_size)
        # FSDP2 (`fully_shard` per decoder layer, then the root, as the harness's distributed.py does):
        # during forward and backward a layer's parameters are unsharded, with the next one prefetched,
        # the root's own parameters (embedding, final norm, lm_head) stay unsharded from the forward to
        # the backward, and the backward holds a layer's unsharded gradients before their reduce-scatter.
        gathered = (2 * fsdp.layer_weights + fsdp.root) // (2 if accel_mp else 1)
        phases["forward"]["gathered_params"] = gathered
        for name in ("backward_loss", "backward_top", "backward_bottom", "backward_end"):
            phases[name]["gathered_params"] = gathered + fsdp.layer_grads
    if ds_zero:
        zt = zero_terms(arch, setup, targets)
        apply_zero(phases, zt)
        adapters, managed = zt.adapters, zt.managed
    # the first phase of the largest sum (as max() with a key, without its per-item lambda)
    best_name, best = next(iter(phases.items()))
    most = sum(best.values())
    for name, terms in phases.items():
        total = sum(terms.values())
        if total > most:
            best_name, best, most = name, terms, total

    breakdown: dict[str, int] = {
        "cuda_context": cuda_context_bytes(),
        "cuda_kernels_and_handles": st.kernels,
        "weights": weights,
    }
    if adapters:
        breakdown["adapters"] = adapters
    for key in (
        "gradients",
        "master_weights",
        "optimizer_states",
        "optimizer_step_temporaries",
        "activations",
        "logits_and_loss",
        "autocast_weight_copies",
        "qlora_dequant_workspace",
        "gathered_params",
        "zero_buckets",
        "zero_cached_segments",
    ):
        value = best.get(key)
        if value:
            breakdown[key] = value
    if managed:
        # bitsandbytes paged states live in cudaMallocManaged memory: outside torch's allocator, but
        # resident on the GPU during the step, so NVML counts them (run a-llama-3.2-1b-sweeps-013).
        breakdown["optimizer_states_paged"] = uvm_resident_bytes(managed)
    if multi and setup.parallelism == "ddp":
        # DDP (gradient_as_bucket_view=False) keeps flat bucket buffers as large as all gradients.
        breakdown["ddp_buckets"] = _allocated(train_groups)
    if multi:
        # NCCL's communicators and channel buffers are cudaMalloc'ed outside torch's allocator, more
        # under DeepSpeed (allocator.NCCL_BYTES_BY_ENGINE, measured per engine on two H200s)
        breakdown["nccl_buffers"] = NCCL_BYTES_BY_ENGINE[setup.parallelism]
    breakdown["library_workspaces"] = CUBLAS_WORKSPACE_BYTES
    # Reserved-but-free memory of the caching allocator, from replaying the step's allocations
    # (fragment.py); for sharded multi-GPU setups the single-GPU replay is scaled to the smaller peak.
    own = setup if setup.num_gpus == 1 else _single_gpu(setup)  # as _single_gpu, without its cache
    replayed = own if fragmentation_like is None else _single_gpu(fragmentation_like)
    sim_alloc, _, frag = fragmentation(arch, replayed, targets)
    # what torch allocates: all but the context, the kernels and the paged (managed) states
    allocated = (
        sum(breakdown.values())
        - breakdown["cuda_context"]
        - breakdown["cuda_kernels_and_handles"]
        - breakdown.get("optimizer_states_paged", 0)
    )
    if sim_alloc and replayed is not own and replayed != own:
        frag = frag * allocated // sim_alloc
        assumptions.append("Allocator fragmentation scaled from a replay of a neighbouring setup.")
    breakdown["allocator_fragmentation"] = frag
    if shard_params and not setup.full_model_load_per_gpu:
        assumptions.append(
            "Sharded loading (accelerate fsdp_cpu_ram_efficient_loading / DeepSpeed zero.Init): no rank "
            "holds the whole model; loading it whole on every GPU before sharding needs the full "
            "model's size per GPU at load, and nvidia-smi keeps showing that after sharding."
        )
    if shard_params and setup.full_model_load_per_gpu:
        # Every rank first loads the whole model (from_pretrained) and only then shards it: the
        # caching allocator keeps those segments, so nvidia-smi never shows less than the full load.
        floor = (
            breakdown["cuda_context"]
            + breakdown["cuda_kernels_and_handles"]
            + _allocated(weight_groups)
            + CUBLAS_WORKSPACE_BYTES
        )
        breakdown["cached_full_model_load"] = max(0, floor - sum(breakdown.values()))
    moe_excess = 0 if shard_params else moe_load_excess(arch, setup)
    if moe_excess:
        # The fused-expert conversion's freed transients stay reserved (moe_load.py); the step's own
        # transients fit inside them, so the load is a floor rather than an addition.
        floor = sum(breakdown[k] for k in ("cuda_context", "cuda_kernels_and_handles", "weights"))
        floor += breakdown.get("adapters", 0) + CUBLAS_WORKSPACE_BYTES + moe_excess
        breakdown["moe_load_cache"] = max(0, floor - sum(breakdown.values()))
    peak = sum(breakdown.values())

    assumptions.append(
        f"Peak phase: {best_name.replace('_', ' ')}; "
        f"every sequence is exactly {setup.seq_len} tokens (no padding)."
    )
    assumptions.append(
        "CUDA context and lazily loaded kernels as measured on an H200 (driver 580, CUDA 13, torch 2.11); "
        "other GPUs and drivers differ by up to a few hundred MiB."
    )
    if setup.method == "qlora":
        assumptions.append(
            "QLoRA: NF4 weights (bitsandbytes), embeddings/norms/lm_head cast to fp32 by "
            "prepare_model_for_kbit_training, so activations are fp32."
        )
    if setup.method != "full":
        assumptions.append("LoRA adapters are fp32 (peft autocast_adapter_dtype=True).")
    if any(st.expert_folds):
        held = "the layer being recomputed holds" if setup.gradient_checkpointing else "every MoE layer keeps"
        assumptions.append(
            "LoRA on the MoE experts (peft target_parameters under transformers 5): each forward folds "
            f"W + BA into a copy of the expert weights ({sum(st.expert_folds) / 2**30:.2f} GiB per layer), "
            f"which {held} until its backward."
        )
    if multi:
        assumptions.append(
            f"{setup.parallelism} over {n} GPUs: per-GPU memory; multi-GPU terms are not calibrated."
        )
    if ds_zero:
        assumptions.append(
            "DeepSpeed ZeRO with the handed-out config: the module is cast to 16 bits, the optimizer "
            "(HF Trainer's, e.g. torch AdamW) runs on an fp32 master partition with fp32 states, "
            "gradients go through reduce buckets of hidden_size^2 elements; the segments its "
            "whole-partition buffers keep reserved come from a replay of DeepSpeed 0.19.6's allocations "
            "(measured on two H200s: h200-k-zero-2gpu)."
        )
    if accel_mp:
        assumptions.append(
            "accelerate FSDP2 with mixed precision upcasts trainable parameters to fp32 (sharded "
            "parameters, gradients and optimizer states in fp32) and all-gathers 16-bit copies."
        )
    if setup.method == "qlora" and arch.is_moe:
        warnings.append(
            Notice(
                "moe_experts_not_quantized",
                "transformers 5 stores MoE experts as fused 3D parameters that bitsandbytes does not "
                "quantize, and prepare_model_for_kbit_training casts them to fp32: QLoRA keeps "
                f"{arch.expert_params / 1e9:,.1f} B expert parameters at 4 bytes each.",
            )
        )
    if sdpa_math and not n_masked:
        warnings.append(_PROBABILITIES_STORED)
    if setup.seq_len > arch.max_position_embeddings:
        warnings.append(
            Notice(
                "seq_len_beyond_context",
                f"seq_len {setup.seq_len} exceeds the model's "
                f"max_position_embeddings {arch.max_position_embeddings}.",
            )
        )
    if peak > 1 << 50:
        warnings.append(
            Notice("absurd_size", "This setup needs more than a petabyte per GPU; it fits nowhere.")
        )
    return MemoryEstimate(
        peak_bytes=peak,
        breakdown=breakdown,
        params_total=arch.params_total,
        params_trainable=params_trainable,
        warnings=tuple(warnings),
        assumptions=tuple(assumptions),
    )


@dataclass(frozen=True)
class _Fsdp:
    layer_weights: int
    layer_grads: int
    root: int


def _fsdp_terms(
    arch: Architecture, setup: TrainingSetup, weight_groups: list[Group], full_grads: int, g_size: int
) -> _Fsdp:
    """Unsharded sizes FSDP2 materializes: one layer's weights and grads, the root's parameters."""
    n = setup.num_gpus
    head = arch.embedding_params + arch.lm_head_params
    root_elem = 4 if setup.method == "qlora" else param_bytes(setup)
    layer_weights = (sum(b * c for b, c in weight_groups) - head * root_elem) // max(arch.num_layers, 1)
    layer_grads = (full_grads - (head * g_size if setup.method == "full" else 0)) // max(arch.num_layers, 1)
    return _Fsdp(max(layer_weights, 0), max(layer_grads, 0), head * root_elem * (n - 1) // n)


@lru_cache(maxsize=4096)
def _single_gpu(setup: TrainingSetup) -> TrainingSetup:
    """The setup the allocator replay runs: FSDP2 sharded (trace.py), DDP with its wrap (ddp.py: the
    same for any GPU count), ZeRO's forward/backward on one GPU (its own replay adds the rest)."""
    if setup.num_gpus == 1 or setup.parallelism == "fsdp":
        return setup
    if setup.parallelism == "ddp":
        return replace(setup, num_gpus=2)
    return replace(setup, num_gpus=1, parallelism="ddp")


def _autocast_copies(
    arch: Architecture, setup: TrainingSetup, phases: dict[str, dict[str, int]], shard: int
) -> None:
    """16-bit copies of fp32 weights that torch.autocast makes for every matmul.

    Autocast caches the cast of a leaf tensor that requires grad until the autocast region exits
    (aten/src/ATen/autocast_mode.cpp `cached_cast`); a frozen weight is cast anew at each use.  Either
    way `linear` saves the 16-bit weight for the input's gradient, so without checkpointing every
    layer's copies live until its backward; with checkpointing only the lm_head's copy is saved (the
    layers recompute theirs one at a time), but full fine-tuning still holds the whole cache at the
    end of the forward.
    """
    # bnb Linear4bit layers are not autocast (their weight is uint8): only the lm_head is copied.
    lin = 0 if setup.method == "qlora" else sum(x.weight_numel * x.layers for x in arch.linears)
    layer_max = 0 if setup.method == "qlora" else sum(x.weight_numel for x in arch.linears)
    head = arch.vocab_size * arch.hidden_size * 2 // shard
    all_layers = 2 * lin // shard
    one_layer = 2 * layer_max // shard
    full = setup.method == "full"
    if setup.gradient_checkpointing:
        phases["forward"]["autocast_weight_copies"] = head + (all_layers if full else one_layer)
        phases["backward_loss"]["autocast_weight_copies"] = head
        phases["backward_top"]["autocast_weight_copies"] = head + one_layer
        phases["backward_bottom"]["autocast_weight_copies"] = one_layer
    else:
        phases["forward"]["autocast_weight_copies"] = head + all_layers
        phases["backward_loss"]["autocast_weight_copies"] = head + all_layers
        phases["backward_top"]["autocast_weight_copies"] = head + all_layers
        phases["backward_bottom"]["autocast_weight_copies"] = one_layer
