"""Training tokens/s for a model, method and settings on a GPU setup: FLOPs, bytes and host time per step.

One micro-step (batch x seq tokens per GPU) is modelled from mechanisms, then timed against the GPU:
- GEMMs per pass (forward; recompute under gradient checkpointing; backward activation grads; weight
  grads for full fine-tuning only, since LoRA's frozen base needs none) with a roofline per pass:
  max(FLOPs / matmul rate, weight bytes / bandwidth), so small batches become weight-bandwidth bound;
- attention's sequence-dependent FLOPs (causal kernels skip half the score matrix; eager does not);
- memory traffic of elementwise work (norms, RoPE, SwiGLU, residuals, logits/loss, LoRA casts),
  QLoRA's dequantization of every NF4 weight per pass, and the optimizer step;
- host time: PyTorch eager dispatches every kernel from Python; the GPU runs asynchronously, so a
  step takes max(GPU time, host time): small models and batches are launch-bound. Device-to-host
  syncs (torch's fp32 grouped-GEMM fallback for MoE experts) split the step into segments that
  overlap only within themselves.
Reference stack (design.md): plain PyTorch loop, transformers/peft/bitsandbytes as on the H200.
The efficiency constants in CALIBRATION are fitted on the H200 runs of data/calibration/ (see
scripts/fit_throughput.py); other GPUs are scaled by their tensor rate and bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from app.core import moe_lora
from app.core.activations import dtypes_for, lora_target_names, masked_sliding, sdpa_math
from app.core.architecture import Architecture
from app.core.gpu import GpuSpec, interconnect_of
from app.core.setup import TrainingSetup
from app.core.throughput_host import HOST_OPS_HEAD_AND_LOSS, fallback_expert_mms, host_kernels

CALIBRATION_GPU = "h200"


@dataclass(frozen=True)
class Calibration:
    """Efficiency constants of the reference stack, fitted on measured runs of one GPU."""

    matmul_eff: float  # share of the measured square-matmul peak that training GEMMs reach
    attn_eff: float  # share of the 16-bit tensor peak SDPA's fused attention kernels reach
    fp32_eff: float  # share of the fp32 (CUDA-core) peak fp32 GEMMs reach
    bandwidth_eff: float  # share of the spec bandwidth streaming kernels reach
    host_s_per_kernel: float  # host (Python + dispatcher + launch) time per kernel in eager mode
    adamw_passes: float  # optimizer-step HBM traffic per trainable parameter, in parameter sizes
    bnb8_bytes: float  # bitsandbytes 8-bit AdamW, bytes per parameter (blockwise quantize/dequantize)
    adafactor_passes: float
    host_ops_gc_per_layer: float  # checkpoint hooks' host cost per layer, in op equivalents
    host_ops_per_trained_tensor: float
    overlap_p: float  # host/GPU overlap: step = (gpu^p + host^p)^(1/p); large p is a perfect max
    host_ops_lora: float  # host cost of one peft LoRA wrapper call (op equivalents, per pass)
    host_ops_qlora_linear: float  # host cost of one bnb Linear4bit call (dequantize, casts), per pass
    host_ops_per_expert: float  # MoE fp32 experts: host cost of one mm of the grouped-GEMM fallback loop
    dequant_bytes: float  # effective HBM bytes per NF4 parameter per dequantization (read 0.5, write 2)
    fp32_attn_eff: float  # share of the fp32 peak SDPA reaches on fp32 inputs (QLoRA's fp32 stream)
    logits_bytes: float  # HBM bytes per vocabulary entry per token for logits, fp32 upcast and loss
    host_ops_gc_per_wrapper: float  # checkpoint hooks per LoRA/Linear4bit wrapper per layer
    comm_eff: float  # share of the interconnect's NCCL bus bandwidth that FSDP/DDP collectives reach
    comm_overlap: float  # share of the compute time under which communication hides
    host_ops_shard_per_layer: float  # FSDP/ZeRO-3 pre/post hooks per sharded layer per pass
    score_bytes_eager: float  # HBM bytes per attention score of eager attention, fwd+bwd
    score_bytes_math: float  # the same for SDPA's math kernel (fp32 inputs with grouped k/v heads)
    elementwise_passes: float  # elementwise HBM passes over (hidden + MLP width) per token, layer and pass
    fused_slice_passes: float  # passes over fused qkv/gate_up outputs (strided slices, their grads)
    lora_io_bytes: float  # HBM bytes per adapter in+out feature per token and pass of peft's fp32 GEMMs
    grouped_mm_eff: float  # share of the 16-bit GEMM rate torch's CUTLASS grouped GEMM (MoE experts) reaches
    fitted_on: str  # which runs fixed these numbers


# Two kinds of constants. Measured (held by the fit): the GEMM, attention and fp32 rates, the optimizer's
# and dequantization's traffic, the elementwise and fused-slice passes, peft's adapter GEMMs and the MoE
# grouped GEMM's rate, read off torch.profiler
# traces of 38 training steps (scripts/profile_step.py; data/calibration/profiles/). Fitted by
# scripts/fit_throughput.py --fit (Nelder-Mead in log space, squared log errors plus a weight on the
# worst run, each error capped at 25% so that a run missing a mechanism does not bend every constant) on
# every single-GPU H200 run of data/calibration/h200-{a,b,c,e}-*.jsonl: host cost per op, checkpointing
# and wrapper hooks, logits/loss, 8-bit/Adafactor traffic, eager/math score bytes. The
# profiles showed why the earlier all-fitted constants fitted for the wrong reasons: GEMMs ran 1.5x
# faster than fitted (821 vs 546 TFLOP/s), elementwise kernels took ~2x the fitted bytes, and NF4
# dequantization 4 rather than 17.5 bytes per parameter (the rest was host time). MoE needs no fitted
# constant: its host ops are counted (_HOST_OPS_MOE_*; full fine-tuning's backward cost measured) and
# host_ops_per_expert is a prior (one op per mm of the fp32 fallback). Single-GPU constants are fitted on
# the single-GPU runs, then the three multi-GPU ones on batch d with those held.
# Accuracy: median |error| 5.1%, 78 of 90 single-GPU runs within 15% (batches g and h, repeats, included);
# beyond 24% only c-large-001, e-gemma3-mixtral-fp16-006 and h-repeats-001 (+34%, +28%, -25%: host speed
# moved between processes; their other runs came out at -8.5%, +1.4% and +22%); two-GPU runs within 14%
# (tests/core/test_throughput_calibration.py, which also states the noise rules, the host-time spread
# measured between processes, and the misses left). Blind batch j: median 6.0%, 94 of 113 within 15%.
CALIBRATION = Calibration(
    # Measured, not fitted (torch.profiler, data/calibration/profiles/, scripts/profile_step.py): the
    # 16-bit GEMM kernels (nvjet/cuBLAS) of 19 dense profiled steps ran at 665-882 TFLOP/s, median 821 =
    # 1.04 x the 790 of a square 8192^3 matmul on random data; fp32 GEMMs (QLoRA's fp32 lm_head, SDPA
    # math's fp32 score GEMMs, MoE experts' fp32 fallback mms) at 34-46 TFLOP/s over six QLoRA
    # profiles, median 42 = 0.63 of the 66.8 fp32 peak (an 8B lm_head alone: 51.5).
    matmul_eff=1.04,
    # SDPA's fused attention kernels (cuDNN/flash): 242-297 TFLOP/s of causal score FLOPs in the bf16
    # LoRA profiles (Qwen2.5-14B, Mistral-7B, Llama-3.2-1B, Phi-3), 0.27 of the 989 dense peak.
    attn_eff=0.27,
    fp32_eff=0.63,
    bandwidth_eff=0.8,
    host_s_per_kernel=1.751e-05,
    # torch's foreach AdamW makes 20 passes of the parameter size (see _optimizer_bytes); its
    # multi_tensor_apply kernels moved 2.9-3.3 TB/s in every profiled full fine-tune (Qwen3-MoE 77.4 ms,
    # Mixtral 76 ms, Phi-3 47.2 ms, Gemma-3-1B 13 ms of optimizer kernels for 5.61/6.07/3.82/1.00 B bf16
    # parameters), 0.64 of the spec bandwidth: 20 x 0.8 / 0.64 = 24.6 passes at bandwidth_eff.
    adamw_passes=24.6,
    bnb8_bytes=125.2,
    adafactor_passes=44.33,
    host_ops_gc_per_layer=161.7,
    host_ops_per_trained_tensor=7.2,
    overlap_p=7.75,
    host_ops_lora=4.99,
    host_ops_qlora_linear=10.2,
    host_ops_per_expert=1.0,
    # bitsandbytes kDequantizeBlockwise: 23.2 ms for Mistral-7B's and 40.9 ms for Qwen2.5-14B's NF4
    # weights dequantized three times a step (f-profile-005/014): 4.0-4.3 bytes per parameter per
    # dequantization at bandwidth_eff (0.5 read, 2 written, absmax, at ~60% of streaming bandwidth).
    dequant_bytes=4.1,
    fp32_attn_eff=0.579,
    logits_bytes=92.1,
    host_ops_gc_per_wrapper=20.12,
    # multi-GPU: fitted on h200-d-fsdp-2gpu 001-004 only (FSDP2 on two NVLink H200s): the collectives
    # reach the link's rate, but only ~22% of the compute hides them, and FSDP2's per-layer hooks cost
    # ~1.8 ms of host time per layer and pass; PCIe and more than two GPUs are extrapolated.
    comm_eff=0.987,
    comm_overlap=0.2206,
    host_ops_shard_per_layer=102.4,
    score_bytes_eager=88.96,
    score_bytes_math=55.5,
    # Measured: the bf16 profiles' non-GEMM kernel time (elementwise, copies, reductions, loss) needs
    # 19-26 passes for dense layers (Llama-3.2-1B, Llama-3.1-8B, Mistral-7B, Gemma-3-1B; Qwen2.5-14B
    # 30.6), with the logits/loss and LoRA-cast terms at their own values: held at 22.
    elementwise_passes=22.0,
    # Measured: Phi-3's non-GEMM kernel time (copies, elementwise, reductions, loss) was 68.3 ms in its
    # full 2x1024 step (f-profile-013) and 163.7 / 164.0 ms in its LoRA qkv_proj 4x1024 step
    # (f-profile-012, i-profile-stalls-009), against 38.9 and 95.4 ms from every other stream term: 33.6
    # and 39.2 passes over the fused qkv + gate_up widths; held at their mean (the fit had given 1.05,
    # held down by the host-bound full and QLoRA twins, and missed b-architectures-009 by +19%).
    fused_slice_passes=36.0,
    # peft's rank-r fp32 adapter GEMMs are bound by reading and writing their fp32 in/out features, not
    # by FLOPs: their kernels took 1.4-20.7 ms in the LoRA profiles, 11-15 bytes per (in + out) feature
    # per token and pass at bandwidth_eff (Mistral 11.8, Qwen2.5-14B 12.4, Llama-3.2-1B 11.2, Mixtral
    # 12.3, Gemma-3 14.8; Phi-3's fused qkv 8.4); FLOPs at the fp32 rate would give a third of that.
    lora_io_bytes=12.0,
    # torch's sm90 CUTLASS grouped GEMM (bf16 MoE experts) is slower than the nvjet dense GEMMs: Mixtral's
    # 24 expert GEMMs of a LoRA 2x1024 step (512 routed tokens per expert) took 26.27 / 26.21 / 26.59 ms
    # for 1.73e13 FLOPs (g-profile-009, h-profile-nvml-003, i-profile-stalls-006): 659 TFLOP/s, 0.80 x the
    # 821 of the dense GEMMs. Qwen3-MoE's (64 routed tokens per expert) are bound by streaming its experts'
    # weights (48 kernels, 7.27 ms for 3 passes over 9.7 GB, f-profile-011), which the roofline keeps.
    grouped_mm_eff=0.80,
    fitted_on=(
        "h200-d-fsdp-2gpu (4 two-GPU FSDP2 runs) and "
        "h200-a-llama-3.2-1b-sweeps, h200-b-architectures, h200-c-large, h200-e-gemma3-mixtral-fp16: "
        "78 single-GPU H200 runs (Llama-3.2-1B/3B, Llama-3.1-8B, Mistral-7B, Qwen2.5-0.5B/1.5B/14B, "
        "Gemma-2-2B, Gemma-3-1B/4B, Phi-3-mini, Qwen3-30B-A3B cut to 8 layers, Mixtral-8x7B cut to 4; "
        "full/LoRA/QLoRA; bf16/fp16/amp) and torch.profiler traces of 38 steps (data/calibration/profiles); "
        "checked, not fitted: h200-f-ddp-2gpu (3 two-GPU DDP runs), h200-g-repeats (7 repeated setups), "
        "h200-h-repeats (4 repeated setups and a bf16 twin), "
        "h200-i-fit-limit (2 runs at 126/139 GiB of the H200 and one out of memory), "
        "h200-j-blind-gaps (21 runs predicted before they ran: Qwen3 dense, 8-bit/paged/SGD/Adafactor "
        "LoRA and QLoRA, fp32 and amp_fp16 LoRA, eager at 4096), "
        "h200-l-blind-load (8 common setups predicted before they ran: Gemma-2-9B, Mistral-7B, "
        "Qwen2.5-7B/14B, Llama-3.2-3B/3.1-8B, Phi-3-mini, Gemma-3-4B), "
        "h200-m-blind-wide (20 setups predicted before they ran: Phi-4, DeepSeek-R1-Distill-Qwen-7B, "
        "TinyLlama, Gemma-2 under SDPA, fp32 and amp_bf16 full, Qwen3-MoE QLoRA all-linear), "
        "h200-n-moe-lora (6 MoE runs with LoRA on experts and routers, predicted before they ran; "
        "the parametrization's host cost then fitted on n-moe-lora-006), "
        "h200-o-multi-blind (6 two-GPU DDP/FSDP2/ZeRO runs predicted before they ran)"
    ),
)

# Datacenter cards reach ~80% of their spec in square bf16 matmuls (measured: H100 SXM 784-798 of 989,
# H200 790 of 989, A100 SXM 264.5 of 312, L40S 269 of 362; zzc0721/torch-performance-test-data);
# GeForce cards boost above their rated clocks and reach about 100% (RTX 4090 160-173 of 165).
_SPEC_TO_MEASURED = {True: 1.0, False: 0.8}

# Non-tensor fp32 rate as a fraction of the dense 16-bit tensor rate, by chip class (vendor spec
# sheets): GA100 19.5/312, GH100 67/989, B200 80/2250, GA102/AD10x pro & datacenter (A10, L4, L40S,
# RTX A/Ada) 1/4, GeForce 1/2 (its tensor rate with fp32 accumulate is exactly 2x fp32), Volta/Turing
# 15.7/125 and 8.1/65, CDNA3 163.4/1307. Apple GPUs have no separate tensor rate.
_FP32_SHARE = (
    ("ga100", 1 / 16),
    ("a100", 1 / 16),
    ("gh100", 1 / 14.8),
    ("hopper", 1 / 14.8),
    ("b200", 1 / 28),
    ("volta", 1 / 8),
    ("turing", 1 / 8),
    ("cdna", 1 / 8),
    ("apple", 1.0),
)



# MoE layers: the non-GEMM kernels of a routed token copy (sort, gather, masked_fill/index_put
# un-permute, routing-weight multiply; several non-vectorized) took 1.4-1.8x a dense layer's elementwise
# time per element: 31-32 effective passes for Mixtral (g-profile-009/010, i-profile-stalls-006) and
# 38-39 for Qwen3-MoE (f-profile-010/011, i-profile-stalls-007/008) against 19-26 for dense layers.
_MOE_ROUTING_PASSES = 1.6


@dataclass(frozen=True)
class Throughput:
    """Training speed of a whole setup (all GPUs) and where the time of one micro-step goes."""

    gpu_slug: str
    num_gpus: int
    tokens_per_s: float  # whole setup
    step_s: float  # one micro-step (batch x seq tokens on every GPU)
    flops_per_token: float  # executed, recomputation included
    model_flops_per_token: float  # 6N-style useful work (no recomputation)
    mfu: float  # model FLOPs / (time x spec dense tensor rate)
    bound: str  # "compute" | "memory" | "host" | "communication"
    breakdown_s: dict[str, float] = field(default_factory=dict)
    scaled_from: str | None = None  # None on the calibration GPU itself
    assumptions: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Work:
    """GPU-independent work of one micro-step on one GPU."""

    tokens: int
    gemm_flops: tuple[tuple[float, float], ...]  # (16-bit FLOPs, weight bytes) per pass
    fp32_flops: float
    attn_flops: float
    attn_fp32: bool
    attn_gemm: bool  # scores materialized by batched GEMMs (eager, SDPA's math kernel), not a fused kernel
    stream_bytes: float  # elementwise + logits + casts + dequantization
    opt_bytes: float  # optimizer step, per optimizer step
    kernels: float
    comm_bytes: float  # per micro-step, over the interconnect
    comm_per_optimizer_step: bool
    model_flops: float  # per token
    # MoE experts: (GEMM FLOPs, per-expert mm calls if torch's grouped GEMM falls back to its loop,
    # weights in fp32, weights in bf16), and the lm_head/loss segment (16-bit FLOPs, fp32 FLOPs, stream
    # bytes, host ops). The fallback's device-to-host syncs stop the host from running ahead of the GPU,
    # so the expert loops and the head are then timed as segments of their own instead of inside one
    # step-wide max(GPU, host).
    experts: tuple[float, float, bool, bool] = (0.0, 0.0, False, False)
    head_segment: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    lora: tuple[float, float] = (0.0, 0.0)  # peft's fp32 adapter GEMMs: FLOPs, HBM bytes
    expert_pass_flops: float = 0.0  # 16-bit MoE expert GEMM FLOPs inside each entry of gemm_flops


def fp32_tflops(gpu: GpuSpec) -> float:
    """The GPU's non-tensor fp32 rate (derived from its 16-bit tensor rate by chip class)."""
    text = f"{gpu.architecture} {gpu.slug} {gpu.platform}".lower()
    for key, share in _FP32_SHARE:
        if key in text:
            return gpu.tensor_tflops * share
    return gpu.tensor_tflops * (0.5 if gpu.consumer else 0.25)


def _grouped_gemm_kernel(gpu: GpuSpec) -> bool:
    """Whether torch's bf16 grouped GEMM has its CUTLASS kernel on this GPU (sm90 and sm100 only)."""
    return gpu.compute_capability.split(".")[0] in ("9", "10")


def matmul_tflops(gpu: GpuSpec) -> float:
    """The 16-bit GEMM rate to scale from: measured square-matmul peak, else spec x typical share."""
    if gpu.measured_bf16_tflops and gpu.bf16_supported:
        return gpu.measured_bf16_tflops
    return gpu.tensor_tflops * _SPEC_TO_MEASURED[gpu.consumer]


@lru_cache(maxsize=4096)  # GPU-independent: a ranking asks for it once per setup, not per card
def _work(arch: Architecture, setup: TrainingSetup, grad_accum: int, cal: Calibration | None = None) -> _Work:
    """FLOPs, bytes and kernels of one micro-step on one GPU, from the architecture and the setup."""
    c = cal or CALIBRATION
    s, b = setup.seq_len, setup.batch_size
    t = s * b
    d = dtypes_for(setup)
    full, qlora, gc = setup.method == "full", setup.method == "qlora", setup.gradient_checkpointing
    h, v, layers = arch.hidden_size, arch.vocab_size, arch.num_layers
    targets = lora_target_names(arch, setup.lora_targets) if not full else frozenset()
    r = setup.lora_rank

    lin = sum(x.layers * x.weight_numel for x in arch.linears)
    experts_active = arch.num_moe_layers * arch.experts_per_token * 3 * h * arch.moe_intermediate_size
    experts_all = arch.expert_params
    router = arch.router_params
    # QLoRA: bitsandbytes quantizes nn.Linear only; transformers 5 keeps MoE experts as 3D parameters,
    # which prepare_model_for_kbit_training casts to fp32, so their GEMMs run at the fp32 rate. fp32
    # training and autocast's fp32 masters do the same: transformers casts the grouped GEMM's input to
    # the weight's dtype (integrations/moe.py: grouped_mm is not autocast-enabled).
    experts_fp32 = arch.is_moe and (qlora or setup.precision in ("fp32", "amp_bf16", "amp_fp16"))
    layer_flops = 2.0 * (lin + router + (0 if experts_fp32 else experts_active))  # forward, per token
    head = 2.0 * h * v
    adapter = sum(x.layers * r * (x.in_features + x.out_features) for x in arch.linears if x.name in targets)

    # Bytes of the weights a GEMM pass reads: NF4 weights are dequantized to bf16 first (counted in
    # stream_bytes) and the GEMM reads the bf16 copy; fp32 masters under autocast are cast likewise.
    w_elem = 4 if setup.precision == "fp32" else 2
    layer_w = (lin + router + (0 if experts_fp32 else experts_all)) * w_elem
    head_fp32 = qlora or setup.precision == "fp32"  # peft casts QLoRA's lm_head to fp32
    head_w = h * v * (4 if head_fp32 else w_elem)

    fwd, recompute, bwd_act, bwd_w = layer_flops * t, layer_flops * t if gc else 0.0, layer_flops * t, 0.0
    if full:
        bwd_w = layer_flops * t
    # LoRA on the experts (moe_lora) folds W + BA per forward and needs the experts' weight gradient
    wrapped = moe_lora.expert_params(arch, targets, r) if not full else ()
    expert_numel = 3 * h * arch.moe_intermediate_size * arch.num_experts or 1
    w_share = sum(p.numel for p in wrapped if p.name != moe_lora.ROUTER) / expert_numel
    expert_passes = 2 + (1 if gc else 0) + (1 if full else w_share)  # fwd, dX, recompute, dW
    fp32_flops = 2.0 * experts_active * t * expert_passes if experts_fp32 else 0.0
    if head_fp32:
        fp32_flops += head * t * (3 if full else 2)
        if setup.precision == "fp32":
            fp32_flops += fwd + recompute + bwd_act + bwd_w
            fwd = recompute = bwd_act = bwd_w = 0.0
    else:
        fwd += head * t
        bwd_act += head * t
        bwd_w += head * t if full else 0.0
    passes = [(fwd, layer_w + (0 if head_fp32 else head_w)), (bwd_act, layer_w)]
    fold_flops, fold_bytes = _folds(wrapped, arch.num_moe_layers, gc, 4 if experts_fp32 else w_elem)
    if experts_fp32:
        fp32_flops += fold_flops
    elif fold_flops:
        passes.append((fold_flops, 0))
    if gc:
        passes.append((recompute, layer_w))
    if full:
        passes.append((bwd_w, layer_w))
    # LoRA adapters run in fp32 (peft's autocast_adapter_dtype): forward, recompute, and backward's
    # activation and weight grads; small GEMMs, counted at the fp32 rate.
    lora_passes = 3 + (1 if gc else 0)
    lora_flops = 2.0 * adapter * t * lora_passes
    lora_io = sum(x.layers * (x.in_features + x.out_features) for x in arch.linears if x.name in targets)
    lora_bytes = c.lora_io_bytes * lora_io * t * lora_passes

    # Attention scores: QK^T and PV, 2 FLOPs per MAC; causal kernels (flash / memory-efficient SDPA)
    # skip the upper triangle, eager computes the full matrix. Backward is 2x forward (dQ, dK, dV, dP),
    # 2.5x for the fused kernels, which recompute P.
    # SDPA's math fallback (fp32 with grouped k/v heads, see activations.sdpa_math) behaves like eager:
    # full QK^T and PV as batched GEMMs and the fp32 probabilities round-tripping through HBM; it was
    # the missing cost of QLoRA at long sequences (b-architectures-026, 1x4096: 32 heads x 4096^2 x 4 B
    # per layer and pass).
    materialized = setup.attention == "eager" or sdpa_math(arch, setup)
    causal = not materialized
    keys = (s + 1) / 2 if causal else s
    if arch.sliding_window and causal and arch.sliding_layers:
        share = arch.sliding_layers / layers
        if masked_sliding(arch, setup):
            # SDPA has no window argument: transformers passes the windowed layers an explicit mask, and
            # the masked kernel computes every key (no causal or window block skipping): Gemma-3-1B's
            # attention kernels took 8.4 ms at 4x1024 and 32.0 ms at 1x4096 (g-profile-006/007), as
            # s keys on its 22 windowed layers give, against 4 ms for both with window-limited keys.
            keys = keys * (1 - share) + s * share
        elif setup.attention == "flash_attention_2" and s > arch.sliding_window:
            keys = keys * (1 - share) + min(keys, float(arch.sliding_window)) * share
    attn_fwd = 4.0 * layers * arch.q_width * keys * t
    attn = attn_fwd * ((1 if gc else 0) + 1 + (2.5 if causal else 2.0))

    n_pass = 3 + (1 if gc else 0)  # forward, backward (counted twice: reads and writes), recompute
    act = d.residual
    # Elementwise passes (calibration.elementwise_passes) over h + the MLP's width: RMSNorms, RoPE,
    # residual adds, SwiGLU and casts; many of these kernels run on strided views (RoPE on transposed
    # q/k) well under the bandwidth of contiguous copies, hence ~22 effective passes rather than the ~10
    # a byte count gives. An MoE layer's MLP width is its routed copies, top_k x (expert width + hidden)
    # (gathered inputs, expert activations, weighted outputs), with routing's own kernels on top.
    moe_width = _MOE_ROUTING_PASSES * arch.experts_per_token * (arch.moe_intermediate_size + h)
    dense_layers = layers - arch.num_moe_layers
    widths = dense_layers * (h + arch.intermediate_size) + arch.num_moe_layers * (h + moe_width)
    stream = float(c.elementwise_passes * widths * act * t * n_pass)
    stream += c.logits_bytes * v * t
    if arch.final_logit_softcapping:  # Gemma 2: logits / cap, tanh, * cap, forward and backward
        stream += 6 * 4.0 * v * t
    extra_norms = max(arch.norms_per_layer - 2, 0)  # Gemma 2/3: pre- and post-norms around each block
    stream += extra_norms * 6.0 * h * act * t * n_pass * layers
    for x in arch.linears:
        if x.name in targets:  # peft casts x to fp32 and the fp32 result back, per adapter and pass
            stream += x.layers * (x.in_features * (act + 4) + x.out_features * 12) * t * n_pass
    if arch.fused_qkv:
        # q, k and v are slices of one fused output (Phi-3's qkv[..., :q_pos] etc.); each SliceBackward
        # materializes a zero-filled full-width gradient and copies its slice in (aten slice_backward),
        # then autograd adds the three: ~11 passes over the fused width per token in backward (the CPU
        # dispatcher count of a Phi-3 layer shows 5 more slice_backward/cat than a Llama layer).
        qkv_width = arch.q_width + 2 * arch.num_kv_heads * arch.head_dim
        stream += 11.0 * qkv_width * act * t * layers
    if arch.fused_qkv or arch.fused_gate_up:
        # Every op after a fused projection reads a strided slice of its output (q/k/v, gate/up chunks),
        # which runs PyTorch's non-vectorized elementwise kernel; Phi-3's profiles (f-profile-012/013)
        # spent 2.8-3.3x a Llama layer's elementwise time per element, in those kernels and the cat/fill
        # of the slices' gradients (measured: calibration.fused_slice_passes over the fused widths).
        fused_w = (arch.q_width + 2 * arch.num_kv_heads * arch.head_dim if arch.fused_qkv else 0) + (
            2 * arch.intermediate_size if arch.fused_gate_up else 0
        )
        stream += c.fused_slice_passes * fused_w * act * t * layers
    if materialized:
        # Materialized scores (b x heads x s^2 per layer) round-trip through HBM: QK^T write, softmax
        # in fp32, PV read, about twice that in backward. Eager also adds the 4D causal mask and casts
        # fp32 probabilities back to 16 bits, so each kernel has its own bytes per score (eager fitted
        # on a-009/010 and b-005..007, SDPA math on the fp32 GQA QLoRA runs b-022..026, c-001/004/009).
        # Gemma 2's softcap adds /cap, tanh, *cap and their gradients in fp32.
        score = c.score_bytes_eager if setup.attention == "eager" else c.score_bytes_math
        score += 24.0 if arch.attn_logit_softcapping else 0.0
        stream += score * layers * arch.num_heads * s * t
    stream += fold_bytes
    if qlora:  # every NF4 weight is dequantized in forward, in backward, and again in the recompute
        stream += c.dequant_bytes * lin * (2 + (1 if gc else 0))
    if d.autocast:  # fp32 master weights cast to 16-bit per forward (and recompute): read 4, write 2
        stream += 6.0 * (lin + experts_all + h * v) * (1 + (1 if gc else 0))

    trainable = arch.params_total if full else adapter + arch.num_moe_layers * sum(
        p.a[0] * p.a[1] + p.b[0] * p.b[1] for p in wrapped
    )
    p_elem = 4 if (not full or setup.precision in ("fp32", "amp_bf16", "amp_fp16")) else 2
    opt_bytes = trainable * _optimizer_bytes(setup.optimizer, p_elem, c)

    shards = setup.num_gpus if setup.parallelism in ("fsdp", "zero3") else 1
    opt_bytes /= shards if setup.parallelism in ("fsdp", "zero2", "zero3") and full else 1
    comm, per_opt = _comm_bytes(arch, setup, trainable, p_elem)

    kernels = host_kernels(arch, setup, targets, c)
    experts = (0.0, 0.0, False, False)
    if arch.num_moe_layers:
        experts_bf16 = not experts_fp32 and setup.precision == "bf16"
        experts = (
            2.0 * experts_active * t * expert_passes,
            fallback_expert_mms(arch, setup),
            experts_fp32,
            experts_bf16,
        )
    head_passes = 3 if full else 2
    head_segment = (
        0.0 if head_fp32 else head * t * head_passes,
        head * t * head_passes if head_fp32 else 0.0,
        c.logits_bytes * v * t,
        float(HOST_OPS_HEAD_AND_LOSS),
    )

    model_flops = (6.0 if full else 4.0) * (lin + experts_active + router + h * v) + attn_fwd / t * (
        3.5 if causal else 3.0
    )
    if not full:
        model_flops += 6.0 * adapter
    return _Work(
        tokens=t,
        gemm_flops=tuple(passes),
        fp32_flops=fp32_flops,
        attn_flops=attn,
        attn_fp32=d.attn == 4,
        attn_gemm=materialized,
        stream_bytes=stream,
        opt_bytes=opt_bytes,
        kernels=kernels,
        comm_bytes=comm,
        comm_per_optimizer_step=per_opt,
        model_flops=model_flops,
        experts=experts,
        head_segment=head_segment,
        lora=(lora_flops, lora_bytes),
        expert_pass_flops=0.0 if experts_fp32 else 2.0 * experts_active * t,
    )


def _folds(
    wrapped: tuple[moe_lora.ExpertParam, ...], layers: int, gc: bool, elem: int
) -> tuple[float, float]:
    """FLOPs and bytes of peft's W + BA folds of LoRA-wrapped experts (moe_lora) per micro-step.

    Each fold is a baddbmm, E x (in x rank) @ (rank x out), made twice per forward and recompute:
    register_parametrization (unsafe=False) evaluates the new parametrization once to check its dtype
    and shape (torch/nn/utils/parametrize.py, ParametrizationList.__init__) before the cached
    evaluation the experts use. Its backward makes two more of the same size (the factors' gradients
    from the W-sized gradient); each fold reads W and writes W', and the backward writes and twice
    reads the W-sized gradient.
    """
    folds = 2 * (1 + (1 if gc else 0))
    experts = [p for p in wrapped if p.name != moe_lora.ROUTER]
    flops = sum(2.0 * p.numel * p.rank * (folds + 2) for p in experts)
    numel = sum(p.numel for p in experts)
    return flops * layers, float(numel * elem * (2 * folds + 3) * layers)


def _optimizer_bytes(optimizer: str, p_elem: int, cal: Calibration) -> float:
    """HBM traffic per trainable parameter of one optimizer step (effective, fitted where measured)."""
    if optimizer == "adamw":
        # torch foreach AdamW (torch/optim/adamw.py _multi_tensor_adamw): mul_ (weight decay) 2, lerp_ 3,
        # mul_ 2, addcmul_ 3, sqrt 2, div_ 2, add_ 2, addcdiv_ 4 = 20 passes of the parameter size, at
        # the multi_tensor_apply kernels' measured bandwidth (CALIBRATION.adamw_passes).
        return cal.adamw_passes * p_elem
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        # bitsandbytes 8-bit kernel: param r/w, grad r, two uint8 states r/w, blockwise requantization.
        return cal.bnb8_bytes
    if optimizer == "sgd":
        return 3.0 * p_elem  # momentum 0: read param and grad, write param
    return cal.adafactor_passes * p_elem  # factored second moment, several passes over grads and params


def _comm_bytes(
    arch: Architecture, setup: TrainingSetup, trainable: float, p_elem: int
) -> tuple[float, bool]:
    """Bytes each GPU sends per micro-step (or per optimizer step for DDP), ring algorithms."""
    n = setup.num_gpus
    if n == 1:
        return 0.0, True
    ring = (n - 1) / n
    grad_bytes = trainable * p_elem
    if setup.parallelism in ("ddp", "zero2"):
        # all-reduce = reduce-scatter + all-gather: 2 x bytes x (n-1)/n. DDP buckets grads and reduces
        # once per optimizer step (no_sync during accumulation); ZeRO-2 reduce-scatters every micro-step.
        return 2.0 * grad_bytes * ring, setup.parallelism == "ddp"
    # FSDP / ZeRO-3: all-gather the sharded weights for forward and again for backward, reduce-scatter
    # the grads. QLoRA shards the NF4 storage (0.5 B/param); frozen 16-bit bases gather 2 B/param.
    if setup.method == "qlora":
        w_bytes = 0.53 * arch.params_total
    else:
        w_bytes = arch.params_total * (4 if setup.precision in ("fp32", "amp_bf16", "amp_fp16") else 2)
    return 2.0 * w_bytes * ring + grad_bytes * ring, False


def estimate_throughput(
    arch: Architecture,
    setup: TrainingSetup,
    gpu: GpuSpec,
    grad_accum: int = 1,
    calibration: Calibration = CALIBRATION,
) -> Throughput:
    """Tokens/s of `setup.num_gpus` x `gpu` for this model and setup (one micro-step per GPU timed)."""
    w = _work(arch, setup, grad_accum, calibration)
    c = calibration
    bf16_ok = gpu.bf16_supported or setup.precision in ("fp16", "amp_fp16", "fp32")
    mm_rate = matmul_tflops(gpu) * 1e12 * c.matmul_eff
    attn_rate = gpu.tensor_tflops * 1e12 * c.attn_eff
    if not bf16_ok:
        # bf16 on a card without bf16 tensor cores runs emulated: measured T4 2.0-2.5 TFLOPS bf16
        # against 65 fp16 (zzc0721 DB), ~1/30 of the fp16 rate.
        mm_rate /= 30.0
        attn_rate /= 30.0
    f32_rate = fp32_tflops(gpu) * 1e12 * c.fp32_eff
    bw = gpu.bandwidth_bytes_per_s * c.bandwidth_eff

    # bf16 MoE experts on torch's CUTLASS grouped GEMM (sm90/sm100) run at calibration.grouped_mm_eff of
    # the dense rate; in each pass the GEMMs still cannot beat streaming their weights (the roofline).
    experts_bf16 = w.experts[3]
    grouped_extra = 0.0
    if w.expert_pass_flops and experts_bf16 and _grouped_gemm_kernel(gpu):
        grouped_extra = w.expert_pass_flops / mm_rate * (1.0 / c.grouped_mm_eff - 1.0)
    gemm = sum(max(fl / mm_rate + grouped_extra, wb / bw) for fl, wb in w.gemm_flops)
    gemm_memory_bound = sum(wb / bw for fl, wb in w.gemm_flops if wb / bw > fl / mm_rate + grouped_extra)
    fp32 = w.fp32_flops / f32_rate + max(w.lora[0] / f32_rate, w.lora[1] / bw)
    # Materialized fp32 scores are cuBLAS batched SGEMMs (head_dim 64-256: compute-bound at the fp32
    # rate); in 16-bit the same GEMMs are bound by writing the s^2 scores, which attn_eff absorbs.
    fp32_attn = f32_rate if w.attn_gemm else fp32_tflops(gpu) * 1e12 * c.fp32_attn_eff
    attention = w.attn_flops / (fp32_attn if w.attn_fp32 else attn_rate)
    stream = w.stream_bytes / bw
    optimizer = w.opt_bytes / bw / grad_accum
    gpu_s = gemm + fp32 + attention + stream
    host_s = w.kernels * c.host_s_per_kernel
    # Forward and backward: the host queues kernels ahead of the GPU, so they take about the longer of
    # the two (small models and batches are host-bound); near balance the queue runs dry now and then,
    # hence a smooth maximum. The optimizer step runs on the GPU after the last gradient, behind
    # everything queued, before the loss is read: it adds.
    p = c.overlap_p

    def overlap(g: float, h: float) -> float:
        return float((g**p + h**p) ** (1 / p)) if g > 0 or h > 0 else 0.0

    # torch's grouped GEMM runs its CUTLASS kernel only for bf16 on sm90/sm100 (aten GroupedBlas.cpp);
    # otherwise (fp32 experts under QLoRA/amp/fp32, fp16, or an Ampere/Ada/consumer card) it takes
    # _grouped_mm_fallback: offs.cpu(), a device-to-host sync, then one mm per expert that received
    # tokens. Each sync drains the GPU queue, so the expert GEMMs and the lm_head/loss work (QLoRA: fp32
    # GEMMs, GPU-heavy) no longer hide under the host's dispatching: they become segments of their own,
    # each overlapping only within itself (run c-large-009: +19% before, within 4% after).
    exp_flops, exp_mms, exp_fp32, exp_bf16 = w.experts
    fallback = exp_flops > 0 and not (exp_bf16 and _grouped_gemm_kernel(gpu))
    segments = [(gpu_s, host_s)]
    if fallback:
        exp_gpu = exp_flops / (f32_rate if exp_fp32 else mm_rate)
        exp_host = c.host_ops_per_expert * exp_mms * c.host_s_per_kernel
        head_gemm, head_fp32, head_bytes, head_kernels = w.head_segment
        head_gpu = head_gemm / mm_rate + head_fp32 / f32_rate + head_bytes / bw
        head_host = head_kernels * c.host_s_per_kernel
        rest = (max(gpu_s - exp_gpu - head_gpu, 0.0), max(host_s - head_host, 0.0))
        segments = [rest, (exp_gpu, exp_host), (head_gpu, head_host)]
        host_s += exp_host
    compute_s = sum(overlap(g, h) for g, h in segments)
    compute_s += optimizer

    comm_s = 0.0
    if setup.num_gpus > 1:
        link = interconnect_of(gpu, setup.num_gpus)
        rate = link.bus_bytes_per_s * c.comm_eff
        comm_s = w.comm_bytes / rate if rate > 0 else float("inf")
        if w.comm_per_optimizer_step:
            comm_s /= grad_accum
    exposed = max(0.0, comm_s - c.comm_overlap * compute_s)
    step_s = compute_s + exposed

    tokens_per_s = w.tokens * setup.num_gpus / step_s if step_s > 0 else 0.0
    if exposed > 0 and exposed >= compute_s:
        bound = "communication"
    elif host_s > gpu_s + optimizer:
        bound = "host"
    elif stream + optimizer + gemm_memory_bound > gpu_s / 2:
        bound = "memory"
    else:
        bound = "compute"
    breakdown = {
        "gemm_s": gemm,
        "fp32_s": fp32,
        "attention_s": attention,
        "memory_traffic_s": stream,
        "optimizer_s": optimizer,
        "gpu_s": gpu_s + optimizer,
        "host_s": host_s,
        "communication_s": comm_s,
        "communication_exposed_s": exposed,
    }
    mfu = w.model_flops * w.tokens * setup.num_gpus / (step_s * gpu.tensor_tflops * 1e12 * setup.num_gpus)
    scaled = None if gpu.slug == CALIBRATION_GPU else _scaled_from(gpu)
    notes = [_assumption(gpu, scaled)]
    if setup.num_gpus > 1:
        notes.append(_comm_assumption(gpu, setup))
    return Throughput(
        gpu_slug=gpu.slug,
        num_gpus=setup.num_gpus,
        tokens_per_s=tokens_per_s,
        step_s=step_s,
        flops_per_token=(sum(fl for fl, _ in w.gemm_flops) + w.fp32_flops + w.lora[0] + w.attn_flops)
        / w.tokens,
        model_flops_per_token=w.model_flops,
        mfu=mfu,
        bound=bound,
        breakdown_s=breakdown,
        scaled_from=scaled,
        assumptions=tuple(notes),
    )


def _scaled_from(gpu: GpuSpec) -> str:
    rate = matmul_tflops(gpu)
    return (
        f"scaled from the H200 calibration runs by this card's 16-bit matmul rate "
        f"({rate:.0f} vs the H200's 790 TFLOPS measured) and memory bandwidth "
        f"({gpu.bandwidth_bytes_per_s / 1e9:,.0f} vs 4,800 GB/s)"
    )


def _assumption(gpu: GpuSpec, scaled: str | None) -> str:
    if scaled is None:
        return (
            "Throughput on the H200 is calibrated on the project's measured H200 runs (plain PyTorch loop)."
        )
    return f"Throughput on the {gpu.name} is not measured: it is {scaled}; expect ±25%."


def _comm_assumption(gpu: GpuSpec, setup: TrainingSetup) -> str:
    link = interconnect_of(gpu, setup.num_gpus)
    return (
        f"{setup.num_gpus} GPUs with {setup.parallelism.upper()} over {link.name}; communication is assumed "
        f"to hide under part of the compute time (fitted on two-GPU FSDP runs on H200s only)."
    )
