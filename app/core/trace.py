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

from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

from app.core.allocsim import MIN_BLOCK, SMALL_SIZE, AllocatorSim
from app.core.optim import param_state_tensors

Shape = tuple[int, int]
Contents = list[tuple[int, ...]]  # per segment: (size, handle or 0 when free, bytes requested) per block


@dataclass(frozen=True)
class TracePlan:
    """Everything the replay needs, in bytes (already multiplied by the tokens of a micro-batch)."""

    weights: tuple[int, ...]  # resident base weights, load order
    adapters: tuple[int, ...]  # LoRA A/B tensors created by get_peft_model
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


def simulate(plan: TracePlan, steps: int = 2, fast: bool = True) -> tuple[int, int]:
    """Replay `steps` training steps; return (peak allocated, peak reserved) in bytes.

    `fast` skips proven repeats of the layer loop (_Repeats); `fast=False` replays every op.
    """
    sim = _loaded(plan.weights, plan.adapters, plan.shards).copy(keep_live=False)
    tr = _Tracer(sim, plan.shards)
    n = plan.shards
    for step in range(steps):
        grads = _forward_backward(plan, tr, fast)
        if step == 0:  # optimizer states are created lazily inside the first step()
            for rows, cols in plan.opt_params:
                for nbytes in param_state_tensors(plan.optimizer, -(-rows // n), cols, plan.grad_size)[0]:
                    sim.new(nbytes)
        temps = []
        for rows, cols in plan.opt_params:
            temp = param_state_tensors(plan.optimizer, -(-rows // n), cols, plan.grad_size)[2]
            if temp and plan.optimizer == "adafactor":  # single-tensor loop: one at a time
                sim.free(sim.new(temp))
            elif temp:  # foreach AdamW: `_foreach_sqrt(exp_avg_sqs)` for every parameter at once
                temps.append(sim.new(temp))
        sim.free_all(temps)
        sim.free_all(grads)  # zero_grad(set_to_none=True)
    allocated = sim.peak_allocated + tr.ag.peak_allocated + tr.rs.peak_allocated
    return allocated, sim.peak_reserved + tr.ag.peak_reserved + tr.rs.peak_reserved


@lru_cache(maxsize=64)
def _loaded(weights: tuple[int, ...], adapters: tuple[int, ...], shards: int) -> AllocatorSim:
    """The allocator after from_pretrained (and FSDP2's sharding): the same for every batch shape."""
    sim = AllocatorSim()
    loaded = [sim.new(nbytes) for nbytes in weights]
    for nbytes in adapters:
        sim.new(nbytes)
    if shards > 1:
        # every rank loads the whole model, then fully_shard swaps each parameter for its 1/N shard
        for h, nbytes in zip(loaded, weights, strict=True):
            sim.new(-(-nbytes // shards))
            sim.free(h)
    sim.contents()  # the copies start with every segment's contents known
    return sim


class _Tracer:
    __slots__ = ("ag", "ag_held", "rs", "rs_held", "shards", "sim")

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

    def unshard(self, sizes: tuple[int, ...]) -> list[int]:
        """All-gather a module's parameters: flat buffers on the all-gather stream, then copy-out."""
        sim = self.sim
        total = sum(sizes)
        n = sim.handles = sim.handles + 2
        self.ag.malloc(n - 1, -(-total // self.shards))
        self.ag.malloc(n, total)
        out = [sim.new(b) for b in sizes]
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
        self.rs.malloc(n - 1, total)
        self.rs.malloc(n, -(-total // self.shards))
        sim.free_all(grads)
        shards = [sim.new(-(-b // self.shards)) for b in sizes]
        self.rs.free(n)
        if self.rs_held >= 0:
            self.rs.free(self.rs_held)
        self.rs_held = n - 1
        return shards


class _Repeats:
    """Finds an exact period of a layer loop's allocator states and skips whole periods.

    Why a skipped period is exact.  Inside the loop's regular iterations (first .. stop - 1) every
    iteration makes the same requests (sizes from the plan) and frees handles that follow it: made in
    the same or the previous iteration (dh higher a period later), or by the forward loop (for the
    backward loop: one layer lower each iteration).  So the ops of a period are those of the last
    period with handles mapped by psi.  Let the last period start from state P, touch the existing
    segments T (allocate from or free into; new segments come last) and end in C.  The next period,
    from C, repeats the last one through a map g of T onto segments U of C if
    - g keeps order and each segment U[i] of C equals psi(P[T[i]]) block for block;
    - every free block of C outside U (that a request could fit) has a twin in P outside T: same size,
      same place relative to T as it has relative to U.  The twin sat through the last period
      untouched and lost every best fit (smallest fitting free block, then lowest address) to the
      block taken, and g keeps every comparison, so the block loses to that block's image, and a new
      segment is made exactly when the last period made one;
    - frees hit the images of the last period's blocks, with the images' neighbours.
    Then the period ends with U[i] = psi(C[T[i]]) and psi of the last period's new segments appended.
    Both conditions are checked on every skipped period (U guessed from how T moved between the two
    last simulated periods), so nothing is assumed about later periods; allocated bytes follow the
    last period's trajectory shifted by its growth, and reserved bytes only grow, with the segments.
    The small pool must end the period as it started (then it never grows again).
    """

    __slots__ = (
        "done", "first", "fstep", "fwd", "h0", "least", "longest", "marks", "peak", "sigs", "sim", "stop"
    )

    def __init__(
        self,
        sim: AllocatorSim,
        first: int,
        stop: int,
        least: int,
        longest: int,
        fwd: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        self.sim = sim
        self.longest = longest  # the longest period looked for (then, without one, stop looking)
        self.first, self.stop = first, stop  # regular iterations: first .. stop - 1
        self.least = least  # the smallest large request of an iteration (smaller free blocks never fit)
        self.h0 = sim.handles  # handles above h0 are made inside the loop
        self.fwd = fwd[:2]  # forward-loop handles (lo, hi] this loop frees, `fstep` lower per iteration
        self.fstep = fwd[2]
        self.done = False
        self.peak = sim.peak_allocated
        sim.peak_allocated = sim.allocated  # per-iteration peaks until finish()
        sim.small_freed.clear()
        sim.small_window()
        raw, _ = sim.contents()
        self.marks = [_Mark(sim, raw, set(), 0, 0)]
        self.sigs: list[tuple[int, ...]] = []  # per iteration: segments made, sizes of those it touched

    def boundary(self, x: int) -> int:
        """At the start of iteration x: skip whole proven periods; return how many iterations."""
        if self.done:
            return 0
        if x > self.first + 2 * self.longest + 1:
            self.finish()  # no period within reach: stop paying for the bookkeeping
            return 0
        sim, marks = self.sim, self.marks
        raw, hit = sim.contents()
        rise = sim.peak_allocated - marks[-1].allocated
        self.peak = max(self.peak, sim.peak_allocated)
        sim.peak_allocated = sim.allocated
        _, small_hi = sim.small_window()
        marks.append(_Mark(sim, raw, hit, rise, small_hi - marks[-1].small))
        # a cheap guess first: two periods in a row made as many segments and touched alike ones
        sigs = self.sigs
        sigs.append((marks[-1].segments - marks[-2].segments, *sorted(len(raw[i]) for i in hit)))
        for p in range(1, self.longest + 1):
            a = x - p
            if a - p < self.first or (self.stop - x) // p < 1:
                break
            if sigs[a - p : a] != sigs[a:x]:
                continue
            n0, n_a = marks[a - p].segments, marks[a].segments
            before = sorted({t for m in marks[a - p + 1 : a + 1] for t in m.hit if t < n0})
            last = sorted({t for m in marks[a + 1 : x + 1] for t in m.hit if t < n_a})
            if len(before) == len(last) and (done := self._extrapolate(a, x, p, before, last)):
                return done * p
        return 0

    def _psi(self, h: int, dh: int, df: int) -> int:
        """The handle that plays h's part one period later."""
        if h > self.h0:
            return h + dh
        return h + df if self.fwd[0] < h <= self.fwd[1] else h

    def _extrapolate(self, a: int, x: int, p: int, before: list[int], last: list[int]) -> int:
        """Skip as many periods as check out after the simulated period [a, x); return how many."""
        sim, ma, mx = self.sim, self.marks[a], self.marks[x]
        dh, df = mx.handles - ma.handles, -p * self.fstep
        least, n_x = self.least, mx.segments
        psi = self._psi

        def shift(seg: tuple[int, ...]) -> tuple[int, ...]:
            if not any(seg[1::3]):
                return seg  # all free: the same object, so later comparisons are identity checks
            out = list(seg)
            for k in range(1, len(out), 3):
                if out[k]:
                    out[k] = psi(out[k], dh, df)
            return tuple(out)

        memo: dict[tuple[int, ...], set[int]] = {}

        def fits(seg: tuple[int, ...]) -> set[int]:
            out = memo.get(seg)
            if out is None:
                pairs = zip(seg[0::3], seg[1::3], strict=True)
                out = memo[seg] = {n for n, h in pairs if n >= least and not h}
            return out

        def witnessed(prev: Contents, t: list[int], cur: Contents, u: list[int]) -> bool:
            # every fitting free block of cur outside u has a twin in prev outside t, in the same gap; a
            # segment below n_p outside t, whose gap is the same for t and u, is its own twin (untouched)
            n_p, tset, uset = len(prev), set(t), set(u)
            look = tset | set(range(n_p, len(cur)))
            for k, v in zip(t, u, strict=True):
                if k != v:
                    look.update(range(min(k, v), max(k, v) + 1))
            need: dict[int, set[int]] = {}
            for i in look:
                if i in uset or i not in cand:
                    continue
                r = bisect_left(u, i)
                if i < n_p and i not in tset and bisect_left(t, i) == r:
                    continue
                need.setdefault(r, set()).update(fits(cur[i]))
            for r, sizes in need.items():
                lo, hi = t[r - 1] if r else -1, t[r] if r < len(t) else n_p
                have: set[int] = set()
                # prev outside t is cur's segments there (a period changes only t and appends)
                for i in range(lo + 1, hi) if hi - lo < 64 else (i for i in cand if lo < i < hi):
                    if i in cand:
                        have |= fits(prev[i])
                if not sizes <= have:
                    return False
            return True

        prev, cur, cand = ma.raw, mx.raw, set()
        n_p, n_c = ma.segments, n_x
        # A touched segment that stays in place and ends the period free and as it began is mapped to
        # itself with the same contents by every later period: leave it out of the per-period work.
        pairs = list(zip(before, last, strict=True))
        still = [t for t0, t in pairs if t0 == t and prev[t] == cur[t] and not any(cur[t][1::3])]
        moving = [(t0, t) for t0, t in pairs if t0 != t or t not in still]
        times = 0
        while times < (self.stop - x) // p:
            nxt_m = [(t, 2 * t - t0) for t0, t in moving]
            if any(not 0 <= u < n_c for _, u in nxt_m):
                break
            nxt_t = sorted([*still, *(u for _, u in nxt_m)])
            if any(u >= v for u, v in pairwise(nxt_t)):
                break
            if any((c := cur[u]) is not (w := shift(prev[t])) and c != w for t, u in nxt_m):
                break
            if not times:
                cand = sim.free_segments(least)
            if not witnessed(prev, last, cur, nxt_t):
                break
            nxt = cur[:]
            for t, u in nxt_m:
                nxt[u] = shift(cur[t])
            nxt.extend(shift(seg) for seg in cur[n_p:n_c])
            d = n_c - n_p
            changed = {*(u for _, u in nxt_m), *range(n_c, n_c + d)}
            cand -= changed
            cand.update(i for i in changed if fits(nxt[i]))
            prev, cur = cur, nxt
            moving, last = nxt_m, nxt_t
            n_p, n_c = n_c, n_c + d
            times += 1
        # the small pool: what the period freed that it did not make, and what it made that lives on
        gone = [h for h in sim.small_freed[ma.freed : mx.freed] if h <= ma.handles]
        if not times or any(psi(h, dh, df) == h for h in gone):
            return 0
        made = sim.small_live(ma.handles)
        # allocated bytes and the small pool follow the simulated period, shifted by its growth each time
        ends = list(zip(self.marks[a:x], self.marks[a + 1 : x + 1], strict=True))  # per iteration
        da, ds = mx.allocated - ma.allocated, mx.small - ma.small
        rise = max(m.allocated - ma.allocated + e.rise for m, e in ends)
        self.peak = max(self.peak, mx.allocated + rise + max(0, (times - 1) * da))
        small_rise = max(m.small - ma.small + e.small_rise for m, e in ends)
        small_peak = mx.small + small_rise + max(0, (times - 1) * ds)
        sim.repeat_small(
            [psi(h, j * dh, j * df) for j in range(1, times + 1) for h in gone],
            [(psi(h, j * dh, j * df), size) for j in range(1, times + 1) for h, size in made],
            mx.small + times * ds,
            small_peak,
        )
        rewritten = {i: cur[i] for i in range(n_x) if cur[i] is not mx.raw[i] and cur[i] != mx.raw[i]}
        sim.rewrite(rewritten, cur[n_x:], mx.handles + times * dh, mx.allocated + times * da)
        self.finish()
        return times

    def finish(self) -> None:
        """Restore the running peak and stop looking for repeats."""
        if not self.done:
            self.done = True
            self.sim.peak_allocated = max(self.peak, self.sim.peak_allocated)


class _Mark:
    """The allocator at one loop boundary, and what the iteration that ended there did."""

    __slots__ = ("allocated", "freed", "handles", "hit", "raw", "rise", "segments", "small", "small_rise")

    def __init__(self, sim: AllocatorSim, raw: Contents, hit: set[int], rise: int, small_rise: int) -> None:
        self.segments, self.handles, self.allocated = sim.segments(), sim.handles, sim.allocated
        self.small, self.freed = sim._small, len(sim.small_freed)
        self.raw = raw[:]  # every segment's contents (tuples shared with other marks)
        self.hit = hit  # segments the iteration touched
        self.rise = rise  # the iteration's peak allocated minus allocated at its start
        self.small_rise = small_rise  # the same for the small pool


def _least(sizes: list[int]) -> int:
    """The smallest of these requests that the large pool serves, as the allocator rounds it."""
    rounded = [-(-n // MIN_BLOCK) * MIN_BLOCK for n in sizes]
    return min([r for r in rounded if r > SMALL_SIZE], default=1 << 62)


def _forward_backward(plan: TracePlan, tr: _Tracer, fast: bool = True) -> list[int]:
    """One forward and backward; returns the gradient handles (alive until zero_grad)."""
    new, free, free_all = tr.sim.new, tr.sim.free, tr.sim.free_all
    fsdp = plan.shards > 1
    root = tr.unshard(plan.root_weights) if fsdp and plan.root_weights else []
    shared = [new(n) for n in plan.shared]
    inputs = [new(plan.hidden)]  # embedding output
    saved: list[list[int]] = []
    copies: list[list[int]] = []
    cache: list[int] = []
    # FSDP's all-gather pool and held buffers are not part of the state _Repeats compares
    fwd_sizes = [*plan.layer_copies, *plan.layer_saved, *plan.layer_transient, plan.dequant, plan.hidden]
    rep = None if fsdp or not fast else _Repeats(tr.sim, 1, plan.layers, _least(fwd_sizes), 3)
    per = len(plan.layer_copies) + len(plan.layer_saved) + len(plan.layer_transient)
    per += 2 if plan.dequant else 1  # handles per forward iteration
    fwd_handles = (tr.sim.handles, tr.sim.handles + plan.layers * per, per)
    k = 0
    while k < plan.layers:
        if rep is not None and k and (skip := rep.boundary(k)):
            # iterations k .. k + skip - 1 were laid down by rep: do their list bookkeeping only
            base = tr.sim.handles - skip * per
            for j in range(skip):
                h = base + j * per
                cp = list(range(h + 1, h + 1 + len(plan.layer_copies)))
                h += len(cp)
                layer = list(range(h + 1, h + 1 + len(plan.layer_saved)))
                out = h + per - len(cp)
                if plan.checkpoint:
                    if plan.cache_copies:
                        cache.extend(cp)
                    inputs.append(out)
                else:
                    saved.append(layer)
                    copies.append(cp)
                    inputs[-1] = out
            k += skip
            if k == plan.layers:
                break
        k += 1
        unsharded = tr.unshard(plan.layer_weights) if fsdp else []
        cp = [new(n) for n in plan.layer_copies]
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
    if rep is not None:
        rep.finish()
    final = [new(n) for n in plan.final_saved]
    head_copy = new(plan.head_copy) if plan.head_copy else 0
    logits = new(plan.logits)
    up = new(plan.logits_fp32) if plan.logits_fp32 else 0
    lsm = new(plan.vocab_fp32)
    if up:
        free(up)
    free(logits)  # the model output is dropped once `.loss` is taken
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
    grads = [new(n) for n in plan.head_grads]
    g_hidden = new(plan.hidden)
    free(g_logits)
    if head_copy:
        free(head_copy)
    free_all(final)
    free(inputs.pop())  # the final norm's input
    bwd_sizes = [*plan.layer_copies, plan.dequant, *(plan.layer_saved if plan.checkpoint else ())]
    for _, params, grad_in, scratch in plan.layer_ops:
        bwd_sizes += [*scratch, grad_in, *(r * c * plan.grad_size for r, c in params)]
    # the checkpointed backward's last iteration frees the embedding output: not a regular one
    stop = plan.layers - 1 if plan.checkpoint else plan.layers
    rep = None if fsdp or not fast else _Repeats(tr.sim, 1, stop, _least(bwd_sizes), 6, fwd_handles)
    rel_grads: list[int] = []  # the last iteration's gradients and output, relative to its first handle
    rel_out = per_b = 0
    k = 0
    while k < plan.layers:
        if rep is not None and k and (skip := rep.boundary(k)):
            base = tr.sim.handles - skip * per_b
            for j in range(skip):
                grads.extend(base + j * per_b + r for r in rel_grads)
                if plan.checkpoint:
                    inputs.pop()
                else:
                    copies.pop()
                    saved.pop()
            g_hidden = base + (skip - 1) * per_b + rel_out
            k += skip
            if k == plan.layers:
                break
        k += 1
        first = tr.sim.handles
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
            free(inputs.pop())
        rel_grads = [g - first for g in layer_grads]
        rel_out, per_b = g_hidden - first, tr.sim.handles - first
    if rep is not None:
        rep.finish()
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
