"""The seed article's situations (design.md, pinned) through the one entry point, on the seed catalog."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest

from app.core.estimate import EstimateResult, estimate
from app.core.gpu import GIB
from app.core.memory import estimate_memory
from app.core.setup import TrainingSetup
from tests.core.catalog_values import seed_gpu, seed_gpus, seed_prices, seed_tiers
from tests.core.helpers import arch, config

ARTICLE_PEAK_GB = 14.8  # "VRAM usage during training: 14.8 GB peak" (RTX 4090, Unsloth)


def run(model: str, **fields: Any) -> EstimateResult:
    return estimate(
        config=config(model),
        model_name=model,
        gpus=seed_gpus(),
        prices=seed_prices(),
        tiers=seed_tiers(),
        **fields,
    )


def test_the_articles_4090_run() -> None:
    r = run(
        "llama-3.1-8b",
        method="qlora",
        lora_rank=16,
        batch_size=4,
        seq_len=512,
        gpu=seed_gpu("rtx-4090"),
        dataset_samples=5_000,
        epochs=3,
    )
    assert r.memory.fits and r.memory.vram_gib == pytest.approx(24_564 / 1024, abs=0.01)
    assert r.memory.peak_gib * GIB / 1e9 == pytest.approx(ARTICLE_PEAK_GB, rel=0.20)
    assert r.throughput is not None and r.throughput.scaled_from and "H200" in r.throughput.scaled_from
    assert r.time is not None and r.time.steps == 3_750
    assert r.time.hours == pytest.approx(r.time.tokens / r.throughput.tokens_per_s / 3600, rel=1e-4)
    rec = r.recommendation
    assert (rec.method, rec.gpu, rec.num_gpus, rec.where, rec.budget_tier) == (
        "qlora",
        "rtx-4090",
        1,
        "local",
        "entry",
    )
    assert r.cost is not None and r.cost.options and r.cost.ownership is not None
    cheapest = r.cost.options[0]
    assert cheapest.usd_total == pytest.approx(r.time.hours * cheapest.usd_per_hour)
    assert r.cost.ownership.purchase_usd == 1599
    codes = {w.code for w in r.warnings}
    assert {
        "article_steps_slip",
        "steps_arithmetic",
        "peak_at_first_step",
        "test_100_steps",
        "gradient_checkpointing_cost",
        "prices_dated",
    } <= codes
    assert r.ranking == ()  # a GPU was named and no ranking asked for


@pytest.mark.parametrize("slug", ["rtx-3060", "rtx-4070"])
def test_7b_qlora_on_a_12gb_card(slug: str) -> None:
    r = run("mistral-7b-v0.3", method="qlora", batch_size=1, seq_len=512, gpu=seed_gpu(slug))
    assert r.memory.fits and r.memory.peak_gib < 12 * 1e9 / GIB
    assert r.memory.headroom_gib is not None and r.memory.headroom_gib > 1.0
    assert r.recommendation.where == "local" and r.recommendation.gpu == slug


def test_7b_full_fine_tune_needs_more_than_one_80gb_card() -> None:
    setup = TrainingSetup(method="full", precision="amp_bf16", optimizer="adamw", batch_size=4, seq_len=512)
    single = estimate_memory(arch("mistral-7b-v0.3"), setup)
    assert single.peak_bytes > 80 * GIB
    r = run("mistral-7b-v0.3", method="full", precision="amp_bf16", batch_size=4, seq_len=512)
    rec = r.recommendation
    gpu = seed_gpu(rec.gpu or "")
    assert rec.where in ("cloud_spot", "cloud_on_demand")
    assert rec.num_gpus >= 2 or gpu.vram_bytes > 80 * GIB
    a100 = [row for row in r.ranking if row.gpu == "a100-80gb"]
    assert not next(row for row in a100 if row.num_gpus == 1).fits
    assert next(row for row in a100 if row.num_gpus == 2).fits  # "two A100 80 GB cards in parallel"
    if rec.num_gpus > 1:
        assert r.engine.engine in ("fsdp", "deepspeed_zero2", "deepspeed_zero3")
        assert r.engine.accelerate_config_yaml or r.engine.deepspeed_config


def test_70b_class_goes_to_cloud_spot() -> None:
    r = run("llama-3.1-70b", dataset_samples=10_000)
    rec = r.recommendation
    assert rec.where == "cloud_spot" and rec.budget_tier == "cloud-spot"
    assert rec.method in ("lora", "qlora") and rec.fits
    assert any("70B-class" in s for s in rec.reasons)
    assert r.time is not None and r.time.hours > 0 and r.cost is not None and r.cost.options
    assert len(r.ranking) == len(seed_gpus()) * 4 - 3 * 3  # Apple devices rank at one count only


def test_70b_stays_in_the_cloud_even_with_a_budget() -> None:
    r = run("llama-3.1-70b", dataset_samples=10_000, budget_usd=6_000)
    assert r.recommendation.where == "cloud_spot"


def test_open_method_picks_lora_when_16_bit_fits_and_full_only_for_big_data() -> None:
    small = run(
        "llama-3.1-8b", batch_size=4, seq_len=512, owned_gpu=seed_gpu("rtx-4090"), dataset_samples=5_000
    )
    assert (small.recommendation.method, small.recommendation.where) == ("lora", "local")
    tight = run(
        "llama-3.1-8b", batch_size=1, seq_len=512, owned_gpu=seed_gpu("rtx-4070"), dataset_samples=5_000
    )
    assert (tight.recommendation.method, tight.recommendation.gpu) == ("qlora", "rtx-4070")
    big = run("qwen2.5-0.5b", batch_size=4, seq_len=512, dataset_samples=200_000)
    assert big.recommendation.method == "full"


def test_steps_and_cost_from_a_dataset_size() -> None:
    r = run(
        "llama-3.1-8b",
        method="qlora",
        batch_size=4,
        seq_len=512,
        gpu=seed_gpu("a100-80gb"),
        dataset_samples=5_000,
        epochs=3,
        grad_accum=2,
    )
    assert r.time is not None and r.throughput is not None and r.cost is not None
    assert r.time.steps == 3 * 625
    for o in r.cost.options:
        assert o.usd_total == pytest.approx(r.time.hours * o.usd_per_hour * 1)
    assert [o.usd_total for o in r.cost.options] == sorted(o.usd_total for o in r.cost.options)


def test_result_is_plain_json_with_the_contract_names() -> None:
    r = run("llama-3.1-8b", batch_size=4, seq_len=512, dataset_samples=5_000, epochs=3)
    body = json.loads(json.dumps(dataclasses.asdict(r), default=str))
    assert {
        "memory",
        "params",
        "throughput",
        "time",
        "cost",
        "ranking",
        "recommendation",
        "warnings",
        "assumptions",
    } <= body.keys()
    assert {"peak_gib", "breakdown_gib", "fits", "headroom_gib"} <= body["memory"].keys()
    assert sum(body["memory"]["breakdown_gib"].values()) == pytest.approx(
        body["memory"]["peak_gib"], abs=0.01
    )
    assert {"total", "trainable"} <= body["params"].keys()
    assert {
        "gpu",
        "num_gpus",
        "fits",
        "peak_gib",
        "headroom_gib",
        "max_batch_size",
        "tokens_per_s",
        "hours",
        "usd",
    } <= body["ranking"][0].keys()
    assert {"method", "gpu", "num_gpus", "where", "budget_tier", "reasons"} <= body["recommendation"].keys()
    assert {"provider", "kind", "usd_per_hour", "usd_total", "observed_on", "source"} <= body["cost"][
        "options"
    ][0].keys()
    assert all({"code", "message"} == w.keys() for w in body["warnings"])


def test_whole_estimate_with_ranking_stays_fast() -> None:
    t0 = time.perf_counter()
    run("llama-3.1-70b", dataset_samples=10_000)
    assert time.perf_counter() - t0 < 0.5  # measured ~20 ms (scripts/bench_rank.py); generous for CI


def test_empty_catalog_still_answers() -> None:
    r = estimate(config=config("llama-3.2-1b"))
    assert r.recommendation.gpu is None and not r.recommendation.fits and r.memory.peak_gib > 0


def test_pure_fp16_full_fine_tuning_is_warned() -> None:
    """A measured pure-fp16 AdamW run went NaN at its second step: the answer says so; amp_fp16 is fine."""
    fp16 = run("llama-3.2-1b", method="full", precision="fp16", gpu=seed_gpu("t4"), seq_len=512)
    amp = run("llama-3.2-1b", method="full", precision="amp_fp16", gpu=seed_gpu("t4"), seq_len=512)
    lora = run("llama-3.2-1b", method="lora", precision="fp16", gpu=seed_gpu("t4"), seq_len=512)
    assert "fp16_full_diverges" in {w.code for w in fp16.warnings}
    assert "fp16_full_diverges" not in {w.code for w in amp.warnings} | {w.code for w in lora.warnings}
