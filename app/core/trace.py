"""The order in which one training step allocates and frees its tensors, replayed on AllocatorSim.

The trace follows the reference loop (`model(input_ids=x, labels=x).loss.backward()`, `opt.step()`,
`opt.zero_grad(set_to_none=True)`) for two steps: the first creates the optimizer states in the
holes the first backward left, which is why the second can need new segments (fragmentation that
nvidia-smi shows and `max_memory_allocated` does not).  The measured runs show steps 2 to 6 with
identical peaks, and replaying a third step changes no calibration run.  Sizes come from
memory.py/activations.py;
only their order and lifetimes are decided here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from app.core.allocsim import AllocatorSim
from app.core.keys import HashOnceTuple
from app.core.loading import EMPTY_CACHE
from app.core.optim import param_state_tensors

try:  # the same replay in C (app/core/_replay.c), built by `pip install` when a compiler is there
    from app.core import _replay
except ImportError:  # pragma: no cover - exercised where no compiler built it
    _replay = None  # type: ignore[assignment]

Shape = tuple[int, int]


class Shapes(HashOnceTuple[Shape]):
    """A plan's trainable tensors; its hash (the optimizer tensors' cache keys on it) is computed once."""


@dataclass(frozen=True)
class TracePlan:
    """Everything the replay needs, in bytes (already multiplied by the tokens of a micro-batch)."""

    load: tuple[int, ...]  # the load's allocations and frees (loading.load_script's encoding)
    layers: int
    opt_params: tuple[Shape, ...]  # every trainable tensor, in model.parameters() order
    head_grads: tuple[int, ...]  # grads made at the lm_head backward (lm_head or tied embedding, norm)
    embed_grad: int  # untied embedding grad made last (0: frozen or tied)
    tied_accumulate: int  # a tied embedding's second gradient (summed out of place with the first)
    grad_size: int  # bytes per element of grads and (for torch optimizers) states
    optimizer: str
    layer_saved: tuple[int, ...]  # one layer's saved tensors (forward order)
    layer_ops: tuple[tuple[int, tuple[Shape, ...], int, tuple[int, ...]], ...]  # per op: saved count,
    # weight gradients, input gradient, and the short-lived tensors of its backward
    layer_transient: tuple[int, ...]  # short-lived tensors of one layer's forward
    layer_copies: tuple[int, ...]  # autocast 16-bit weight copies of one layer (amp only)
    head_copy: int  # autocast copy of the lm_head weight (amp only)
    cache_copies: bool  # full fine-tuning under autocast: copies cached until the forward ends
    checkpoint: bool
    hidden: int  # one residual-stream tensor (embedding output, checkpoint input)
    final_saved: tuple[int, ...]
    logits: int  # lm_head output
    logits_fp32: int  # `logits.float()` copy (0 when the logits are already fp32)
    vocab_fp32: int  # one fp32 B x S x V tensor (log_softmax output, its gradients)
    shared: tuple[int, ...]  # tensors alive for the whole step (cos/sin, eager mask)
    dequant: int  # bnb dequantized weight during a 4-bit matmul (QLoRA)
    shards: int = 1  # FSDP2 ranks: parameters, gradients and optimizer states are sharded this many ways
    layer_weights: tuple[int, ...] = ()  # one layer's unsharded weight tensors (FSDP all-gathers them)
    root_weights: tuple[int, ...] = ()  # embedding / final norm / lm_head, unsharded by the root
    softcap: bool = False  # final logit softcapping (Gemma 2): logits / cap, tanh, * cap
    workspace: int = 0  # one thread's cuBLAS workspace, made at its first matmul of the first step
    op_dequant: tuple[tuple[int, ...], ...] = ()  # per layer op, QLoRA: (dequantized weight, product)...
    transient_op: int = 0  # the layer op whose forward makes `layer_transient`
    # LoRA / QLoRA under gradient checkpointing: peft makes the embedding output require grad (a leaf),
    # so the backward leaves its gradient in `.grad`; the loop's `loss` holds the graph and with it
    # both tensors until the next step's `loss = model(...)` rebinds it (_forward_backward `held`)
    held_input: bool = False
    # DDP (ddp.py): the Reducer's first buckets, made before the first step, and the buckets it rebuilds
    # (the first freed) before the second step's forward
    ddp_buckets: tuple[int, ...] = ()
    ddp_rebuilt: tuple[int, ...] = ()


def simulate(plan: TracePlan, steps: int = 2) -> tuple[int, int]:
    """Replay `steps` training steps; return (peak allocated, peak reserved) in bytes."""
    if _replay is not None:
        loaded = _loaded_c(plan.load, plan.shards)
        found = _replay.resume(loaded, *_flat(plan)[2:], steps) if loaded is not None else None
        if found is not None:  # None: a tensor past the C replay's 64-bit range (absurd requests)
            return found
    return simulate_py(plan, steps)


# Batch shapes (batch, seq) a template is fitted at (a batch of 1 and of 2, each at lengths 1 to 3), and
# three more where the fit is checked.
FIT_AT = ((1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3))
CHECK_AT = ((3, 5), (5, 4), (4, 9))


def template(plans: list[TracePlan]) -> object | None:
    """The C replay of one setup at any batch x seq (None without the C replay or where sizes do not fit).

    `plans`: the plan at FIT_AT then at CHECK_AT.  Every size a plan makes is a0 + a1 s + a2 s^2 +
    b (b0 + b1 s + b2 s^2) for batch b and length s (tokens b s, attention scores b s^2, RoPE's
    tables s); the six coefficients are fitted exactly at FIT_AT, checked at CHECK_AT, and evaluated
    in C for each batch shape, so a new batch x seq costs no plan and no argument parsing.
    """
    if _replay is None or not plans:
        return None
    if any(p.load != plans[0].load or p.shards != plans[0].shards for p in plans):
        return None
    varying: list[tuple[int, ...]] = []
    try:
        _fit_leaves([_flat(p)[2:] for p in plans], 0, varying)
    except _NoFit:
        return None
    loaded = _loaded_c(plans[0].load, plans[0].shards)
    if loaded is None:
        return None
    return _replay.template(loaded, varying, *_flat(plans[0])[2:], 0)  # 0: parse_rest's steps, unused


class _NoFit(Exception):
    """A plan's structure or a size that the template's form does not cover."""


def _fit_leaves(nodes: list[object], index: int, varying: list[tuple[int, ...]]) -> int:
    """Walk one node of the flattened plans (one per shape) depth first, as _replay.c's plan_leaves;
    append (leaf index, coefficients) of each int that differs between shapes to `varying`; return
    the index after the node.  Raises _NoFit where the plans differ in structure or a fit fails."""
    first = nodes[0]
    if all(n == first for n in nodes):
        return index + _count_ints(first)  # the same at every shape: the template's value stands
    if isinstance(first, int):
        if not all(isinstance(n, int) for n in nodes):
            raise _NoFit
        values = tuple(n for n in nodes if isinstance(n, int))
        coefs = _fit(values[: len(FIT_AT)])
        checks = zip(CHECK_AT, values[len(FIT_AT) :], strict=True)
        if coefs is None or any(_at(coefs, b, s) != v for (b, s), v in checks):
            raise _NoFit
        varying.append((index, *coefs))
        return index + 1
    if not isinstance(first, tuple) or not all(isinstance(n, tuple) and len(n) == len(first) for n in nodes):
        raise _NoFit
    for children in zip(*nodes, strict=True):
        index = _fit_leaves(list(children), index, varying)
    return index


def _count_ints(node: object) -> int:
    """The ints in a flattened plan's node."""
    if isinstance(node, int):
        return 1
    assert isinstance(node, tuple)
    if all(isinstance(x, int) for x in node):
        return len(node)
    return sum(_count_ints(x) for x in node)


def simulate_at(tmpl: object, batch: int, seq: int, steps: int = 2) -> tuple[int, int] | None:
    """`template`'s replay at one batch shape; None where a size is past the C replay's range."""
    return _replay.resume_at(tmpl, batch, seq, steps)


Coefs = tuple[int, int, int, int, int, int]


def _fit(values: tuple[int, ...]) -> Coefs | None:
    """(a0, a1, a2, b0, b1, b2) with value(b, s) = a0 + a1 s + a2 s^2 + b (b0 + b1 s + b2 s^2) through
    the values at FIT_AT; None when they are not integers."""
    one = _quadratic(values[0:3])
    two = _quadratic(values[3:6])
    if one is None or two is None:
        return None
    per_batch = tuple(t - o for t, o in zip(two, one, strict=True))
    a0, a1, a2 = (o - p for o, p in zip(one, per_batch, strict=True))
    return (a0, a1, a2, *per_batch)  # type: ignore[return-value]


def _quadratic(y: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(c0, c1, c2) with c0 + c1 s + c2 s^2 = y[s - 1] for s = 1, 2, 3; None when not integers."""
    twice_c2 = y[2] - 2 * y[1] + y[0]
    if twice_c2 % 2:
        return None
    c2 = twice_c2 // 2
    c1 = y[1] - y[0] - 3 * c2
    return (y[0] - c1 - c2, c1, c2)


def _at(c: Coefs, b: int, s: int) -> int:
    """The fitted size at batch b, length s."""
    return c[0] + c[1] * s + c[2] * s * s + b * (c[3] + c[4] * s + c[5] * s * s)


@lru_cache(maxsize=64)
def _loaded_c(load: tuple[int, ...], shards: int) -> object | None:
    """The C replay's allocator after loading (as `_loaded`): a new batch shape skips the load's
    thousands of allocations (QLoRA 8B: about 4,000) and copies this snapshot instead."""
    return _replay.load(load, shards)


def simulate_py(plan: TracePlan, steps: int = 2) -> tuple[int, int]:
    """The replay in Python (the reference the C replay is tested against)."""
    sim = _loaded(plan.load).copy(keep_live=False)
    # The step's peak allocated (what memory.py's phases are): the load's own peak (FSDP2 holds the
    # whole model and its first shards) is no part of it; its reserved segments stay counted.
    sim.peak_allocated = sim.allocated
    tr = _Tracer(sim, plan.shards)
    states, step_temps = _optimizer_tensors(plan.opt_params, plan.optimizer, plan.shards, plan.grad_size)
    held: list[int] = []  # the last step's tensors that its `loss` keeps alive (TracePlan.held_input)
    buckets = [sim.new(n) for n in plan.ddp_buckets]
    for step in range(steps):
        if step == 1 and plan.ddp_rebuilt:  # Reducer::rebuild_buckets in the second forward's pre-hook
            sim.free_all(buckets)
            buckets = [sim.new(n) for n in plan.ddp_rebuilt]
        grads = _forward_backward(plan, tr, plan.workspace if step == 0 else 0, held)
        if step == 0:  # optimizer states are created lazily inside the first step()
            for nbytes in states:
                sim.new(nbytes)
        temps = []
        for temp in step_temps:
            if temp and plan.optimizer == "adafactor":  # single-tensor loop: one at a time
                sim.free(sim.new(temp))
            elif temp:  # foreach AdamW: `_foreach_sqrt(exp_avg_sqs)` for every parameter at once
                temps.append(sim.new(temp))
        sim.free_all(temps)
        sim.free_all(grads)  # zero_grad(set_to_none=True)
    tr.fold()
    # No pool releases a segment during the steps (empty_cache is the load's), so the three pools'
    # reserved peak together at the end; the default pool's may have peaked alone during the load.
    return tr.peak, max(sim.peak_reserved, sim.reserved + tr.ag.reserved + tr.rs.reserved)


@lru_cache(maxsize=256)
def _optimizer_tensors(
    opt_params: tuple[Shape, ...], optimizer: str, shards: int, grad_size: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(every state tensor in creation order, each parameter's step temporary), for both replays."""
    states: list[int] = []
    temps: list[int] = []
    for rows, cols in opt_params:
        sizes, _managed, temp = param_state_tensors(optimizer, -(-rows // shards), cols, grad_size)
        states.extend(sizes)
        temps.append(temp)
    return tuple(states), tuple(temps)


def _flat(plan: TracePlan) -> tuple[object, ...]:
    """The plan as the C replay's positional arguments (sizes in bytes, flags as 0/1)."""
    states, temps = _optimizer_tensors(plan.opt_params, plan.optimizer, plan.shards, plan.grad_size)
    g = plan.grad_size
    dequant = plan.op_dequant or ((),) * len(plan.layer_ops)
    ops = tuple(
        (count, _grad_bytes(params, g) if params else (), grad_in, scratch, weights)
        for (count, params, grad_in, scratch), weights in zip(plan.layer_ops, dequant, strict=True)
    )
    return (
        plan.load,
        plan.shards,
        plan.layers,
        ops,
        states,
        temps,
        int(plan.optimizer == "adafactor"),
        plan.head_grads,
        plan.embed_grad,
        plan.tied_accumulate,
        plan.layer_saved,
        plan.layer_transient,
        plan.layer_copies,
        plan.head_copy,
        int(plan.cache_copies),
        int(plan.checkpoint),
        plan.final_saved,
        plan.hidden,
        plan.logits,
        plan.logits_fp32,
        plan.vocab_fp32,
        plan.shared,
        plan.dequant,
        plan.layer_weights,
        plan.root_weights,
        int(plan.softcap),
        plan.workspace,
        plan.transient_op,
        int(plan.held_input),
        plan.ddp_buckets,
        plan.ddp_rebuilt,
    )


@lru_cache(maxsize=1024)
def _grad_bytes(params: tuple[Shape, ...], grad_size: int) -> tuple[int, ...]:
    """Bytes of an op's weight gradients (batch-independent: cached, an estimate flattens eight ops)."""
    return tuple(r * c * grad_size for r, c in params)


@lru_cache(maxsize=64)
def _loaded(load: tuple[int, ...]) -> AllocatorSim:
    """The allocator after the load script (from_pretrained, peft, FSDP2's sharding): the same for
    every batch shape."""
    sim = AllocatorSim()
    run_script(sim, [], load)
    return sim


def run_script(sim: AllocatorSim, handles: list[int], ops: tuple[int, ...]) -> None:
    """Play load-script ops on `sim`: a size allocates (its handle appended to `handles`), -1 - i frees
    the i-th handle, EMPTY_CACHE releases the free segments."""
    for op in ops:
        if op >= 0:
            handles.append(sim.new(op))
        elif op == EMPTY_CACHE:
            sim.empty_cache()
        else:
            sim.free(handles[-1 - op])


class _Tracer:
    __slots__ = ("ag", "ag_held", "peak", "rs", "rs_held", "shards", "sim")

    def __init__(self, sim: AllocatorSim, shards: int = 1) -> None:
        self.sim = sim
        self.shards = shards
        # FSDP2 all-gathers and reduce-scatters on streams of their own; the caching allocator keeps
        # a separate pool per stream, so their buffers never reuse the default stream's free blocks.
        # Their handles come from the default stream's counter, so no two pools share a handle.
        self.ag = AllocatorSim()
        self.rs = AllocatorSim()
        # FSDP2 keeps the last all-gather's and reduce-scatter's buffers (its `all_gather_state` /
        # `reduce_scatter_state`) until the next collective of the kind, instead of record_stream.
        self.ag_held = -1
        self.rs_held = -1
        # peak allocated of the three pools together (torch.cuda.max_memory_allocated), folded in
        # whenever the side pools change: between two changes they are constant
        self.peak = 0

    def fold(self) -> None:
        """Fold the default pool's peak since the last fold, beside the side pools, into `peak`."""
        sim = self.sim
        total = sim.peak_allocated + self.ag.allocated + self.rs.allocated
        if total > self.peak:
            self.peak = total
        sim.peak_allocated = sim.allocated

    def unshard(self, sizes: tuple[int, ...]) -> list[int]:
        """All-gather a module's parameters: flat buffers on the all-gather stream, then copy-out."""
        sim = self.sim
        total = sum(sizes)
        n = sim.handles = sim.handles + 2
        self.fold()
        self.ag.malloc(n - 1, -(-total // self.shards))
        self.ag.malloc(n, total)
        self.fold()
        out = [sim.new(b) for b in sizes]
        self.fold()
        self.ag.free(n - 1)
        if self.ag_held >= 0:
            self.ag.free(self.ag_held)
        self.ag_held = n
        return out

    def reduce_scatter(self, grads: list[int], sizes: list[int]) -> list[int]:
        """Reduce-scatter a module's unsharded gradients into 1/N shards (kept until zero_grad)."""
        sim = self.sim
        total = sum(sizes)
        n = sim.handles = sim.handles + 2
        self.fold()
        self.rs.malloc(n - 1, total)
        self.rs.malloc(n, -(-total // self.shards))
        self.fold()
        sim.free_all(grads)
        shards = [sim.new(-(-b // self.shards)) for b in sizes]
        self.fold()
        self.rs.free(n)
        if self.rs_held >= 0:
            self.rs.free(self.rs_held)
        self.rs_held = n - 1
        return shards


def _first_pass(plan: TracePlan, tr: _Tracer) -> list[int]:
    """A checkpointed layer's first forward, op by op; returns the last op's tensors (still alive).

    Under non-reentrant checkpointing nothing is saved: what an op keeps for backward is its input,
    made by the op before, and dies once the op has run.  A 4-bit linear dequantizes its weight, makes
    its 16-bit product, then frees the weight (bitsandbytes `_dequant_linear_fallback`, cuda/ops.py);
    the product dies with the op.  Allocation traces of 13 runs (profiles/trace-*.jsonl.gz, made by
    profiles/m-trace.py) show this order; with it the replay's reserved bytes after each phase of the
    first two steps match the traces' within 0.13 GiB on 11 of them (c-large-010, c-large-001 to 4 MiB),
    where allocating a layer's saved tensors all at once, with one dequantization after them, made the
    second step of QLoRA runs grow by a vocabulary-sized segment that the real runs never made.
    """
    new, free, free_all = tr.sim.new, tr.sim.free, tr.sim.free_all
    prev: list[int] = []
    start = 0
    for k, (count, _params, _grad_in, _scratch) in enumerate(plan.layer_ops):
        cur = [new(n) for n in plan.layer_saved[start : start + count]]
        start += count
        free_all(prev)
        prev = cur
        products = []
        weights = plan.op_dequant[k] if plan.op_dequant else ()
        for j in range(0, len(weights), 2):
            w = new(weights[j])
            products.append(new(weights[j + 1]))
            free(w)
        if k == plan.transient_op:
            free_all([new(n) for n in plan.layer_transient])
        free_all(products)
    return prev


def _forward_backward(
    plan: TracePlan, tr: _Tracer, workspace: int = 0, held: list[int] | None = None
) -> list[int]:
    """One forward and backward; returns the gradient handles (alive until zero_grad).

    `workspace`: the bytes of the cuBLAS workspace each of the two threads (the loop's, autograd's)
    allocates at its first matmul, on the first step only; they are never freed.
    `held` (with `plan.held_input`): the embedding output and its `.grad`, which the loop's `loss`
    keeps alive past the backward; the last step's are freed once this forward has returned and
    `loss = model(...)` rebinds, and this step's are left there.  Allocation traces
    (profiles/trace-*.jsonl.gz: every LoRA and QLoRA run with gradient checkpointing) free the two
    right after the model output, at the loop's line; without `held` (DeepSpeed's replay) they die
    at the end of the backward.  (The real `.grad` is the residual stream's gradient, made at the final
    norm's backward and accumulated in place through the layers; the replay keeps its last `g_hidden`.)
    """
    new, free, free_all = tr.sim.new, tr.sim.free, tr.sim.free_all
    fsdp = plan.shards > 1
    root = tr.unshard(plan.root_weights) if fsdp and plan.root_weights else []
    inputs = [new(plan.hidden)]  # embedding output
    shared = [new(n) for n in plan.shared]
    if workspace:  # the rotary embedding's `inv_freq @ position_ids` is the forward's first matmul
        new(workspace)
    saved: list[list[int]] = []
    copies: list[list[int]] = []
    cache: list[int] = []
    for _ in range(plan.layers):
        unsharded = tr.unshard(plan.layer_weights) if fsdp else []
        cp = [new(n) for n in plan.layer_copies]
        if plan.checkpoint:
            layer = _first_pass(plan, tr)
            tmp = []
        else:
            layer = [new(n) for n in plan.layer_saved]
            tmp = [new(n) for n in plan.layer_transient]
            if plan.dequant:
                free(new(plan.dequant))
        out = new(plan.hidden)
        free_all(tmp)
        free_all(unsharded)  # reshard after forward
        if plan.checkpoint:  # non-reentrant checkpoint keeps only the layer's input
            free_all(layer)
            if plan.cache_copies:
                cache.extend(cp)
            else:
                free_all(cp)
            inputs.append(out)
        else:
            saved.append(layer)
            copies.append(cp)
            free(inputs.pop())
            inputs.append(out)
    final = [new(n) for n in plan.final_saved]
    head_copy = new(plan.head_copy) if plan.head_copy else 0
    logits = new(plan.logits)
    tanh_out = 0
    if plan.softcap:
        # transformers' Gemma2ForCausalLM: `logits / cap` (DivBackward0 by a scalar saves nothing), tanh
        # (TanhBackward0 saves its result), `* cap` (the model output): three more logits-sized tensors,
        # one of them kept until the backward (measured: l-blind-load-001, Gemma-2-9B).
        scaled = new(plan.logits)
        free(logits)
        tanh_out = new(plan.logits)
        free(scaled)
        logits = new(plan.logits)
    up = new(plan.logits_fp32) if plan.logits_fp32 else 0
    lsm = new(plan.vocab_fp32)
    if up:
        free(up)
    free(logits)  # the model output is dropped once `.loss` is taken
    if held:  # then `loss = ...` drops the last step's graph: its input's gradient, the input
        free_all(held)
        held.clear()
    free_all(cache)  # autocast's weight cache is cleared when the autocast region exits
    # backward: nll_loss grad, log_softmax grad, cast back to the logits dtype, lm_head
    g_nll = new(plan.vocab_fp32)
    g_in = new(plan.vocab_fp32)
    free(g_nll)
    free(lsm)
    g_logits = g_in
    if plan.logits_fp32:
        g_logits = new(plan.logits)
        free(g_in)
    if tanh_out:  # backward through `* cap`, tanh (then its saved result is released) and `/ cap`
        g_tanh = new(plan.logits)
        free(g_logits)
        g_scaled = new(plan.logits)
        free(g_tanh)
        free(tanh_out)
        g_logits = new(plan.logits)
        free(g_scaled)
    grads = [new(n) for n in plan.head_grads]
    g_hidden = new(plan.hidden)
    if workspace:  # the lm_head backward is the backward thread's first matmul
        new(workspace)
    free(g_logits)
    if head_copy:
        free(head_copy)
    free_all(final)
    free(inputs.pop())  # the final norm's input
    emb = -1
    for _ in range(plan.layers):
        unsharded = tr.unshard(plan.layer_weights) if fsdp else []
        layer_grads: list[int] = []
        layer_grad_sizes: list[int] = []
        if plan.checkpoint:
            cp = [new(n) for n in plan.layer_copies]
            layer = [new(n) for n in plan.layer_saved]
        else:
            cp = copies.pop()
            layer = saved.pop()
        if plan.dequant:
            free(new(plan.dequant))
        # Autograd runs the layer's ops in reverse: each allocates its input gradient and its weights'
        # gradients, then releases what it saved and the output gradient it consumed.
        end = len(layer)
        for count, params, grad_in, scratch in reversed(plan.layer_ops):
            tmp = [new(n) for n in scratch]
            g_next = new(grad_in)
            free_all(tmp)
            for rows, cols in params:
                layer_grads.append(new(rows * cols * plan.grad_size))
                layer_grad_sizes.append(rows * cols * plan.grad_size)
            free_all(layer[end - count : end])
            end -= count
            free(g_hidden)
            g_hidden = g_next
        free_all(cp)
        if fsdp:
            grads.extend(tr.reduce_scatter(layer_grads, layer_grad_sizes) if layer_grads else [])
            free_all(unsharded)
        else:
            grads.extend(layer_grads)
        if plan.checkpoint:
            x = inputs.pop()
            if inputs or held is None or not plan.held_input:
                free(x)
            else:  # the embedding output, a leaf that requires grad
                emb = x
    if plan.embed_grad:
        grads.append(new(plan.embed_grad))
    if plan.tied_accumulate and grads:
        # A tied embedding gets its second gradient last; autograd's InputBuffer has held the lm_head
        # part since the start of backward and adds the two out of place (`old_var + var`).
        part = new(plan.tied_accumulate)
        total = new(plan.tied_accumulate)
        free(part)
        free(grads[0])
        grads[0] = total
    if emb >= 0 and held is not None:  # g_hidden is its `.grad` (freed first when `loss` goes)
        held.extend((g_hidden, emb))
    else:
        free(g_hidden)
    free_all(inputs)
    free_all(shared)
    free_all(root)
    if fsdp and plan.head_grads:
        # the root reduce-scatters its own gradients (lm_head / embedding / norm) last
        nh = len(plan.head_grads) + (1 if plan.embed_grad else 0)
        sizes = [*plan.head_grads, *([plan.embed_grad] if plan.embed_grad else [])]
        head = grads[:len(plan.head_grads)] + ([grads[-1]] if plan.embed_grad else [])
        rest = grads[len(plan.head_grads) : len(grads) - (1 if plan.embed_grad else 0)]
        del nh
        grads = rest + tr.reduce_scatter(head, sizes)
    return grads
