"""Activation memory per token: what autograd saves in one decoder layer, and the logits/loss.

Derived by reading the transformers 5.17 modeling code (Llama-style decoder layer, RMSNorm,
`sdpa_attention_forward`, `eager_attention_forward`, `ForCausalLMLoss`), peft 0.21 `lora.Linear.forward`
and bitsandbytes 0.50.2 `Linear4bit.forward` / `MatMul4Bit`, and checked against tensors that
`torch.autograd.graph.saved_tensors_hooks` reports for tiny models (scripts/inspect_saved.py).
All sizes are bytes per token (per batch element and position) unless a name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property, lru_cache

from app.core import moe_lora
from app.core.architecture import Architecture
from app.core.keys import field_values
from app.core.params import param_bytes
from app.core.setup import TrainingSetup

ALL_LINEAR = "all-linear"
# SDPA's math kernel: score-sized fp32 tensors its backward adds to the saved softmax (layer_activations).
MATH_SCORES_BACKWARD = 3 * 4


@dataclass(frozen=True)
class Dtypes:
    """Element sizes (bytes) of the tensors flowing through the model for one setup."""

    residual: int  # embedding output and residual stream
    linear_out: int  # what a base projection hands downstream
    attn: int  # dtype SDPA/eager attention runs in
    logits: int  # lm_head output
    autocast: bool  # torch.autocast(bf16/fp16) around the forward
    weights_trainable: bool  # full fine-tuning: base weights need grads


def dtypes_for(setup: TrainingSetup) -> Dtypes:
    """Which dtype each stream has under the reference stack."""
    return _dtypes(setup.method, setup.precision, setup.attention)


@lru_cache(maxsize=64)  # an estimate asks seven times: built once per method, precision and attention
def _dtypes(method: str, precision: str, attention: str) -> Dtypes:
    amp = precision in ("amp_bf16", "amp_fp16")
    if method == "qlora":
        # prepare_model_for_kbit_training casts every non-4bit parameter (embedding, norms, lm_head)
        # to fp32, so the residual stream is fp32; Linear4bit computes in bf16 and casts its output
        # back to the input dtype (`.to(inp_dtype)` in bnb Linear4bit.forward): fp32 downstream.
        # Under autocast, SDPA and the fp32 lm_head run on 16-bit casts (run b-architectures-035).
        # flash_attention_2 casts fp32 q/k/v to the pre-quantization dtype (bf16) before the kernel
        # (transformers integrations/flash_attention.py + fa_peft_integration_check): 16-bit attention.
        attn = 2 if amp or attention == "flash_attention_2" else 4
        return Dtypes(4, 4, attn, 2 if amp else 4, amp, False)
    full = method == "full"
    if amp:
        # fp32 weights under autocast: matmuls produce 16-bit outputs, the residual adds promote
        # back to fp32 (fp32 embedding + 16-bit projection), RMSNorm computes in fp32.
        return Dtypes(4, 2, 2, 2, True, full)
    size = 4 if precision == "fp32" else 2
    return Dtypes(size, size, size, size, False, full)


def masked_sliding(arch: Architecture, setup: TrainingSetup) -> bool:
    """Whether windowed layers get a materialized mask: transformers skips it (is_causal) only while the
    sequence is shorter than the window (masking_utils `_ignore_causal_mask_sdpa`)."""
    return (
        setup.attention == "sdpa"
        and arch.sliding_layers > 0
        and arch.sliding_window is not None
        and setup.seq_len >= arch.sliding_window
    )


def sdpa_math(arch: Architecture, setup: TrainingSetup, masked: bool = False) -> bool:
    """Whether SDPA falls back to its math kernel, which materializes the attention probabilities.

    transformers passes enable_gqa=True for grouped k/v heads (integrations/sdpa_attention.py); in
    torch 2.11 flash attention takes only fp16/bf16 and the memory-efficient kernel takes no GQA, so
    fp32 attention with GQA (QLoRA's fp32 stream, fp32 training) runs `_scaled_dot_product_attention_math`
    and keeps softmax(QK^T) for backward (runs b-architectures-022/023/026: +b x heads x s^2 x 4 bytes
    per layer).  Multi-head fp32 attention takes the memory-efficient kernel instead.
    """
    d = dtypes_for(setup)
    return setup.attention == "sdpa" and not masked and d.attn == 4 and arch.num_kv_heads < arch.num_heads


def flash_kernels(arch: Architecture, setup: TrainingSetup) -> bool:
    """Whether the run loads flash-attention kernels (16-bit SDPA or flash_attention_2)."""
    return setup.attention != "eager" and dtypes_for(setup).attn != 4


def lora_target_names(arch: Architecture, targets: tuple[str, ...]) -> frozenset[str]:
    """Per-layer Linear names LoRA wraps (peft's all-linear: every nn.Linear but the lm_head), plus the
    MoE parameters it wraps (moe_lora: GATE_UP, DOWN, ROUTER)."""
    names = {lin.name for lin in arch.linears}
    every = any(t.lower() in (ALL_LINEAR, "all_linear") for t in targets)
    chosen = names if every else {t for t in targets if t in names}
    converted = moe_lora.mapping(arch)
    # peft moves the converted v4 names from target_modules to target_parameters: a Qwen2-MoE shared
    # expert's gate_proj/up_proj/down_proj (same names) are no longer wrapped.
    return frozenset(chosen - converted.keys()) | moe_lora.param_targets(arch, targets, every)


@dataclass(frozen=True)
class LayerActivations:
    """Bytes per token one decoder layer keeps for backward and needs transiently."""

    saved: int  # kept from forward to backward without checkpointing
    checkpoint_input: int  # kept per layer with (non-reentrant) gradient checkpointing
    transient: int  # extra live bytes at the layer's busiest moment (forward or backward)
    attn_scores_saved: int  # bytes per (batch x heads x q x k) element kept by eager attention
    attn_scores_transient: int
    tensors: tuple[int, ...]  # the saved set as separate allocations (bytes per token each)
    ops: tuple[LayerOp, ...]  # the same tensors grouped by the op whose backward frees them

    @cached_property  # kept on the (cached) instance: every estimate with SDPA's math kernel asks
    def attention_prefix(self) -> int:
        """Bytes per token the layer saves up to and including its attention (its input norm first)."""
        total = 0
        for o in self.ops:
            total += sum(o.saved)
            if o.name == "attention":
                break
        return total


@dataclass(frozen=True)
class LayerOp:
    """One step of a decoder layer, in forward order: what it saves, trains and sends back."""

    name: str
    saved: tuple[int, ...]  # bytes per token of each tensor it keeps for backward
    params: tuple[str, ...]  # Linear names (and "norm") whose gradients its backward produces
    grad_in: int  # bytes per token of the gradient it returns to the op before it


# What shape_key sets, by position among TrainingSetup's fields.
_SHAPE_FIXED = {"batch_size": 1, "seq_len": 1, "num_gpus": 1, "parallelism": "ddp"}
_SHAPE_AT = tuple(
    (i, _SHAPE_FIXED[f.name]) for i, f in enumerate(fields(TrainingSetup)) if f.name in _SHAPE_FIXED
)


@lru_cache(maxsize=4096)
def shape_key(setup: TrainingSetup) -> TrainingSetup:
    """The setup with batch, length and GPUs set to one: what per-token terms depend on."""
    # A new batch x seq of a known setup finds its key by field values: replace() re-validates the
    # setup and was a tenth of a cold estimate.
    values = list(field_values(setup))
    for i, v in _SHAPE_AT:  # four fields set in place: a generator over all fields cost twice as much
        values[i] = v
    return _shape_of(tuple(values))


@lru_cache(maxsize=1024)
def _shape_of(values: tuple[object, ...]) -> TrainingSetup:
    return TrainingSetup(*values)  # type: ignore[arg-type]


@lru_cache(maxsize=1024)  # per-token: the allocator replay of every new batch x seq reuses it
def layer_activations(
    arch: Architecture, setup: TrainingSetup, targets: frozenset[str], masked: bool = False
) -> LayerActivations:
    """Per-token bytes of one dense decoder layer (MoE layers add `moe_extra`).

    `masked`: the layer attends through a materialized (sliding-window) mask, so transformers repeats
    k/v to full head width (`use_gqa_in_sdpa` needs no mask) and SDPA takes its memory-efficient kernel,
    which keeps the mask converted to an additive bias (b x s x s, counted by the caller).
    """
    d = dtypes_for(setup)
    h, q, kv, i = arch.hidden_size, arch.q_width, arch.kv_width, arch.intermediate_size
    r = setup.lora_rank if setup.method != "full" else 0
    res, out, full = d.residual, d.linear_out, d.weights_trainable
    eager = setup.attention == "eager"
    ops: list[tuple[str, list[int], tuple[str, ...], int]] = []
    t: list[int] = []

    def op(name: str, params: tuple[str, ...], grad_in: int) -> None:
        nonlocal t
        t = []
        ops.append((name, t, params, grad_in))

    # RMSNorm.  Llama-style (`weight * hidden_states.to(input_dtype)`): the fp32 input is saved by
    # pow/mul, and the re-cast normalized input when the weight trains.  Gemma-style
    # (`_norm(x.float()) * (1.0 + weight.float())`): the fp32 input, and the fp32 normalized value when
    # the weight trains.  Gemma 2/3 have four norms per layer (pre/post attention and feed-forward).
    gemma = arch.norms_per_layer == 4

    def norm(name: str) -> None:
        op(name, ("norm",), res * h)
        t.append(4 * h)
        if full:
            t.append((4 if gemma else res) * h)

    norm("input_layernorm")

    # Inputs the base projections save for their weight gradients (full fine-tuning only).  Under
    # autocast each projection casts the fp32 norm output to 16-bit separately (autocast caches casts
    # of leaf weights only), so q/k/v (gate/up) each keep their own copy.
    def base_input(consumers: int) -> None:
        if full:
            t.extend([2 * h] * consumers if d.autocast else [res * h])

    # LoRA: peft casts x to the adapter dtype (fp32) per wrapped module (`_cast_input_dtype`): a new
    # fp32 copy per module for a 16-bit x, the same tensor for an fp32 x.  Under autocast lora_A then
    # casts to 16-bit, again once per module.  lora_B saves lora_A's output (rank wide).
    def lora(width: int, dx: int, names: tuple[str, ...], base_saves_x: bool) -> None:
        wrapped = sum(1 for n in names if n in targets)
        if not wrapped:
            return
        if d.autocast:
            t.extend([2 * width, 2 * r] * wrapped)
            return
        if dx != 4:
            t.extend([4 * width] * wrapped)
        elif not base_saves_x:
            t.append(4 * width)
        t.extend([4 * r] * wrapped)

    base_saves = full and not d.autocast
    qkv_names = ("qkv_proj",) if arch.fused_qkv else ("q_proj", "k_proj", "v_proj")
    op("qkv", qkv_names, res * h)
    base_input(1 if arch.fused_qkv else 3)
    lora(h, res, qkv_names, base_saves)

    # q/k RMSNorm on head_dim (Qwen3, Gemma3): the fp32 copy of q and k, plus the normalized value
    # when the weight trains (16-bit for Qwen3's Llama-style norm, fp32 for Gemma's).
    if arch.qk_norm:
        op("qk_norm", (), out * (q + kv))
        t.extend([4 * q, 4 * kv])
        if full:
            t.extend([(4 if gemma else out) * q, (4 if gemma else out) * kv])

    # Attention: SDPA (flash / memory-efficient) saves q, k, v (post-RoPE), its output and logsumexp;
    # transformers passes enable_gqa=True when there is no mask, so k/v stay at kv-head width.
    # RoPE saves only cos/sin (shared).  Under autocast SDPA runs on 16-bit casts of q, k, v.
    att = d.attn
    scores_saved = 0
    scores_transient = 0
    op("attention", (), att * (q + 2 * kv))
    math = sdpa_math(arch, setup, masked)
    if math:
        # `_scaled_dot_product_attention_math`: q * sqrt(scale), repeat_interleave'd k * sqrt(scale)
        # and v are saved by the matmuls; softmax's output (scores) too.  Its backward holds, besides
        # that saved softmax, three more score-sized fp32 tensors at once: the probabilities' gradient
        # (BmmBackward0), and in `_softmax_backward_data` the product `Tensor tmp = grad * output;`
        # and the scores' gradient (aten/src/ATen/native/cuda/SoftMax.cu softmax_backward_cuda_out).
        # Traced with torch.cuda.memory._record_memory_history on the H200 (torch 2.11): Llama-3.1-8B
        # QLoRA 2x4096, 4 x 4 GiB live at the backward peak (run j-blind-gaps-004's mechanism).
        t.extend([4 * q, 4 * q, 4 * q])
        scores_saved = 4
        scores_transient = MATH_SCORES_BACKWARD
    elif not eager:
        kv_saved = q if masked else kv
        t.extend([att * q, att * kv_saved, att * kv_saved, att * q, 4 * arch.num_heads])
        if arch.fused_qkv:
            # Phi-3: v is a view of the fused qkv_proj output, so saving v keeps all q+2kv of it alive.
            t[-3] = out * (q + 2 * kv)
    else:
        # eager_attention_forward: repeat_kv materializes k and v at full head width (saved by the
        # matmuls), softmax in fp32 (saved output) then `.to(query.dtype)` (saved by the PV matmul);
        # the contiguous attention output is saved by o_proj when it trains.
        t.extend([att * q, att * q, att * q])
        if arch.fused_qkv and kv == q:
            t[-1] = out * (q + 2 * kv)  # no repeat: v stays a view of the fused output
        scores_saved = 4 + (att if att != 4 else 0)
        if arch.attn_logit_softcapping:
            # Gemma 2: scores / cap, tanh (saves its output), * cap before the softmax.
            scores_saved += att
        scores_transient = 2 * att + 4

    op("o_proj", ("o_proj",), att * q)
    if (eager or math) and (full or "o_proj" in targets):
        t.append(att * q)
    # SDPA's output is o_proj's input and is saved by SDPA already (its transpose is contiguous).
    lora(q, d.attn, ("o_proj",), not (eager or math))
    if gemma:
        norm("post_attention_layernorm")
        norm("pre_feedforward_layernorm")
    else:
        norm("post_attention_layernorm")
    gu_names = ("gate_up_proj",) if arch.fused_gate_up else ("gate_proj", "up_proj")
    op("gate_up", gu_names, res * h)
    base_input(1 if arch.fused_gate_up else 2)
    lora(h, res, gu_names, base_saves)
    # MLP (SwiGLU / GeGLU): act saves gate, the product saves act(gate) and up; full FT also saves
    # act(gate)*up as down_proj's input.  Phi-3's fused gate_up output is the same bytes.
    op("act", (), 2 * out * i)
    if arch.fused_gate_up:
        t.extend([2 * out * i, out * i])
    else:
        t.extend([out * i, out * i, out * i])
    op("down_proj", ("down_proj",), out * i)
    if full:
        t.append(out * i)
    lora(i, out, ("down_proj",), full)
    if gemma:
        norm("post_feedforward_layernorm")

    transient = _layer_transient(arch, setup, d)
    layer_ops = tuple(LayerOp(name, tuple(ts), params, gin) for name, ts, params, gin in ops)
    flat = tuple(n for o in layer_ops for n in o.saved)
    return LayerActivations(sum(flat), res * h, transient, scores_saved, scores_transient, flat, layer_ops)


def _layer_transient(arch: Architecture, setup: TrainingSetup, d: Dtypes) -> int:
    """Largest short-lived set in a layer (bytes per token)."""
    return sum(layer_transient_tensors(arch, setup))


def math_attention_backward(
    arch: Architecture,
    setup: TrainingSetup,
    layer: LayerActivations,
    tokens: int,
    scores: int,
    kept_all: int,
    kept_per_layer: int,
    residual: int,
) -> tuple[int, int]:
    """Activation bytes live while SDPA's math kernel runs its backward, in the top and bottom layer
    (`residual`: bytes per element of the residual stream, dtypes_for(setup).residual)."""
    prefix = layer.attention_prefix * tokens
    # Beside what the layer saved up to its attention: the gradient of the head-expanded v (BmmBackward0,
    # b x heads x s x head_dim, fp32) and the residual stream's gradient waiting at the attention's add.
    grads = (4 * arch.q_width + residual * arch.hidden_size) * tokens
    busy = (layer.attn_scores_saved + layer.attn_scores_transient) * scores + grads
    if setup.gradient_checkpointing:
        # The recomputed input norm saves the layer's fp32 input itself, which the checkpoint keeps.
        own = prefix - 4 * arch.hidden_size * tokens + busy
        return kept_all + own, kept_per_layer + own
    # Without checkpointing the MLP's and o_proj's backward have freed what the layer saved after attention.
    post = layer.saved * tokens - prefix
    return kept_all - post + layer.attn_scores_transient * scores + grads, prefix + busy


def layer_transient_tensors(arch: Architecture, setup: TrainingSetup) -> tuple[int, ...]:
    """The short-lived tensors of a layer's busiest moment, per token: the MLP backward."""
    d = dtypes_for(setup)
    h, i = arch.hidden_size, arch.intermediate_size
    out = d.linear_out
    # backward through act(gate)*up: grad_prod, grad_act, grad_up, grad_gate live together, plus
    # the residual-stream gradient (two of them around an add) in the residual dtype.
    t = [out * i, out * i, out * i, d.residual * h, d.residual * h]
    if setup.method == "qlora":
        # Linear4bit casts its fp32 input to bf16 (`x.to(compute_dtype)`) and returns bf16 before the
        # cast back: a 16-bit copy of the widest input and output are alive at once.
        t.extend([2 * h, 2 * i])
    elif setup.method == "lora" and out == 2:
        # lora.Linear: `result + lora_B(...)*scaling` promotes to fp32 before `.to(result dtype)`.
        t.append(4 * i)
    return tuple(t)


def moe_extra(arch: Architecture, setup: TrainingSetup, wrapped: frozenset[str] = frozenset()) -> int:
    """Bytes per token a sparse-MoE layer saves in place of a dense MLP."""
    return sum(moe_tensors(arch, setup, wrapped))


def moe_tensors(
    arch: Architecture, setup: TrainingSetup, wrapped: frozenset[str] = frozenset()
) -> tuple[int, ...]:
    """The tensors (bytes per token) transformers 5.17's `grouped_mm_experts_forward` keeps for backward.

    Each token is routed to k experts: its hidden state is gathered k times (sorted by expert), run
    through the fused gate_up grouped matmul (the masked (S, 2*mi) output stays alive through the
    gate/up views that act(gate)*up saves), the down grouped matmul, and weighted by the router.
    grouped_mm saves its input only when the expert weights train, and the weighting saves the
    expert output only when the router trains (full fine-tuning).  The router keeps its fp32 softmax.
    """
    if not arch.is_moe:
        return ()
    d = dtypes_for(setup)
    k, h, mi, e = arch.experts_per_token, arch.hidden_size, arch.moe_intermediate_size, arch.num_experts
    out = d.linear_out
    route = [2 * out * mi, out * mi]  # masked gate_up output, act(gate)
    if d.weights_trainable:
        route += [d.residual * h, out * mi, out * h]  # gathered input, down input, down output
    elem = moe_lora.weight_bytes(setup.method, param_bytes(setup))
    return (*(k * n for n in route), 4 * e, *moe_lora.saved_per_token(arch, wrapped, elem, out))


def moe_backward_scratch(arch: Architecture, setup: TrainingSetup) -> int:
    """Bytes per token alive at once in a MoE layer's backward: gradients of the k routed copies."""
    if not arch.is_moe:
        return 0
    out = dtypes_for(setup).linear_out
    return arch.experts_per_token * (2 * out * arch.hidden_size + out * arch.moe_intermediate_size)


def moe_dense_mlp_saved(arch: Architecture, setup: TrainingSetup) -> int:
    """Bytes per token the dense MLP part of a layer saves (removed for MoE layers)."""
    d = dtypes_for(setup)
    full = d.weights_trainable
    return 3 * d.linear_out * arch.intermediate_size + (d.linear_out * arch.intermediate_size if full else 0)


@dataclass(frozen=True)
class LogitsBytes:
    """Bytes per token of the lm_head output and the cross-entropy (V-wide tensors)."""

    forward_peak: int
    backward_peak: int


def logits_bytes(arch: Architecture, setup: TrainingSetup) -> LogitsBytes:
    """ForCausalLMLoss: `logits.float()`, then cross_entropy = log_softmax (saves output) + nll."""
    d = dtypes_for(setup)
    v = arch.vocab_size
    lg = d.logits
    upcast = 4 if lg != 4 else 0  # `.float()` is a no-op on fp32 logits (QLoRA's fp32 lm_head)
    softcap = 0
    if arch.final_logit_softcapping:
        # Gemma 2: logits / cap, tanh (saves its output), * cap: one more V-wide tensor kept.
        softcap = lg
    # Forward: logits + fp32 copy + log_softmax output alive at once.  The model output (and its
    # logits) is dropped once `.loss` is taken, as in `model(...).loss.backward()`.
    forward = lg + upcast + 4 + 2 * softcap
    # Backward: log_softmax output + nll grad + log_softmax grad (all fp32), + the saved softcap tensor.
    backward = 4 * 3 + softcap
    return LogitsBytes(forward * v, backward * v)
