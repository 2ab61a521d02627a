"""Host (CPU) time of one training micro-step in eager PyTorch: ops dispatched from Python, per mechanism."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.core import moe_lora
from app.core.activations import dtypes_for
from app.core.architecture import Architecture
from app.core.setup import TrainingSetup

if TYPE_CHECKING:
    from app.core.throughput import Calibration

# Host work in "kernel equivalents" (one eager op dispatched from Python), counted from the transformers
# 5 modeling code: a Llama-style layer's forward launches ~40 ops besides its projections (2 RMSNorms of
# ~7 ops, RoPE ~12, SDPA, residual adds, SwiGLU, reshape copies), one GEMM per projection; QLoRA's
# Linear4bit adds dequantize + 2 casts; a peft LoRA wrapper adds cast, lora_A, lora_B, scale, add, cast.
# Backward: twice the non-GEMM ops, one GEMM per frozen projection and two per trained one, ~8 per LoRA
# adapter. Each trained tensor costs an AccumulateGrad node and a gradient allocation; non-reentrant
# gradient checkpointing runs Python pack/unpack hooks per saved tensor on top of the recomputation.
_HOST_OPS_PER_LAYER = 40
_HOST_OPS_EAGER = 15
# Extra RMSNorms, per pass, counted with torch's dispatcher on the real modules (CPU, transformers 5.24,
# LoRA q/v + non-reentrant checkpointing, 4- minus 2-layer models): a Qwen3 layer dispatches 78 more
# aten ops than a Llama layer for its two q/k norms (~10 per norm and pass: to(fp32), pow, mean, add,
# rsqrt, mul, to, mul and their backward), a Gemma-3 layer 209 more for its four (two sandwich norms
# and q/k norms: ~12 each, Gemma's `* (1 + weight.float())` adds a cast and an add); 130 more without
# checkpointing. Each pass here is one of forward, recompute and backward (counted twice).
_HOST_OPS_PER_NORM = 10
_HOST_OPS_PER_NORM_GEMMA = 12
# MoE layer (transformers 5 integrations/moe.py grouped_mm_experts_forward and the top-k router): router
# linear, softmax, topk, renormalize, cast; sort, gather, histc, cumsum, two grouped GEMMs, gate,
# routing-weight mul, un-permute (empty_like, arange, index_put, index), sum, cast: a fixed count for any
# number of experts. Counted with torch's dispatcher on the real modules (CPU, transformers 5.24, LoRA
# q/v + checkpointing): a Qwen3-MoE layer dispatches 22 more ops per forward and 34 more per backward
# than a dense Qwen3 layer, whose three MLP projections are in `linears` while experts are not (+3 each).
_HOST_OPS_MOE_FWD = 25
_HOST_OPS_MOE_BWD = 37
# Full fine-tuning of fused 3-D experts: backward's host time per MoE layer rises by ~3.4 ms in the
# profiler's process without more launches (Qwen3-MoE 1x1024: 2,178 kernels in 93.0 ms and 2,348 in 88.2 ms
# against its LoRA twin's 2,324 in 62.3 and 2,477 in 64.1, f-profile-010/011, i-profile-stalls-007/008:
# 4.3 and 3.4 ms per layer beyond the twin's time per launch; Mixtral 847 in 35.2 ms against 1,008 in 27.5,
# g-profile-010/009: 3.0 ms), independent of the experts' count and size (128 x 768 vs 8 x 14336). The
# LoRA twins' host time runs 0.85 x faster in the harness than in the profiler's process (c-large-008 and
# e-013 against those profiles), so 3.4 x 0.85 = 2.9 ms = 165 op equivalents at host_s_per_kernel.
_HOST_OPS_MOE_FULL_BWD = 165
# peft's ParamWrapper (LoRA on MoE parameters, moe_lora) registers a parametrization on its module at every
# forward and removes it after (`_activate_lora`: torch.nn.utils.parametrize.register_parametrization, which
# swaps the module's class for a new one, and remove_parametrizations): Python work without launches. Fitted
# on batch n (n-moe-lora-006: the router's wrapper alone, 2.4 ms per layer over two forwards, i.e. ~68 op
# equivalents a wrapper and forward), checked on n-001..005 and m-blind-wide-014.
_HOST_OPS_PARAM_WRAPPER = 68
HOST_OPS_HEAD_AND_LOSS = 40  # embedding, final norm, lm_head, fp32 upcast, log_softmax, nll, grads


def host_kernels(arch: Architecture, setup: TrainingSetup, targets: frozenset[str], c: Calibration) -> float:
    """Op equivalents the host dispatches in one micro-step (forward, recompute, backward, grads)."""
    d = dtypes_for(setup)
    full, qlora, gc = setup.method == "full", setup.method == "qlora", setup.gradient_checkpointing
    layers = arch.num_layers
    params = targets & moe_lora.PARAMS  # peft ParamWrappers (MoE router / experts), not Linear wrappers
    n_lin, n_lora = len(arch.linears), len(targets - params)
    base_ops = _HOST_OPS_PER_LAYER + (_HOST_OPS_EAGER if setup.attention == "eager" else 0)
    # extra norms: Gemma's pre/post norms, and Qwen3/Gemma 3 RMSNorms on q and k (per head)
    extra = max(arch.norms_per_layer - 2, 0) + (2 if arch.qk_norm else 0)
    norm_ops = _HOST_OPS_PER_NORM_GEMMA if arch.norms_per_layer > 2 else _HOST_OPS_PER_NORM
    base_ops += norm_ops * extra + (3 if arch.attn_logit_softcapping else 0)
    # per pass (forward, backward, recompute): a peft LoRA wrapper and a bnb Linear4bit are Python
    # modules/autograd functions whose per-call host cost is fitted (in op equivalents)
    wrapper_ops = n_lora * c.host_ops_lora + (n_lin * c.host_ops_qlora_linear if qlora else 0.0)
    # autocast: each F.linear dispatches a cast of its input and of its fp32 weight (frozen weights are
    # not in autocast's cast cache), and backward runs the input cast's ToCopyBackward: ~3 extra ops per
    # Linear (b-architectures-031 vs its bf16 twins 020/027/028/032; a-011 vs a-001)
    amp_ops = 2 * n_lin if d.autocast and not qlora else 0
    fwd_ops = base_ops + n_lin + wrapper_ops + amp_ops
    bwd_ops = 2 * base_ops + n_lin * (2 if full else 1) + wrapper_ops + amp_ops // 2
    n_wrap = n_lora + (n_lin if qlora else 0)
    gc_ops = (fwd_ops + c.host_ops_gc_per_layer + n_wrap * c.host_ops_gc_per_wrapper) if gc else 0.0
    moe_ops = _HOST_OPS_MOE_FWD * (1 + (1 if gc else 0)) + _HOST_OPS_MOE_BWD
    experts_train = full or bool(params - {moe_lora.ROUTER})
    moe_ops += _HOST_OPS_MOE_FULL_BWD if experts_train else 0
    moe_ops += _HOST_OPS_PARAM_WRAPPER * len(params) * (1 + (1 if gc else 0))
    kernels = layers * (fwd_ops + bwd_ops + gc_ops) + arch.num_moe_layers * moe_ops + HOST_OPS_HEAD_AND_LOSS
    kernels += c.host_ops_per_trained_tensor * trained_tensors(arch, setup, targets)
    if setup.num_gpus > 1 and setup.parallelism in ("fsdp", "zero3"):
        kernels += c.host_ops_shard_per_layer * layers * (2 + (1 if gc else 0))

    return kernels


def fallback_expert_mms(arch: Architecture, setup: TrainingSetup) -> float:
    """Per-expert mm calls of torch's grouped-GEMM fallback (fp32 experts) in one micro-step."""
    # Two grouped GEMMs per MoE layer per pass (gate_up, down): forward, recompute, backward's input
    # grads, and weight grads when the experts train; one mm per expert that received a token.
    e, routed = arch.num_experts, setup.batch_size * setup.seq_len * arch.experts_per_token
    hit = e * (1.0 - (1.0 - 1.0 / e) ** routed)
    passes = 2 + (1 if setup.gradient_checkpointing else 0) + (1 if setup.method == "full" else 0)
    return hit * 2 * arch.num_moe_layers * passes


def trained_tensors(arch: Architecture, setup: TrainingSetup, targets: frozenset[str]) -> int:
    """How many parameter tensors receive gradients (AccumulateGrad nodes, optimizer tensor lists)."""
    if setup.method != "full":
        return 2 * sum(x.layers for x in arch.linears if x.name in targets) + 2 * arch.num_moe_layers * len(
            targets & moe_lora.PARAMS
        )
    tensors = (
        1 + (0 if arch.tie_embeddings else 1) + sum(x.layers * (2 if x.bias else 1) for x in arch.linears)
    )
    tensors += arch.num_layers * (arch.norms_per_layer + (2 if arch.qk_norm else 0)) + 1
    return tensors + 3 * arch.num_moe_layers  # fused expert gate_up and down, router
