"""What to do: method, GPU setup, local or cloud, budget tier, and the reasons, drawn from the rankings.

Rules (the article's advice, made checkable):
- method, when left open: full fine-tuning only when the dataset is large (100K+ samples, the article's
  threshold) and it fits; else LoRA when 16-bit weights fit; else QLoRA (memory is tight);
- GPU, when left open: the cheapest setup that fits with headroom for the first-backward peak;
- where: `local` when a card the user owns, names (a consumer card) or whose budget tier buys fits and
  the job is not huge; cloud otherwise (70B-class, full fine-tuning of 13B+, or a week of training),
  `cloud_spot` when the cheapest price is interruptible, else `cloud_on_demand`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from app.core.architecture import Architecture
from app.core.gpu import BudgetTier, GpuSpec, PriceQuote, gpus_for_budget, tier_for_budget
from app.core.ranking import COUNTS, Job, Ranker, RankRow, rank, tier_listing, usd_per_mtok
from app.core.setup import TrainingSetup

FULL_FT_MIN_SAMPLES = 100_000  # the article: full fine-tuning "when you're training on 100K+ samples"
HUGE_PARAMS = 60e9  # "70B+ model fine-tuning ... use cloud spot instances"
HUGE_FULL_PARAMS = 13e9  # "... or full fine-tuning of 13B+ models"
HUGE_LOCAL_HOURS = 168.0  # a week on a desk-side card: rent instead
METHOD_ORDER = ("full", "lora", "qlora")


@dataclass(frozen=True)
class Recommendation:
    """What tunefit advises: method, GPU setup, where to run it, which budget tier, and why."""

    method: str
    gpu: str | None
    gpu_name: str | None
    num_gpus: int
    parallelism: str
    where: str  # "local" | "cloud_spot" | "cloud_on_demand"
    budget_tier: str | None
    reasons: tuple[str, ...]
    fits: bool
    tokens_per_s: float | None
    hours: float | None
    usd: float | None  # the job at the cheapest price of the chosen setup (cloud)
    price_provider: str | None
    price_kind: str | None
    usd_per_hour: float | None  # all GPUs


@dataclass(frozen=True)
class Wishes:
    """What the request fixes or leaves open, and what the user has."""

    method: str | None
    gpu: GpuSpec | None
    num_gpus: int
    owned_gpu: GpuSpec | None
    budget_usd: float | None


def candidate_methods(wishes: Wishes, job: Job) -> tuple[str, ...]:
    """Methods worth considering, best quality first."""
    if wishes.method:
        return (wishes.method,)
    large = (job.dataset_samples or 0) * max(job.epochs, 1) >= FULL_FT_MIN_SAMPLES
    return METHOD_ORDER if large else METHOD_ORDER[1:]


def is_huge(arch: Architecture, method: str, hours: float | None) -> str:
    """Why a job belongs in the cloud rather than on a desk-side card ('' when it does not)."""
    if arch.params_total >= HUGE_PARAMS:
        return f"a {arch.params_total / 1e9:.0f}B-parameter model is 70B-class"
    if method == "full" and arch.params_total >= HUGE_FULL_PARAMS:
        return f"full fine-tuning of a {arch.params_total / 1e9:.0f}B model needs datacenter memory"
    if hours is not None and hours > HUGE_LOCAL_HOURS:
        return f"{hours:,.0f} hours is more than a week on this card"
    return ""


def _where(row: RankRow) -> str:
    if row.price is not None and row.price.is_spot:
        return "cloud_spot"
    return "cloud_on_demand"


def _cost(row: RankRow) -> float:
    value = row.usd if row.usd is not None else usd_per_mtok(row)
    return value if value is not None else float("inf")


# Within this share of the cheapest option, fewer GPUs win: one card needs no distributed engine, the
# multi-GPU speed-up is the least certain part of the model (not measured), and the floor spot prices
# the catalog quotes are rarely available for eight co-located GPUs at once.
SIMPLER_WITHIN = 0.25


def _simplest_cheap(rows: Sequence[RankRow]) -> RankRow:
    """The setup with the fewest GPUs among those within SIMPLER_WITHIN of the cheapest, then the cheapest."""
    floor = min(_cost(r) for r in rows)
    near = [r for r in rows if _cost(r) <= floor * (1 + SIMPLER_WITHIN)]
    return min(near, key=lambda r: (r.num_gpus, _cost(r), -(r.tokens_per_s or 0.0)))


def _rent_tier(tiers: Sequence[BudgetTier]) -> str | None:
    rent = [t for t in tiers if t.kind == "rent"]
    return rent[0].slug if rent else None


def recommend(
    arch: Architecture,
    setups: dict[str, TrainingSetup],
    wishes: Wishes,
    job: Job,
    gpus: Sequence[GpuSpec],
    prices: Sequence[PriceQuote],
    tiers: Sequence[BudgetTier],
    ranker: Ranker | None = None,
) -> tuple[Recommendation, dict[str, tuple[RankRow, ...]]]:
    """The recommendation and, per method considered, the catalog ranking it was drawn from."""
    rk = ranker or Ranker(arch)
    methods = candidate_methods(wishes, job)
    rankings: dict[str, tuple[RankRow, ...]] = {}

    def rows_for(method: str) -> tuple[RankRow, ...]:
        if method not in rankings:
            rankings[method] = rank(arch, setups[method], gpus, prices, job, COUNTS, rk, limits=False)
        return rankings[method]

    # 1. A card at hand: the one the user owns, a consumer card they named, or what the budget buys.
    local = _local_options(wishes, gpus, tiers)
    huge_reason = ""
    for method in methods:
        ok = [r for r in rows_for(method) if r.recommendable and (r.gpu_slug, r.num_gpus) in local]
        if not ok:
            continue
        best = min(ok, key=lambda r: (local[(r.gpu_slug, r.num_gpus)], -(r.tokens_per_s or 0.0)))
        huge_reason = is_huge(arch, method, best.hours)
        if huge_reason:
            break
        return _local(method, best, wishes, tiers, methods), rankings

    # 2. A GPU the user named (not theirs, or too small locally): the fewest of it that fit.
    if wishes.gpu is not None:
        named = wishes.gpu.slug
        counts = (wishes.num_gpus,) if wishes.num_gpus > 1 else COUNTS
        for method in methods:
            rows = [r for r in rows_for(method) if r.gpu_slug == named and r.num_gpus in counts]
            if not rows and wishes.num_gpus not in COUNTS:  # an unusual count: rank that setup alone
                rows = [rk.row(setups[method], wishes.gpu, wishes.num_gpus, prices, job, limits=False)]
            ok = [r for r in rows if r.recommendable]
            if ok:
                best = min(ok, key=lambda r: r.num_gpus)
                return _cloud(arch, method, best, methods, tiers, huge_reason, named=True), rankings

    # 3. The cloud: the cheapest setup that fits with headroom, per method; full wins only with big data.
    # Only CUDA cards are picked unasked: the reference stack (bitsandbytes, the calibration) is CUDA.
    cuda = {g.slug for g in gpus if g.platform == "cuda"}
    best_by_method = {}
    for method in methods:
        ok = [r for r in rows_for(method) if r.recommendable and r.price is not None and r.gpu_slug in cuda]
        # The article's advice is cloud *spot* for training: on-demand only when no spot setup fits.
        ok = [r for r in ok if r.price is not None and r.price.is_spot] or ok
        if ok:
            best_by_method[method] = _simplest_cheap(ok)
    if best_by_method:
        if "full" in best_by_method:
            method = "full"
        else:
            floor = min(_cost(r) for r in best_by_method.values())
            near = [m for m, r in best_by_method.items() if _cost(r) <= floor * (1 + SIMPLER_WITHIN)]
            method = min(near, key=lambda m: (best_by_method[m].num_gpus, _cost(best_by_method[m])))
        return _cloud(arch, method, best_by_method[method], methods, tiers, huge_reason), rankings

    # 4. Nothing fits anywhere (up to 8 GPUs of any kind): say so, with the closest setup.
    method = methods[-1]
    candidates = rows_for(method)
    setup = setups[method]
    if candidates:
        closest = max(candidates, key=lambda r: r.headroom_bytes / max(r.vram_bytes, 1))
        count, parallelism = closest.num_gpus, closest.parallelism
        why = (
            f"No catalog GPU setup up to {max(COUNTS)} GPUs fits {method} at batch {setup.batch_size} × "
            f"{setup.seq_len} tokens; the closest is {closest.num_gpus}× {closest.gpu_name} at "
            f"{closest.peak_bytes / 2**30:,.1f} GiB per GPU. Shorten the sequence, lower the batch, or use "
            f"a multi-node setup (not modelled)."
        )
    else:
        count, parallelism = setup.num_gpus, setup.parallelism
        why = "The catalog holds no GPUs to compare: name a gpu, or load the catalog."
    rec = Recommendation(
        method=method, gpu=None, gpu_name=None, num_gpus=count, parallelism=parallelism, where="cloud_spot",
        budget_tier=_rent_tier(tiers), reasons=(why,), fits=False, tokens_per_s=None, hours=None, usd=None,
        price_provider=None, price_kind=None, usd_per_hour=None,
    )
    return rec, rankings


def _local_options(
    wishes: Wishes, gpus: Sequence[GpuSpec], tiers: Sequence[BudgetTier]
) -> dict[tuple[str, int], float]:
    """(gpu, count) the user can run at home, with a preference (lower is better: owned/named first)."""
    options: dict[tuple[str, int], float] = {}
    if wishes.owned_gpu is not None:
        options[(wishes.owned_gpu.slug, 1)] = 0.0
    if wishes.gpu is not None and (wishes.gpu.consumer or wishes.owned_gpu == wishes.gpu):
        options.setdefault((wishes.gpu.slug, wishes.num_gpus), 0.0)
    if wishes.budget_usd is not None:
        by_slug = {g.slug: g for g in gpus}
        for slug in gpus_for_budget(tiers, wishes.budget_usd):
            gpu = by_slug.get(slug)
            if gpu is None or gpu.launch_price_usd is None:
                continue
            for n in (1, 2):  # the article's builds: one card, or two (e.g. dual RTX 4090)
                if n * gpu.launch_price_usd <= wishes.budget_usd:
                    options.setdefault((slug, n), n * gpu.launch_price_usd)
    return options


def _method_reason(method: str, methods: tuple[str, ...]) -> str:
    if len(methods) == 1:
        return f"{_METHOD_NAME[method]} as requested."
    if method == "full":
        return "Full fine-tuning: the dataset is large (100K+ samples) and it fits."
    if method == "lora":
        return "LoRA: the 16-bit base model fits with headroom, so there is no need to quantize it."
    return (
        "QLoRA: memory is tight, so the base model is quantized to 4-bit NF4 "
        "(LoRA on a 16-bit base does not fit as well)."
    )


_METHOD_NAME = {"full": "Full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


def _fit_reason(row: RankRow) -> str:
    gib = 2**30
    return (
        f"{row.num_gpus}× {row.gpu_name}: peak {row.peak_bytes / gib:,.1f} GiB of "
        f"{row.vram_bytes / gib:,.1f} GiB "
        f"per GPU ({row.headroom_bytes / gib:,.1f} GiB headroom for the first backward/optimizer step)."
    )


def _speed_reason(row: RankRow) -> str | None:
    if row.tokens_per_s is None:
        return None
    text = f"About {row.tokens_per_s:,.0f} training tokens/s"
    if row.hours is not None:
        text += f", {row.hours:,.1f} hours for the job"
    return text + "."


def _local(
    method: str, row: RankRow, wishes: Wishes, tiers: Sequence[BudgetTier], methods: tuple[str, ...]
) -> Recommendation:
    reasons = [_method_reason(method, methods), _fit_reason(row)]
    tier = tier_for_budget(tiers, wishes.budget_usd) if wishes.budget_usd is not None else None
    if wishes.owned_gpu is not None and wishes.owned_gpu.slug == row.gpu_slug:
        reasons.append("Run it locally on the card you already have.")
    elif tier is not None and wishes.budget_usd is not None:
        reasons.append(
            f"Your ${wishes.budget_usd:,.0f} budget reaches the {tier.name} tier, which buys this card: "
            f"run it locally."
        )
    else:
        reasons.append("It fits the card you named: run it locally.")
        tier = tier_listing(tiers, row.gpu_slug)
    speed = _speed_reason(row)
    if speed:
        reasons.append(speed)
    if row.num_gpus > 1:
        reasons.append(_engine_reason(row))
    return _of_row(method, row, "local", tier.slug if tier else None, reasons, priced=False)


def _of_row(
    method: str, row: RankRow, where: str, budget_tier: str | None, reasons: list[str], priced: bool
) -> Recommendation:
    """The recommendation of a ranked setup; `priced`: with its cheapest rental price (cloud)."""
    price = row.price if priced else None
    return Recommendation(
        method=method,
        gpu=row.gpu_slug,
        gpu_name=row.gpu_name,
        num_gpus=row.num_gpus,
        parallelism=row.parallelism,
        where=where,
        budget_tier=budget_tier,
        reasons=tuple(reasons),
        fits=True,
        tokens_per_s=row.tokens_per_s,
        hours=row.hours,
        usd=row.usd if priced else None,
        price_provider=price.provider if price else None,
        price_kind=price.kind if price else None,
        usd_per_hour=row.usd_per_hour if priced else None,
    )


def _engine_reason(row: RankRow) -> str:
    if row.parallelism == "ddp":
        return (
            f"{row.num_gpus} GPUs with DDP (each holds the whole model); the accelerate config is included."
        )
    engine = "FSDP" if row.parallelism == "fsdp" else f"DeepSpeed ZeRO-{row.parallelism[-1]}"
    return (
        f"One GPU is not enough: shard across {row.num_gpus} GPUs with {engine}; the ready-to-use config "
        f"is included."
    )


def _cloud(
    arch: Architecture,
    method: str,
    row: RankRow,
    methods: tuple[str, ...],
    tiers: Sequence[BudgetTier],
    huge_reason: str,
    named: bool = False,
) -> Recommendation:
    where = _where(row)
    reasons = [_method_reason(method, methods), _fit_reason(row)]
    huge = huge_reason or is_huge(arch, method, row.hours)
    if named:
        reasons.append(f"You named the {row.gpu_name}; this is the fewest of them that fit.")
    else:
        reasons.append("The cheapest catalog setup that fits with headroom.")
    if huge:
        reasons.append(f"Rent rather than buy: {huge}.")
    speed = _speed_reason(row)
    if speed:
        reasons.append(speed)
    if row.price is not None:
        p = row.price
        cost = f", about ${row.usd:,.2f} for the job" if row.usd is not None else ""
        reasons.append(
            f"Cheapest price: {p.provider} {p.kind.replace('_', '-')} at ${p.usd_per_hour:.2f}/GPU-hour "
            f"(observed {p.observed_on.isoformat()}){cost}."
        )
    if row.num_gpus > 1:
        reasons.append(_engine_reason(row))
    if where == "cloud_spot":
        reasons.append("Spot instances can be preempted: checkpoint every 30 minutes or so.")
    return _of_row(method, row, where, _rent_tier(tiers), reasons, priced=True)


def with_method(setup: TrainingSetup, method: str) -> TrainingSetup:
    """The request's setup with another method (QLoRA keeps a 16-bit compute dtype)."""
    precision = setup.precision
    if method == "qlora" and precision in ("fp32", "amp_bf16"):
        precision = "bf16"
    elif method == "qlora" and precision == "amp_fp16":
        precision = "fp16"
    return replace(setup, method=method, precision=precision)  # type: ignore[arg-type]
