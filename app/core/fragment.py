"""Reserved-but-unused memory of the caching allocator, from replaying the step's tensor trace."""

from __future__ import annotations

from dataclasses import fields, replace
from functools import lru_cache

from app.core import activations as act
from app.core import moe_lora
from app.core.allocator import CUBLAS_WORKSPACE_THREAD_BYTES
from app.core.architecture import Architecture
from app.core.keys import field_values
from app.core.loading import ddp_buckets, load_script
from app.core.params import grad_size, param_bytes, param_groups, weight_tensors
from app.core.setup import TrainingSetup
from app.core.trace import CHECK_AT, FIT_AT, Shape, Shapes, TracePlan, simulate, simulate_at, template

MAX_REPLAYED_LAYERS = 160


def build_plan(arch: Architecture, setup: TrainingSetup, targets: frozenset[str]) -> TracePlan:
    """The sizes of every tensor one step allocates, for the allocator replay."""
    d = act.dtypes_for(setup)
    tok = setup.batch_size * setup.seq_len
    full = setup.method == "full"
    g = grad_size(setup)
    h, v, L = arch.hidden_size, arch.vocab_size, arch.num_layers
    dequant = _dequant(arch, setup.method, setup.precision, setup.double_quant)
    # FSDP2 all-gathers per layer (its weights) and per root module (embedding, final norm, lm_head)
    elem = param_bytes(setup) if setup.method != "qlora" else 4
    layer_weights: list[int] = []
    root_weights: list[int] = []
    if setup.num_gpus > 1 and setup.parallelism == "fsdp":
        for grp in param_groups(arch):
            if grp.kind in ("embed", "lm_head") or (grp.kind == "norm" and grp.n == 1):
                root_weights.extend([grp.rows * grp.cols * elem] * grp.n)
            elif grp.n >= L:
                layer_weights.extend([grp.rows * grp.cols * param_bytes(setup)] * (grp.n // L))

    la = act.layer_activations(arch, act.shape_key(setup), targets)  # per token: batch-independent
    all_moe = arch.is_moe and arch.num_moe_layers == L
    scores = setup.batch_size * arch.num_heads * setup.seq_len * setup.seq_len
    # per op: saved tensors, weight gradients, input gradient, backward scratch (bytes)
    op_saved: dict[str, list[int]] = {o.name: [n * tok for n in o.saved] for o in la.ops}
    op_scratch: dict[str, list[int]] = {o.name: [] for o in la.ops}
    op_grad_in: dict[str, int] = {o.name: o.grad_in * tok for o in la.ops}
    fwd_scratch = [n * tok for n in act.layer_transient_tensors(arch, setup)[:2]]
    scratch_op = "act"
    shared = [2 * setup.seq_len * arch.head_dim * d.residual]  # RoPE cos/sin
    if la.attn_scores_saved:
        eager = setup.attention == "eager"
        op_saved["attention"] += [4 * scores] + ([d.attn * scores] if eager and d.attn != 4 else [])
        if eager:
            # backward through softmax(QK^T)V: the probabilities' gradient and the scores' gradient,
            # cast between bf16 and fp32 on the way
            op_scratch["attention"] = [4 * scores, 4 * scores, d.attn * scores]
            fwd_scratch = [d.attn * scores, d.attn * scores, 4 * scores]
            scratch_op = "attention"
            shared.append(setup.batch_size * setup.seq_len * setup.seq_len * d.attn)
        else:
            # SDPA math's backward (profiles/j-probe.txt, sdpa and llama): beside the saved softmax,
            # BmmBackward0's gradient of the probabilities and SafeSoftmaxBackward0's `grad * output`
            # and result (softmax_backward_cuda_out) are alive at once: three fp32 score tensors.
            op_scratch["attention"] = [4 * scores, 4 * scores, 4 * scores]
            # its forward: the pre-softmax product and an s x s float causal mask.  The forward's peak
            # also holds `_safe_softmax`'s bool `self.eq(-inf)` mask (1 byte per score; j-probe.txt's
            # forward live-at-peak), but this replay allocates all of a layer's saved tensors before its
            # transients, so its attention moment already holds what the layer saves after attention;
            # adding the mask there overshoots the measured forward peak allocated (stages.forward of
            # j-blind-gaps-004: +1,471 MiB with it, +447 without; -001: +738, +226) and the peaks
            # (j-004 +4.4% with it, +1.1% without; j-001 +4.1%, +0.9%).
            fwd_scratch = [4 * scores, 4 * setup.seq_len * setup.seq_len]
            scratch_op = "attention"
    if all_moe:
        # the experts replace the dense MLP: grouped_mm_experts_forward's routed copies
        k, mi, out = arch.experts_per_token, arch.moe_intermediate_size, d.linear_out
        routed_h, routed_mi = k * h * tok, k * mi * tok
        op_saved["act"] = [n * tok for n in act.moe_tensors(arch, setup, targets)]
        op_saved["down_proj"] = []
        op_grad_in["act"] = d.residual * h * tok
        op_scratch["act"] = [out * routed_h, out * routed_h, 2 * out * routed_mi, out * routed_mi]
        # gathered input, raw gate_up and down outputs, weighted and re-permuted outputs
        fwd_scratch = [
            d.residual * routed_h,
            2 * out * routed_mi,
            out * routed_h,
            out * routed_h,
            out * routed_h,
        ]
    elif arch.is_moe:
        op_saved["act"] += [n * tok for n in act.moe_tensors(arch, setup, targets)]
    gate_up, down = moe_lora.folded(arch, targets, moe_lora.weight_bytes(setup.method, param_bytes(setup)))
    if gate_up or down:
        # LoRA on the experts (moe_lora): grouped_mm saves each folded W + BA for its backward, which
        # makes a weight gradient as large; the first forward holds both folds through the experts.
        if gate_up:
            op_saved["act"].append(gate_up)
            op_scratch["act"] = [*op_scratch["act"], gate_up]
        if down:
            op_saved["down_proj"] = [*op_saved["down_proj"], down]
            op_scratch["down_proj"] = [*op_scratch["down_proj"], down]
        if gate_up and down and setup.gradient_checkpointing and scratch_op == "act":
            fwd_scratch = [*fwd_scratch, down]

    op_shapes, opt_params = _param_shapes(arch, act.shape_key(setup), targets)
    op_dequant: list[tuple[int, ...]] = []
    if setup.method == "qlora":
        # each 4-bit weight bitsandbytes dequantizes (bf16) and the 16-bit product it makes
        for linears in _op_linears(arch, tuple(o.params for o in la.ops)):
            op_dequant.append(tuple(x for o_f, i_f in linears for x in (2 * o_f * i_f, 2 * o_f * tok)))
    ops: list[tuple[int, tuple[Shape, ...], int, tuple[int, ...]]] = []
    saved: list[int] = []
    for o, shapes in zip(la.ops, op_shapes, strict=True):
        saved.extend(op_saved[o.name])
        ops.append((len(op_saved[o.name]), shapes, op_grad_in[o.name], tuple(op_scratch[o.name])))

    ddp = setup.num_gpus > 1 and setup.parallelism == "ddp"
    buckets = ddp_buckets(arch, setup, targets) if ddp else ((), ())
    copies: list[int] = []
    head_copy = 0
    if d.autocast:
        if setup.method != "qlora":  # bnb's uint8 weights are not autocast
            for lin in arch.linears:
                copies.extend([2 * lin.weight_numel] * (lin.layers // L))
        head_copy = 2 * v * h
    lg = d.logits
    head_grads: tuple[int, ...] = ()
    embed_grad = tied = 0
    if full:
        head_grads = (v * h * g, h * g)
        embed_grad = 0 if arch.tie_embeddings else v * h * g
        tied = v * h * g if arch.tie_embeddings else 0
    return TracePlan(
        load=load_script(arch, setup, targets),
        layers=L,
        layer_ops=tuple(ops),
        opt_params=opt_params,
        head_grads=head_grads,
        embed_grad=embed_grad,
        tied_accumulate=tied,
        grad_size=g,
        optimizer=setup.optimizer,
        layer_saved=tuple(saved),
        layer_transient=tuple(fwd_scratch),
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
        dequant=dequant,
        shards=setup.num_gpus if setup.parallelism == "fsdp" else 1,
        layer_weights=tuple(layer_weights),
        root_weights=tuple(root_weights),
        softcap=arch.final_logit_softcapping is not None,
        workspace=CUBLAS_WORKSPACE_THREAD_BYTES,
        op_dequant=tuple(op_dequant),
        transient_op=[o.name for o in la.ops].index(scratch_op),
        held_input=not full and setup.gradient_checkpointing,
        ddp_buckets=buckets[0],
        ddp_rebuilt=buckets[1],
    )


@lru_cache(maxsize=256)
def _op_linears(arch: Architecture, op_params: tuple[tuple[str, ...], ...]) -> tuple[tuple[Shape, ...], ...]:
    """Per layer op, the (out, in) features of the base linears it runs (every layer has them)."""
    by_name = {lin.name: lin for lin in arch.linears if lin.layers == arch.num_layers}
    return tuple(
        tuple((by_name[n].out_features, by_name[n].in_features) for n in names if n in by_name)
        for names in op_params
    )


@lru_cache(maxsize=1024)
def _param_shapes(
    arch: Architecture, setup: TrainingSetup, targets: frozenset[str]
) -> tuple[tuple[tuple[Shape, ...], ...], Shapes]:
    """Per op of a layer, the weight gradients its backward makes, and every trainable tensor in
    model.parameters() order: batch-independent, so built once per setup shape (`act.shape_key`)."""
    full = setup.method == "full"
    h, v, L = arch.hidden_size, arch.vocab_size, arch.num_layers
    by_name = {lin.name: lin for lin in arch.linears if lin.layers == L}
    all_moe = arch.is_moe and arch.num_moe_layers == L
    op_shapes: list[tuple[Shape, ...]] = []
    layer_params: list[Shape] = []
    for o in act.layer_activations(arch, setup, targets).ops:
        shapes: list[Shape] = []
        for name in o.params:
            if name == "norm":
                if full:
                    shapes.append((h, 1))
                continue
            lin = by_name.get(name)
            if lin is None:
                continue
            if full:
                shapes.append((lin.out_features, lin.in_features))
                if lin.bias:
                    shapes.append((lin.out_features, 1))
            elif name in targets:
                shapes.extend([(setup.lora_rank, lin.in_features), (lin.out_features, setup.lora_rank)])
        if o.name == "act" and full and all_moe:
            e, mi = arch.num_experts, arch.moe_intermediate_size
            shapes.extend([(e * 2 * mi, h), (e * h, mi), (e, h)])
        if not full and o.name in ("act", "down_proj"):
            # LoRA on the router and the fused experts: their ParamWrappers' gradients come with the
            # experts' backward, down_proj's first (moe_lora); the same order in model.parameters().
            for ep in moe_lora.expert_params(arch, targets, setup.lora_rank):
                if (ep.name == moe_lora.DOWN) == (o.name == "down_proj"):
                    shapes.extend([ep.a, ep.b])
        op_shapes.append(tuple(shapes))
        layer_params.extend(shapes)
    if full:
        opt_params = [(v, h)] + layer_params * L + [(h, 1)] + ([] if arch.tie_embeddings else [(v, h)])
    else:
        opt_params = layer_params * L
    return tuple(op_shapes), Shapes(opt_params)


@lru_cache(maxsize=256)
def _dequant(arch: Architecture, method: str, precision: str, double_quant: bool) -> int:
    """The largest weight bitsandbytes dequantizes for a 4-bit matmul (0 without QLoRA)."""
    setup = TrainingSetup(method, precision=precision, double_quant=double_quant)  # type: ignore[arg-type]
    return weight_tensors(arch, setup)[1]


@lru_cache(maxsize=4096)
def fragmentation(arch: Architecture, setup: TrainingSetup, targets: frozenset[str]) -> tuple[int, int, int]:
    """(replayed peak allocated, replayed peak reserved, reserved minus allocated) in bytes."""
    # one GPU without sharding (every estimate's own replay): the unit setup is the shape key, which the
    # estimate has already looked up
    one = setup.num_gpus == 1 and setup.parallelism == "ddp"
    unit = act.shape_key(setup) if one else _unit_batch(setup)
    tmpl = _shape(arch, unit, targets).template()
    found = simulate_at(tmpl, setup.batch_size, setup.seq_len) if tmpl is not None else None
    alloc, reserved = found if found is not None else simulate(_replayed_plan(arch, setup, targets))
    return alloc, reserved, reserved - alloc


def _replayed_plan(arch: Architecture, setup: TrainingSetup, targets: frozenset[str]) -> TracePlan:
    """The plan the replay runs."""
    plan = build_plan(arch, setup, targets)
    if plan.layers > MAX_REPLAYED_LAYERS:
        # Deeper stacks than any released model (Llama-3.1-405B has 126 layers) are replayed with
        # their first MAX_REPLAYED_LAYERS layers: the estimate stays fast for absurd configs.
        plan = replace(plan, layers=MAX_REPLAYED_LAYERS)
    return plan


class _Shape:
    """One setup at every batch x seq: the replay template, fitted at its second batch shape.

    Fitting costs some nine plans; a setup asked once (a ranking's first sight of it) replays its
    own plan, and a second batch x seq of it (a search over batch sizes or lengths) pays for the fit.
    """

    __slots__ = ("arch", "fitted", "seen", "targets", "tmpl", "unit")

    def __init__(self, arch: Architecture, unit: TrainingSetup, targets: frozenset[str]) -> None:
        self.arch, self.unit, self.targets = arch, unit, targets
        self.seen = 0
        self.fitted = False
        self.tmpl: object | None = None

    def template(self) -> object | None:
        """The template once this shape has been asked before (None before then or where it does not fit)."""
        self.seen += 1
        if self.seen > 1 and not self.fitted:
            self.fitted = True
            shapes = (*FIT_AT, *CHECK_AT)
            self.tmpl = template(
                [
                    _replayed_plan(self.arch, replace(self.unit, batch_size=b, seq_len=s), self.targets)
                    for b, s in shapes
                ]
            )
        return self.tmpl


@lru_cache(maxsize=256)
def _shape(arch: Architecture, unit: TrainingSetup, targets: frozenset[str]) -> _Shape:
    """The replay state of one setup shape (batch and length set to one)."""
    return _Shape(arch, unit, targets)


# TrainingSetup's field positions of the batch size and length, which _unit_batch sets to one.
_BATCH_AT = tuple(i for i, f in enumerate(fields(TrainingSetup)) if f.name in ("batch_size", "seq_len"))


@lru_cache(maxsize=4096)
def _unit_batch(setup: TrainingSetup) -> TrainingSetup:
    """The setup at batch 1 and length 1: what keys its replay template."""
    values = list(field_values(setup))
    for i in _BATCH_AT:  # two fields set in place: a generator over all fields cost twice as much
        values[i] = 1
    return _setup_of(tuple(values))


@lru_cache(maxsize=1024)
def _setup_of(values: tuple[object, ...]) -> TrainingSetup:
    # by field values, as activations.shape_key: replace() re-validates the setup on every call
    return TrainingSetup(*values)  # type: ignore[arg-type]
