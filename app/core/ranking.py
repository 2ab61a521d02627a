"""Ranking of every catalog GPU x count for one request (the recommendation is drawn from it).

Memory does not depend on the GPU (only `fits` and headroom do), so the ranking computes it once per
(method, count, parallelism, batch, seq) and reuses it for every card; the largest batch and sequence
that fit come from a cached exponential + interpolation search over the same memory function.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from app.core.architecture import Architecture
from app.core.gpu import GIB, BudgetTier, GpuSpec, PriceQuote
from app.core.memory import MemoryEstimate, estimate_memory
from app.core.schedule import Schedule, plan_schedule
from app.core.setup import TrainingSetup
from app.core.throughput import Throughput, estimate_throughput

COUNTS = (1, 2, 4, 8)  # GPUs in one host
# A setup is recommended only with this much free memory at the estimated peak: the estimate's own
# error (a few %) and allocator fragmentation after the first backward/optimizer step, where the
# article's "spike of 3-4 GB mid-step" happens.
HEADROOM_SHARE = 0.05
HEADROOM_MIN_BYTES = 1 * GIB
MAX_RANK_BATCH = 1024
SEQ_QUANTUM = 128
# Price kinds that need a commitment (reserved capacity blocks) are not a "price to rent it now".
_RENTABLE = ("spot", "interruptible", "marketplace", "community", "on_demand", "serverless")


@dataclass(frozen=True)
class Job:
    """The dataset side of a request (for hours and dollars); samples None: no time or cost."""

    dataset_samples: int | None = None
    epochs: int = 1
    grad_accum: int = 1
    tokens_per_sample: int | None = None  # None: seq_len


@dataclass(frozen=True)
class RankRow:
    """One GPU setup for the request: does it fit, how much room, how fast, how long, how much."""

    gpu_slug: str
    gpu_name: str
    num_gpus: int
    parallelism: str
    fits: bool
    recommendable: bool  # fits with the safety headroom, on a stack that runs the method
    peak_bytes: int
    vram_bytes: int
    headroom_bytes: int
    max_batch_size: int  # at the request's seq_len; 0 when even batch 1 does not fit
    max_seq_len: int  # at the request's batch size, multiple of 128; 0 when 128 does not fit
    tokens_per_s: float | None
    hours: float | None
    price: PriceQuote | None  # cheapest rentable price per GPU-hour
    usd_per_hour: float | None  # all GPUs
    usd: float | None  # the job at the cheapest price (all GPUs)
    scaled_from: str | None
    note: str = ""


def required_headroom(vram_bytes: int) -> int:
    """Free bytes a setup must keep at its estimated peak to be recommended."""
    return max(HEADROOM_MIN_BYTES, int(HEADROOM_SHARE * vram_bytes))


def cheapest_rentable(prices: Iterable[PriceQuote], gpu_slug: str) -> PriceQuote | None:
    """Lowest $/GPU-hour for a GPU among prices you can rent now (no reserved capacity)."""
    found = [p for p in prices if p.gpu_slug == gpu_slug and p.kind in _RENTABLE]
    return min(found, key=lambda p: (p.usd_per_hour, p.provider)) if found else None


def _solve(points: tuple[tuple[int, int], ...], limit: int, cap: int, quantum: int) -> int:
    """Largest multiple of `quantum` whose peak, linear between probes (and beyond the last two),
    stays within `limit`; 0 when the smallest probe already exceeds it."""
    if points[0][1] > limit:
        return 0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if y1 > limit:
            x = x0 + (limit - y0) * (x1 - x0) / (y1 - y0)
            return max(quantum, int(x) // quantum * quantum)
    if len(points) < 2:
        return points[0][0]
    (x0, y0), (x1, y1) = points[-2], points[-1]
    if y1 <= y0:
        return cap
    x = x1 + (limit - y1) * (x1 - x0) / (y1 - y0)
    return min(cap, max(quantum, int(x) // quantum * quantum))


def _largest(f: Callable[[int], int], limit: int, cap: int, quantum: int) -> int:
    """Largest multiple of `quantum` x <= cap with f(x) <= limit (f non-decreasing); 0 if none."""
    if f(quantum) > limit:
        return 0
    lo, hi = quantum, 0
    while not hi:
        nxt = min(lo * 2, cap)
        if nxt == lo:
            return lo
        if f(nxt) <= limit:
            lo = nxt
        else:
            hi = nxt
    bisect = False
    while hi - lo > quantum:
        f_lo, f_hi = f(lo), f(hi)
        if bisect or f_hi == f_lo:
            guess = (lo + hi) // 2
        else:  # memory is near-affine in batch and seq: interpolation lands in one or two probes
            guess = lo + int((limit - f_lo) * (hi - lo) / (f_hi - f_lo))
        guess = min(max(guess // quantum * quantum, lo + quantum), hi - quantum)
        before = hi - lo
        if f(guess) <= limit:
            lo = guess
        else:
            hi = guess
        bisect = (hi - lo) * 2 > before  # alternate with bisection when interpolation stalls
    return lo


class Ranker:
    """Ranks GPU setups for one model; caches memory and the fit searches across GPUs."""

    def __init__(self, arch: Architecture, exact: bool = False) -> None:
        # exact: search the memory model itself for the largest batch/sequence (tens of calls per
        # GPU memory size); otherwise extrapolate from 2-3 probes per setup, within one or two steps.
        self.arch = arch
        self.exact = exact
        self.vram_max = 0  # the largest GPU memory ranked so far: probes stop past it
        self._curves: dict[tuple[str, TrainingSetup], tuple[tuple[int, int], ...]] = {}
        self._memory: dict[TrainingSetup, MemoryEstimate] = {}
        self._peaks: dict[tuple[TrainingSetup, int, int], int] = {}
        self._limits: dict[tuple[str, TrainingSetup, int], int] = {}
        # derived setups and cheapest prices, per row of 131: dataclasses.replace re-validates the
        # setup on every call, which was a third of a warm whole-catalog ranking
        self._derived: dict[tuple[TrainingSetup, int, str, int, int], TrainingSetup] = {}
        self._prices: tuple[Sequence[PriceQuote], dict[str, PriceQuote | None]] = ((), {})

    def derive(
        self, setup: TrainingSetup, num_gpus: int, parallelism: str, batch: int = 0, seq: int = 0
    ) -> TrainingSetup:
        """`setup` on `num_gpus` GPUs with `parallelism` (and batch/seq when given), cached."""
        key = (setup, num_gpus, parallelism, batch, seq)
        found = self._derived.get(key)
        if found is None:
            found = self._derived[key] = replace(
                setup,
                num_gpus=num_gpus,
                parallelism=parallelism,  # type: ignore[arg-type]
                batch_size=batch or setup.batch_size,
                seq_len=seq or setup.seq_len,
            )
        return found

    def cheapest(self, prices: Sequence[PriceQuote], gpu_slug: str) -> PriceQuote | None:
        """cheapest_rentable, cached per price list."""
        if self._prices[0] is not prices:  # held, so its identity cannot be reused by another list
            self._prices = (prices, {})
        table = self._prices[1]
        if gpu_slug not in table:
            table[gpu_slug] = cheapest_rentable(prices, gpu_slug)
        return table[gpu_slug]

    def memory(self, setup: TrainingSetup) -> MemoryEstimate:
        """estimate_memory, cached per setup (it does not depend on the GPU)."""
        found = self._memory.get(setup)
        if found is None:
            found = self._memory[setup] = estimate_memory(self.arch, setup)
        return found

    def _memory_key(self, setup: TrainingSetup) -> TrainingSetup:
        # DDP keeps a whole replica per GPU: its memory is the same for any count above one.
        if setup.parallelism == "ddp" and setup.num_gpus > 2:
            return self.derive(setup, 2, "ddp")
        return setup

    def _peak_at(self, setup: TrainingSetup, batch: int, seq: int) -> int:
        key = (setup, batch, seq)
        found = self._peaks.get(key)
        if found is None:
            probe = self.derive(setup, setup.num_gpus, setup.parallelism, batch, seq)
            found = self._peaks[key] = self.memory(probe).peak_bytes
        return found

    def max_batch(self, setup: TrainingSetup, vram: int) -> int:
        """Largest micro-batch at this seq_len whose peak fits in `vram`."""
        base = self._memory_key(setup)
        key = ("batch", base, vram)
        if key not in self._limits:
            seq = base.seq_len
            if self.exact:
                found = _largest(lambda b: self._peak_at(base, b, seq), vram, MAX_RANK_BATCH, 1)
            else:
                curve = self._curve(base, "batch", MAX_RANK_BATCH, 1)
                found = _solve(curve, vram, MAX_RANK_BATCH, 1)
            self._limits[key] = found
        return self._limits[key]

    def max_seq(self, setup: TrainingSetup, vram: int) -> int:
        """Largest seq_len (multiple of 128, up to the model's context) at this batch that fits."""
        base = self._memory_key(setup)
        key = ("seq", base, vram)
        if key not in self._limits:
            cap = max(SEQ_QUANTUM, self.arch.max_position_embeddings // SEQ_QUANTUM * SEQ_QUANTUM)
            batch = base.batch_size
            if self.exact:
                found = _largest(lambda s: self._peak_at(base, batch, s), vram, cap, SEQ_QUANTUM)
            else:
                found = _solve(self._curve(base, "seq", cap, SEQ_QUANTUM), vram, cap, SEQ_QUANTUM)
            self._limits[key] = found
        return self._limits[key]

    def _curve(self, base: TrainingSetup, axis: str, cap: int, quantum: int) -> tuple[tuple[int, int], ...]:
        """Peaks at a few batch (or sequence) sizes, shared by every GPU: the request's value, the
        smallest one, and doublings until the largest catalog memory is passed."""
        key = (axis, base)

        def peak(x: int) -> int:
            if axis == "batch":
                return self._peak_at(base, x, base.seq_len)
            return self._peak_at(base, base.batch_size, x)

        points = list(self._curves.get(key, ()))
        if not points:
            start = base.batch_size if axis == "batch" else max(quantum, base.seq_len // quantum * quantum)
            points = [(x, peak(x)) for x in sorted({quantum, start})]
        while points[-1][0] < cap and points[-1][1] <= self.vram_max:  # extend when a larger GPU comes
            x = min(points[-1][0] * 2, cap)
            points.append((x, peak(x)))
        self._curves[key] = tuple(points)
        return self._curves[key]

    def setup_for(self, base: TrainingSetup, count: int, vram: int) -> TrainingSetup:
        """The setup on `count` GPUs: the request's parallelism, or DDP unless only sharding fits."""
        if count == 1:
            return self.derive(base, 1, "ddp")
        if base.parallelism != "ddp":
            return self.derive(base, count, base.parallelism)
        ddp = self.derive(base, count, "ddp")
        if self.memory(self._memory_key(ddp)).peak_bytes + required_headroom(vram) <= vram:
            return ddp
        return self.derive(base, count, "fsdp")

    def row(
        self,
        base: TrainingSetup,
        gpu: GpuSpec,
        count: int,
        prices: Sequence[PriceQuote],
        job: Job,
        limits: bool = True,
    ) -> RankRow:
        """One ranking row: fit, headroom, limits (largest batch/seq; -1 unless `limits`), speed, price."""
        setup = self.setup_for(base, count, gpu.vram_bytes)
        mem = self.memory(self._memory_key(setup))
        self.vram_max = max(self.vram_max, gpu.vram_bytes)
        headroom = gpu.vram_bytes - mem.peak_bytes
        fits = headroom >= 0
        note = _unsupported(setup, gpu)
        ok = fits and not note and headroom >= required_headroom(gpu.vram_bytes)
        price = self.cheapest(prices, gpu.slug)
        tp: Throughput | None = None
        hours = usd = None
        if fits and not note:
            tp = throughput_for_job(self.arch, setup, gpu, job)
            if job.dataset_samples:
                hours = job_hours(setup, job, tp.tokens_per_s)
                usd = hours * price.usd_per_hour * count if price else None
        return RankRow(
            gpu_slug=gpu.slug,
            gpu_name=gpu.name,
            num_gpus=count,
            parallelism=setup.parallelism,
            fits=fits,
            recommendable=ok,
            peak_bytes=mem.peak_bytes,
            vram_bytes=gpu.vram_bytes,
            headroom_bytes=headroom,
            max_batch_size=self.max_batch(setup, gpu.vram_bytes) if limits else -1,
            max_seq_len=self.max_seq(setup, gpu.vram_bytes) if limits else -1,
            tokens_per_s=tp.tokens_per_s if tp else None,
            hours=hours,
            price=price,
            usd_per_hour=price.usd_per_hour * count if price else None,
            usd=usd,
            scaled_from=tp.scaled_from if tp else None,
            note=note,
        )


def _unsupported(setup: TrainingSetup, gpu: GpuSpec) -> str:
    """Why the reference stack cannot run this setup on this GPU ('' when it can)."""
    if gpu.platform == "metal" and setup.method == "qlora":
        return "bitsandbytes NF4 (QLoRA) has no Apple Metal backend"
    if gpu.platform == "metal" and setup.num_gpus > 1:
        return "one unified-memory device"
    return ""


def throughput_for_job(arch: Architecture, setup: TrainingSetup, gpu: GpuSpec, job: Job) -> Throughput:
    """Throughput at the job's mean tokens per sample (the request's seq_len unless given)."""
    seq = job.tokens_per_sample or setup.seq_len
    timed = setup if seq == setup.seq_len else replace(setup, seq_len=seq)
    return estimate_throughput(arch, timed, gpu, grad_accum=job.grad_accum)


def job_schedule(setup: TrainingSetup, job: Job) -> Schedule:
    """The job's optimizer steps and tokens at this setup's micro-batch and GPU count."""
    assert job.dataset_samples is not None
    return plan_schedule(
        job.dataset_samples,
        job.epochs,
        setup.batch_size,
        job.grad_accum,
        setup.num_gpus,
        job.tokens_per_sample or setup.seq_len,
    )


def job_hours(setup: TrainingSetup, job: Job, tokens_per_s: float) -> float:
    """Hours of the job's schedule at a whole-setup throughput."""
    sched = job_schedule(setup, job)
    return sched.tokens / tokens_per_s / 3600.0 if tokens_per_s > 0 else math.inf


def rank(
    arch: Architecture,
    base: TrainingSetup,
    gpus: Sequence[GpuSpec],
    prices: Sequence[PriceQuote],
    job: Job = Job(),
    counts: Sequence[int] = COUNTS,
    ranker: Ranker | None = None,
    limits: bool = True,
) -> tuple[RankRow, ...]:
    """Every GPU x count: setups that fit first, cheapest job (or $/token) first, then fewest GPUs."""
    rk = ranker or Ranker(arch)
    rk.vram_max = max([rk.vram_max, *(g.vram_bytes for g in gpus)])
    rows = [
        rk.row(base, gpu, n, prices, job, limits)
        for gpu in gpus
        for n in counts
        if n == 1 or gpu.platform != "metal"
    ]
    return tuple(sorted(rows, key=_row_key))


def usd_per_mtok(row: RankRow) -> float | None:
    """Dollars per million training tokens at the cheapest price (None without a price or speed)."""
    if row.usd_per_hour is None or not row.tokens_per_s:
        return None
    return row.usd_per_hour / (row.tokens_per_s * 3600.0) * 1e6


def _row_key(row: RankRow) -> tuple[int, int, float, int, float, float]:
    cost = row.usd if row.usd is not None else usd_per_mtok(row)
    return (
        0 if row.recommendable else (1 if row.fits else 2),
        0 if cost is not None else 1,
        round(cost, 2) if cost is not None else 0.0,  # cents: a tie goes to fewer GPUs, then speed
        row.num_gpus,
        -(row.tokens_per_s or 0.0),
        -row.headroom_bytes / max(row.vram_bytes, 1),
    )


def tier_listing(tiers: Iterable[BudgetTier], gpu_slug: str) -> BudgetTier | None:
    """The cheapest hardware tier that lists a GPU."""
    found = [t for t in tiers if t.kind == "buy" and gpu_slug in t.gpu_slugs]
    return min(found, key=lambda t: t.usd_min) if found else None
