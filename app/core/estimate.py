"""The core's one entry point: a request of plain values + the catalog's plain values -> EstimateResult.

Input (keyword arguments, or an `EstimateInput`): the API's fields (design.md) with `config` the model's
Hugging Face config.json (resolved from a slug by the service), `gpu` / `owned_gpu` as GpuSpec values
(None: not given), and the catalog as `gpus: Sequence[GpuSpec]`, `prices: Sequence[PriceQuote]`,
`tiers: Sequence[BudgetTier]`.

Output: `EstimateResult`, a frozen dataclass tree whose field names are the API response's
(`dataclasses.asdict` gives the JSON body):
  memory      MemoryResult: peak_gib, breakdown_gib (sums to peak), fits/headroom_gib (when a GPU is known)
  params      ParamsResult: total, trainable
  throughput  ThroughputResult | None: tokens_per_s of the whole setup, calibrated or `scaled_from`
  time        TimeResult | None: steps, hours, steps_per_hour (when dataset_samples is given)
  cost        CostResult | None: options (one per catalog price of the GPU), ownership
  ranking     tuple[RankingRow, ...]: every catalog GPU x 1/2/4/8 (when no GPU is given, or asked for)
  recommendation  Recommendation: method, gpu, num_gpus, where, budget_tier, reasons
  engine      EngineConfig: which engine, its accelerate/DeepSpeed config, LoRA/bnb/SFT settings
  warnings    tuple[Notice, ...] (code, message); assumptions: tuple[str, ...]
The GPU the sections refer to is the requested one, else the recommended one (`memory.gpu` says which).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from app.core import advice
from app.core.architecture import llama_reading, parse_config
from app.core.cost import CostOption, Ownership, cost_options, ownership, price_notices
from app.core.engines import EngineConfig, engine_config
from app.core.gpu import GIB, BudgetTier, GpuSpec, PriceQuote
from app.core.notices import Notice
from app.core.ranking import Job, Ranker, RankRow, job_schedule, rank, throughput_for_job
from app.core.recommend import Recommendation, Wishes, recommend, with_method
from app.core.schedule import job_time, schedule_notices
from app.core.setup import TrainingSetup


@dataclass(frozen=True)
class EstimateInput:
    """One request as plain values (the API's field names) plus the catalog."""

    config: Mapping[str, Any]
    model_name: str | None = None
    method: str | None = None  # None: recommend one
    precision: str = TrainingSetup.precision
    optimizer: str = TrainingSetup.optimizer
    batch_size: int = TrainingSetup.batch_size
    seq_len: int = TrainingSetup.seq_len
    gradient_checkpointing: bool = TrainingSetup.gradient_checkpointing
    attention: str = TrainingSetup.attention
    lora_rank: int = TrainingSetup.lora_rank
    lora_alpha: int | None = None  # None: twice the rank
    lora_targets: tuple[str, ...] = TrainingSetup.lora_targets
    double_quant: bool = TrainingSetup.double_quant
    gpu: GpuSpec | None = None
    num_gpus: int = TrainingSetup.num_gpus
    parallelism: str = TrainingSetup.parallelism
    dataset_samples: int | None = None
    epochs: int = 1
    grad_accum: int = 1
    tokens_per_sample: int | None = None
    owned_gpu: GpuSpec | None = None
    budget_usd: float | None = None
    electricity_usd_per_kwh: float = 0.15
    ranking: bool = False
    gpus: Sequence[GpuSpec] = ()
    prices: Sequence[PriceQuote] = ()
    tiers: Sequence[BudgetTier] = ()


@dataclass(frozen=True)
class MemoryResult:
    """Peak per-GPU memory as nvidia-smi shows it, its named terms, and the fit on the GPU."""

    method: str
    gpu: str | None
    num_gpus: int
    parallelism: str
    peak_bytes: int
    peak_gib: float
    breakdown_gib: dict[str, float]
    vram_gib: float | None
    fits: bool | None
    headroom_gib: float | None
    load_gib: float  # what nvidia-smi shows after loading, before the first step


@dataclass(frozen=True)
class ParamsResult:
    """Parameter counts of the model and of what trains."""

    total: int
    trainable: int


@dataclass(frozen=True)
class ThroughputResult:
    """Training speed of the setup (all GPUs) and whether it is calibrated or scaled."""

    gpu: str
    num_gpus: int
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    step_s: float
    mfu: float
    bound: str
    calibrated: bool
    scaled_from: str | None
    breakdown_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TimeResult:
    """The job's optimizer steps and hours."""

    dataset_samples: int
    epochs: int
    samples_per_step: int
    tokens_per_sample: int
    steps_per_epoch: int
    steps: int
    tokens: int
    hours: float
    steps_per_hour: float
    seconds_per_step: float


@dataclass(frozen=True)
class CostResult:
    """The job's cost at every catalog price of the GPU, and owning the card instead."""

    gpu: str
    num_gpus: int
    options: tuple[CostOption, ...]
    ownership: Ownership | None


@dataclass(frozen=True)
class RankingRow:
    """One catalog GPU setup for the request (the API's `ranking` item)."""

    gpu: str
    gpu_name: str
    num_gpus: int
    parallelism: str
    fits: bool
    recommendable: bool
    peak_gib: float
    vram_gib: float
    headroom_gib: float
    max_batch_size: int
    max_seq_len: int
    tokens_per_s: float | None
    hours: float | None
    usd: float | None
    usd_per_hour: float | None
    price_provider: str | None
    price_kind: str | None
    price_observed_on: str | None
    scaled: bool
    note: str


@dataclass(frozen=True)
class EstimateResult:
    """The whole answer (mirrors the API response)."""

    model: str | None
    memory: MemoryResult
    params: ParamsResult
    throughput: ThroughputResult | None
    time: TimeResult | None
    cost: CostResult | None
    ranking: tuple[RankingRow, ...]
    recommendation: Recommendation
    engine: EngineConfig
    warnings: tuple[Notice, ...]
    assumptions: tuple[str, ...]


def estimate(**fields: Any) -> EstimateResult:
    """Estimate from keyword arguments named as EstimateInput's fields."""
    return run(EstimateInput(**fields))


def _gib(value: int | float) -> float:
    return round(value / GIB, 3)


def ranking_row(row: RankRow) -> RankingRow:
    """A ranking row in the API's units (GiB, ISO dates)."""
    return RankingRow(
        gpu=row.gpu_slug,
        gpu_name=row.gpu_name,
        num_gpus=row.num_gpus,
        parallelism=row.parallelism,
        fits=row.fits,
        recommendable=row.recommendable,
        peak_gib=_gib(row.peak_bytes),
        vram_gib=_gib(row.vram_bytes),
        headroom_gib=_gib(row.headroom_bytes),
        max_batch_size=row.max_batch_size,
        max_seq_len=row.max_seq_len,
        tokens_per_s=round(row.tokens_per_s, 1) if row.tokens_per_s is not None else None,
        hours=row.hours,
        usd=round(row.usd, 2) if row.usd is not None else None,
        usd_per_hour=row.usd_per_hour,
        price_provider=row.price.provider if row.price else None,
        price_kind=row.price.kind if row.price else None,
        price_observed_on=row.price.observed_on.isoformat() if row.price else None,
        scaled=row.scaled_from is not None,
        note=row.note,
    )


def run(inp: EstimateInput) -> EstimateResult:
    """Memory, speed, time, cost, ranking, recommendation and launch configs for one request."""
    arch = parse_config(inp.config)
    base = TrainingSetup(
        method=(inp.method or "lora"),  # type: ignore[arg-type]
        precision=inp.precision,  # type: ignore[arg-type]
        optimizer=inp.optimizer,  # type: ignore[arg-type]
        batch_size=inp.batch_size,
        seq_len=inp.seq_len,
        gradient_checkpointing=inp.gradient_checkpointing,
        attention=inp.attention,  # type: ignore[arg-type]
        lora_rank=inp.lora_rank,
        lora_alpha=inp.lora_alpha if inp.lora_alpha is not None else 2 * inp.lora_rank,
        lora_targets=tuple(inp.lora_targets),
        double_quant=inp.double_quant,
        num_gpus=inp.num_gpus,
        parallelism=inp.parallelism,  # type: ignore[arg-type]
    )
    setups = {m: with_method(base, m) if inp.method is None else base for m in ("full", "lora", "qlora")}
    job = Job(inp.dataset_samples, inp.epochs, inp.grad_accum, inp.tokens_per_sample)
    wishes = Wishes(inp.method, inp.gpu, inp.num_gpus, inp.owned_gpu, inp.budget_usd)
    ranker = Ranker(arch)
    catalog = list(inp.gpus) or [g for g in (inp.gpu, inp.owned_gpu) if g is not None]

    # A named GPU and method with nothing else to decide: rank that GPU alone (fast path), and widen
    # to the catalog only when it fits nowhere at 1/2/4/8.
    narrow = (
        inp.gpu is not None
        and inp.method is not None
        and not (inp.ranking or inp.owned_gpu or inp.budget_usd)
    )
    pool = [inp.gpu] if narrow and inp.gpu is not None else catalog
    rec, rankings = recommend(arch, setups, wishes, job, pool, inp.prices, inp.tiers, ranker)
    if narrow and not rec.fits:
        rec, rankings = recommend(arch, setups, wishes, job, catalog, inp.prices, inp.tiers, ranker)

    method = inp.method or rec.method
    by_slug = {g.slug: g for g in catalog}
    gpu = inp.gpu or (by_slug.get(rec.gpu) if rec.gpu else None)
    if inp.gpu is not None:
        setup = setups[method]
    else:
        setup = replace(setups[method], num_gpus=rec.num_gpus, parallelism=rec.parallelism)  # type: ignore[arg-type]
    mem = ranker.memory(setup)
    sched = job_schedule(setup, job) if job.dataset_samples else None
    fits = headroom = None
    if gpu is not None:
        headroom = gpu.vram_bytes - mem.peak_bytes
        fits = headroom >= 0
    load = (
        mem.breakdown.get("cuda_context", 0)
        + mem.breakdown.get("weights", 0)
        + mem.breakdown.get("adapters", 0)
    )
    memory = MemoryResult(
        method=method,
        gpu=gpu.slug if gpu else None,
        num_gpus=setup.num_gpus,
        parallelism=setup.parallelism,
        peak_bytes=mem.peak_bytes,
        peak_gib=_gib(mem.peak_bytes),
        breakdown_gib={k: _gib(v) for k, v in mem.breakdown.items()},
        vram_gib=_gib(gpu.vram_bytes) if gpu else None,
        fits=fits,
        headroom_gib=_gib(headroom) if headroom is not None else None,
        load_gib=_gib(load),
    )

    warnings: list[Notice] = list(mem.warnings)
    reading = llama_reading(arch)
    if reading:  # first: every other number rests on it
        warnings.insert(0, Notice("architecture_read_as_llama", reading))
    assumptions: list[str] = list(mem.assumptions)
    throughput = time = None
    cost = None
    if gpu is not None and fits is False:
        warnings.append(advice.not_fit(gpu, setup, mem.peak_bytes))
    if gpu is not None and fits:
        tp = throughput_for_job(arch, setup, gpu, job)
        throughput = ThroughputResult(
            gpu=gpu.slug,
            num_gpus=setup.num_gpus,
            tokens_per_s=round(tp.tokens_per_s, 1),
            tokens_per_s_per_gpu=round(tp.tokens_per_s / setup.num_gpus, 1),
            step_s=tp.step_s,
            mfu=round(tp.mfu, 3),
            bound=tp.bound,
            calibrated=tp.scaled_from is None,
            scaled_from=tp.scaled_from,
            breakdown_s={k: round(v, 6) for k, v in tp.breakdown_s.items()},
        )
        assumptions.extend(tp.assumptions)
        warnings.extend(advice.gc_notice(arch, setup, gpu, job, tp.tokens_per_s))
        warnings.extend(advice.zero_speed_notice(setup))
        if sched is not None:
            jt = job_time(sched, tp.tokens_per_s)
            time = TimeResult(
                dataset_samples=sched.dataset_samples,
                epochs=sched.epochs,
                samples_per_step=sched.samples_per_step,
                tokens_per_sample=sched.tokens_per_sample,
                steps_per_epoch=sched.steps_per_epoch,
                steps=sched.steps,
                tokens=sched.tokens,
                hours=jt.hours,
                steps_per_hour=jt.steps_per_hour,
                seconds_per_step=jt.seconds_per_step,
            )
            warnings.extend(schedule_notices(sched))
            options = cost_options(inp.prices, gpu.slug, setup.num_gpus, jt.hours)
            rent = options[0] if options else advice.cheapest_cloud_option(rankings.get(method, ()))
            own = ownership(gpu, setup.num_gpus, jt.hours, inp.electricity_usd_per_kwh, rent)
            cost = CostResult(gpu=gpu.slug, num_gpus=setup.num_gpus, options=options, ownership=own)
            warnings.extend(price_notices(options))
    elif sched is not None:
        warnings.extend(schedule_notices(sched))
    if gpu is not None:
        warnings.extend(advice.gpu_notices(gpu, setup))
    warnings.extend(advice.general_notices(mem, setup, job, memory.load_gib))

    show_ranking = inp.gpu is None or inp.ranking
    rows: tuple[RankRow, ...] = ()
    if show_ranking:
        rows = rank(arch, setups[method], catalog, inp.prices, job, ranker=ranker)
        assumptions.append(
            "Ranking: every catalog GPU × 1/2/4/8 GPUs in one host; multi-GPU rows use DDP when a replica "
            "fits with headroom, else FSDP; 'usd' is the job at the GPU's cheapest rentable price; "
            "max_batch_size and max_seq_len are interpolated between memory estimates at doubling sizes "
            "(within about one step of an exact search)."
        )
    engine = engine_config(arch, setup, inp.grad_accum, inp.epochs)
    return EstimateResult(
        model=inp.model_name,
        memory=memory,
        params=ParamsResult(mem.params_total, mem.params_trainable),
        throughput=throughput,
        time=time,
        cost=cost,
        ranking=tuple(ranking_row(r) for r in rows),
        recommendation=rec,
        engine=engine,
        warnings=_dedupe(warnings),
        assumptions=tuple(dict.fromkeys(assumptions)),
    )


def _dedupe(notices: list[Notice]) -> tuple[Notice, ...]:
    seen: dict[str, Notice] = {}
    for n in notices:
        seen.setdefault(n.code, n)
    return tuple(seen.values())
