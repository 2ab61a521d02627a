"""Steps from a dataset (HF Trainer's rounding), hours, per-price job cost, and owning a card."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from app.core.cost import CostOption, cost_options, ownership, price_notices
from app.core.gpu import PriceQuote
from app.core.schedule import job_time, plan_schedule, schedule_notices
from tests.core.catalog_values import A100_80GB, RTX_4090


@pytest.mark.parametrize(
    ("samples", "epochs", "batch", "accum", "gpus", "per_epoch", "steps"),
    [
        (5_000, 3, 4, 1, 1, 1_250, 3_750),  # the article's run: 3,750, not "12.5K"
        (5_000, 3, 4, 1, 2, 625, 1_875),
        (5_000, 3, 4, 4, 1, 313, 939),  # ceil(5000/16) = 313 per epoch, rounded per epoch
        (1_001, 1, 4, 2, 1, 126, 126),
        (10, 2, 4, 4, 1, 1, 2),  # one short step per epoch
        (10_000, 1, 1, 1, 8, 1_250, 1_250),
    ],
)
def test_steps_round_up_per_epoch(samples, epochs, batch, accum, gpus, per_epoch, steps) -> None:
    s = plan_schedule(samples, epochs, batch, accum, gpus, tokens_per_sample=512)
    assert s.steps_per_epoch == per_epoch == math.ceil(samples / (batch * accum * gpus))
    assert s.steps == steps
    assert s.tokens == steps * batch * accum * gpus * 512


def test_article_slip_is_named() -> None:
    notes = {n.code: n.message for n in schedule_notices(plan_schedule(5_000, 3, 4, 1, 1, 512))}
    assert "3,750" in notes["steps_arithmetic"]
    assert "12.5K" in notes["article_steps_slip"] and "3,750" in notes["article_steps_slip"]
    other = {n.code for n in schedule_notices(plan_schedule(8_000, 3, 4, 1, 1, 512))}
    assert "article_steps_slip" not in other and "steps_arithmetic" in other


def test_hours_from_throughput() -> None:
    s = plan_schedule(5_000, 3, 4, 1, 1, 512)
    t = job_time(s, tokens_per_s=2_048.0)  # one batch-4 x 512 step per second
    assert t.seconds_per_step == pytest.approx(1.0)
    assert t.hours == pytest.approx(3_750 / 3600)
    assert t.steps_per_hour == pytest.approx(3600)


def _price(slug: str, provider: str, kind: str, usd: float) -> PriceQuote:
    return PriceQuote(slug, provider, kind, usd, dt.date(2026, 3, 1), f"https://example.test/{provider}")


PRICES = (
    _price("rtx-4090", "vast.ai", "spot", 0.31),
    _price("rtx-4090", "runpod", "on_demand", 0.60),
    _price("a100-80gb", "runpod", "spot", 1.39),
)


@pytest.mark.parametrize(("gpus", "hours"), [(1, 10.0), (2, 10.0), (4, 2.5)])
def test_cost_is_hours_times_price_times_gpus(gpus: int, hours: float) -> None:
    options = cost_options(PRICES, "rtx-4090", gpus, hours)
    assert [(o.provider, o.kind) for o in options] == [("vast.ai", "spot"), ("runpod", "on_demand")]
    assert [o.usd_total for o in options] == pytest.approx([hours * 0.31 * gpus, hours * 0.60 * gpus])
    assert all(o.observed_on == dt.date(2026, 3, 1) and o.source.startswith("https://") for o in options)


def test_ownership_break_even() -> None:
    rent = cost_options(PRICES, "rtx-4090", 1, 10.0)[0]  # $3.10 per job
    own = ownership(RTX_4090, 1, hours=10.0, usd_per_kwh=0.15, rent=rent)
    assert own is not None
    assert own.purchase_usd == 1599
    assert own.energy_kwh_per_job == pytest.approx(4.5)  # 450 W x 10 h
    assert own.power_usd_per_job == pytest.approx(0.675)
    assert own.break_even_jobs == math.ceil(1599 / (3.10 - 0.675)) == 660


def test_ownership_never_pays_when_power_costs_more_than_rent() -> None:
    rent = CostOption("rtx-4090", 1, "x", "spot", 0.01, 0.1, dt.date(2026, 1, 1), "s")
    own = ownership(RTX_4090, 1, hours=10.0, usd_per_kwh=0.15, rent=rent)
    assert own is not None and own.break_even_jobs is None
    assert ownership(A100_80GB, 1, 10.0) is None  # no purchase price in the catalog


def test_prices_are_dated() -> None:
    codes = {n.code: n.message for n in price_notices(cost_options(PRICES, "rtx-4090", 1, 1.0))}
    assert "2026-03-01" in codes["prices_dated"]
    assert "spot_interruptions" in codes
