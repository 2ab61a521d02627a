"""Reserved-but-unused memory of the caching allocator, from replaying the step's tensor trace."""

from __future__ import annotations

from functools import lru_cache

from app.core import activations as act
from app.core.architecture import Architecture
from app.core.params import grad_size, lora_groups, param_bytes, param_groups, weight_tensors
from app.core.setup import TrainingSetup
from app.core.trace import Shape, TracePlan, simulate


def build_plan(arch: Architecture, setup: TrainingSetup, targets: frozenset[str]) -> TracePlan:
    """The sizes of every tensor one step allocates, for the allocator replay."""
    d = act.dtypes_for(setup)
    tok = setup.batch_size * setup.seq_len
    full = setup.method == "full"
    g = grad_size(setup)
    h, v, L = arch.hidden_size, arch.vocab_size, arch.num_layers
    weights: list[int] = []
    for nbytes, count in weight_tensors(arch, setup)[0]:
        weights.extend([nbytes] * count)

    layer_params: list[Shape] = []
    opt_params: list[Shape] = []
    adapters: list[int] = []
    if full:
        for grp in param_groups(arch):
            if grp.kind in ("embed", "lm_head") or grp.n < L:
                continue
            layer_params.extend([(grp.rows, grp.cols)] * (grp.n // L))
        opt_params = [(v, h)] + layer_params * L + [(h, 1)] + ([] if arch.tie_embeddings else [(v, h)])
    else:
        for grp in lora_groups(arch, targets, setup.lora_rank):
            if grp.n >= L:
                layer_params.extend([(grp.rows, grp.cols)] * (grp.n // L))
            adapters.extend([grp.rows * grp.cols * 4] * grp.n)
        opt_params = layer_params * L

    la = act.layer_activations(arch, setup, targets)
    scores = setup.batch_size * arch.num_heads * setup.seq_len * setup.seq_len
    saved = [n * tok for n in la.tensors]
    transient = [n * tok for n in act.layer_transient_tensors(arch, setup)]
    shared = [2 * setup.seq_len * arch.head_dim * d.residual]  # RoPE cos/sin
    if setup.attention == "eager":
        saved.extend([4 * scores, d.attn * scores] if d.attn != 4 else [4 * scores])
        transient = [d.attn * scores, d.attn * scores, 4 * scores, *transient]
        shared.append(setup.batch_size * setup.seq_len * setup.seq_len * d.attn)
    if arch.is_moe:
        saved.append(act.moe_extra(arch, setup) * tok)

    copies: list[int] = []
    head_copy = 0
    if d.autocast and setup.method != "qlora":
        for lin in arch.linears:
            copies.extend([2 * lin.weight_numel] * (lin.layers // L))
        head_copy = 2 * v * h
    lg = d.logits
    weights_dtype = param_bytes(setup)
    del weights_dtype
    head_grads: tuple[int, ...] = ()
    embed_grad = tied = 0
    if full:
        head_grads = (v * h * g, h * g)
        embed_grad = 0 if arch.tie_embeddings else v * h * g
        tied = v * h * g if arch.tie_embeddings else 0
    return TracePlan(
        weights=tuple(weights),
        adapters=tuple(adapters),
        layers=L,
        layer_params=tuple(layer_params),
        opt_params=tuple(opt_params),
        head_grads=head_grads,
        embed_grad=embed_grad,
        tied_accumulate=tied,
        grad_size=g,
        optimizer=setup.optimizer,
        layer_saved=tuple(saved),
        layer_transient=tuple(transient),
        layer_copies=tuple(copies),
        head_copy=head_copy,
        cache_copies=full and setup.gradient_checkpointing,
        checkpoint=setup.gradient_checkpointing,
        hidden=d.residual * h * tok,
        final_saved=(4 * h * tok,) + ((d.residual * h * tok,) if full else ()),
        logits=lg * v * tok,
        logits_fp32=4 * v * tok if lg != 4 else 0,
        vocab_fp32=4 * v * tok,
        shared=tuple(shared),
        dequant=weight_tensors(arch, setup)[1],
    )


@lru_cache(maxsize=4096)
def fragmentation(arch: Architecture, setup: TrainingSetup, targets: frozenset[str]) -> tuple[int, int, int]:
    """(replayed peak allocated, replayed peak reserved, reserved minus allocated) in bytes."""
    alloc, reserved = simulate(build_plan(arch, setup, targets))
    return alloc, reserved, reserved - alloc
