"""What a job costs: for every dated catalog price, and for owning the card (purchase, power, break-even)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass

from app.core.gpu import GpuSpec, PriceQuote
from app.core.notices import Notice

DEFAULT_USD_PER_KWH = 0.15  # design.md default for `electricity_usd_per_kwh`


@dataclass(frozen=True)
class CostOption:
    """The job's cost at one observed rental price (per-GPU price times GPUs times hours)."""

    gpu_slug: str
    num_gpus: int
    provider: str
    kind: str
    usd_per_hour: float  # per GPU, as quoted
    usd_total: float
    observed_on: dt.date
    source: str


@dataclass(frozen=True)
class Ownership:
    """Owning the card(s): purchase, electricity per job, and after how many jobs buying beats renting."""

    gpu_slug: str
    num_gpus: int
    purchase_usd: float
    board_power_w: float  # per card
    usd_per_kwh: float
    energy_kwh_per_job: float
    power_usd_per_job: float
    rent_usd_per_job: float | None  # the cheapest rental that runs the same job
    rent_reference: str | None  # which rental that is, in words
    break_even_jobs: int | None  # None: renting is never beaten (or nothing to compare with)


def cost_options(
    prices: Iterable[PriceQuote], gpu_slug: str, num_gpus: int, hours: float
) -> tuple[CostOption, ...]:
    """One option per catalog price of this GPU, cheapest job first."""
    options = [
        CostOption(
            gpu_slug=p.gpu_slug,
            num_gpus=num_gpus,
            provider=p.provider,
            kind=p.kind,
            usd_per_hour=p.usd_per_hour,
            usd_total=hours * p.usd_per_hour * num_gpus,
            observed_on=p.observed_on,
            source=p.source,
        )
        for p in prices
        if p.gpu_slug == gpu_slug
    ]
    return tuple(sorted(options, key=lambda o: (o.usd_total, o.provider, o.kind)))


def ownership(
    gpu: GpuSpec,
    num_gpus: int,
    hours: float,
    usd_per_kwh: float = DEFAULT_USD_PER_KWH,
    rent: CostOption | None = None,
) -> Ownership | None:
    """Owning `num_gpus` of this card for a job of `hours`; None when the card has no purchase price.

    Power is the board power (TDP/TGP) for the whole job, the conservative side of what a card draws
    under a training load; the rest of the PC is not counted. Break-even: the smallest number of jobs n
    with n x (rent - power) >= purchase, i.e. ceil(purchase / (rent - power)).
    """
    if gpu.launch_price_usd is None:
        return None
    purchase = gpu.launch_price_usd * num_gpus
    kwh = gpu.board_power_w * num_gpus * hours / 1000.0
    power = kwh * usd_per_kwh
    rent_usd = rent.usd_total if rent is not None else None
    reference = (
        f"{rent.num_gpus}× {rent.gpu_slug} at {rent.provider} {rent.kind.replace('_', '-')} "
        f"${rent.usd_per_hour:.2f}/GPU-hour (observed {rent.observed_on.isoformat()})"
        if rent is not None
        else None
    )
    break_even: int | None = None
    if rent_usd is not None and rent_usd > power and math.isfinite(rent_usd):
        break_even = max(1, math.ceil(purchase / (rent_usd - power)))
    return Ownership(
        gpu_slug=gpu.slug,
        num_gpus=num_gpus,
        purchase_usd=purchase,
        board_power_w=gpu.board_power_w,
        usd_per_kwh=usd_per_kwh,
        energy_kwh_per_job=kwh,
        power_usd_per_job=power,
        rent_usd_per_job=rent_usd,
        rent_reference=reference,
        break_even_jobs=break_even,
    )


def price_notices(options: tuple[CostOption, ...], today: dt.date | None = None) -> tuple[Notice, ...]:
    """Say that prices are dated snapshots, naming the oldest and newest dates used."""
    if not options:
        return ()
    oldest = min(o.observed_on for o in options)
    newest = max(o.observed_on for o in options)
    span = oldest.isoformat() if oldest == newest else f"{oldest.isoformat()} to {newest.isoformat()}"
    text = (
        f"Prices are dated snapshots ({span}), each with its source; cloud GPU prices move weekly, "
        f"spot prices hourly. Check the provider before you launch."
    )
    if today is not None and (today - oldest).days > 180:
        text += f" The oldest is {(today - oldest).days} days old."
    notices = [Notice(code="prices_dated", message=text)]
    if any(o.kind in ("spot", "interruptible") for o in options):
        notices.append(
            Notice(
                code="spot_interruptions",
                message=(
                    "Spot/interruptible instances can be stopped at any time: save checkpoints "
                    "(e.g. every 30 minutes) so a preempted job resumes instead of restarting."
                ),
            )
        )
    return tuple(notices)
