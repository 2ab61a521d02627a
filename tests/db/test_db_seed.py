"""The seed catalog: loads on both databases, twice without change, with dates and sources everywhere."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from dbhelp import DATA_DIR, counts
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import catalog, catalog_cache
from app.models import PRICE_KINDS, Gpu, Price


def test_seed_load_twice_is_idempotent(new_session: Callable[[], Session]) -> None:
    with new_session() as s:
        first = catalog.load_seed(s)
        s.commit()
        after_first = counts(s)
        stamp = catalog.catalog_last_updated(s)
    assert {p: r.inserted for p, r in first.items()} == {
        "gpus": after_first["gpu"], "prices": after_first["price"],
        "models": after_first["model"], "tiers": after_first["budget_tier"],
    }
    with new_session() as s:
        second = catalog.load_seed(s)
        s.commit()
        assert counts(s) == after_first
        assert catalog.catalog_last_updated(s) == stamp  # nothing changed, so not touched
    assert all(r.inserted == 0 and r.updated == 0 and r.ok for r in second.values())
    assert second["prices"].unchanged == after_first["price"]


def test_only_if_empty_leaves_a_loaded_catalog_alone(seeded: Callable[[], Session]) -> None:
    with seeded() as s:
        assert catalog.load_seed(s, only_if_empty=True) == {}
        assert not catalog.catalog_is_empty(s)


def test_catalog_sizes_and_named_entries(seeded: Callable[[], Session]) -> None:
    with seeded() as s:
        n = counts(s)
        assert n["gpu"] >= 34 and n["model"] >= 38 and n["price"] >= 60 and n["budget_tier"] >= 3
        for slug in ("rtx-4090", "rtx-3090", "rtx-3060", "rtx-4070", "a100-80gb", "a100-80gb-pcie",
                     "a100-40gb", "h100-sxm", "h100-pcie", "h200", "l4", "l40s", "a10g", "t4", "v100-32gb",
                     "b200", "rtx-5090", "rtx-a6000", "rtx-6000-ada", "mi300x"):
            assert catalog.get_gpu(s, slug) is not None, slug
        for key in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "mixtral-8x7b-v0.1", "qwen3-30b-a3b",
                    "mistral-7b-v0.3", "qwen2.5-7b", "gemma-3-4b-it", "meta-llama/Llama-3.1-8B"):
            assert catalog.get_model(s, key) is not None, key
        assert [t.slug for t in catalog.list_tiers(s)] == ["entry", "workstation", "cloud-spot"]


def test_vram_is_what_nvidia_smi_reports(seeded: Callable[[], Session]) -> None:
    expected_mib = {"rtx-4090": 24_564, "h200": 143_771, "a100-80gb": 81_920, "h100-sxm": 81_559,
                    "l4": 23_034, "a10g": 23_028, "t4": 15_360, "l40s": 46_068, "rtx-a6000": 49_140}
    with seeded() as s:
        for slug, mib in expected_mib.items():
            gpu = catalog.get_gpu(s, slug)
            assert gpu is not None and gpu.vram_total_mib == mib, slug
        spec = catalog_cache.gpu_spec(catalog.get_gpu(s, "rtx-4090"))  # type: ignore[arg-type]
        assert spec.vram_bytes == 24_564 * 2**20 and spec.bf16_tflops == 165.2
        t4 = catalog.get_gpu(s, "t4")
        assert t4 is not None and not t4.bf16_supported and t4.bf16_tflops is None


def test_every_price_has_a_date_a_source_and_a_known_kind(seeded: Callable[[], Session]) -> None:
    with seeded() as s:
        prices = s.scalars(select(Price)).all()
        gpus = s.scalars(select(Gpu)).all()
    assert prices
    for p in prices:
        assert p.observed_on.year >= 2023, p.id
        assert "http" in p.source or "mirror" in p.source, p.source
        assert p.kind in PRICE_KINDS and p.usd_per_gpu_hour > 0
    for g in gpus:
        assert g.source.strip() and g.vram_total_source.strip(), g.slug


def test_model_configs_round_trip_as_json(seeded: Callable[[], Session]) -> None:
    with seeded() as s:
        big = catalog.get_model(s, "META-LLAMA/LLAMA-3.1-70B")
        assert big is not None and big.slug == "llama-3.1-70b"
        assert big.config["num_hidden_layers"] == 80 and big.config["rope_scaling"]["rope_type"] == "llama3"
        assert big.params_total == 70_553_706_496
        moe = catalog.get_model(s, "qwen3-30b-a3b")
        assert moe is not None and (moe.moe_experts, moe.experts_per_token) == (128, 8)
        assert moe.params_active < moe.params_total / 5
        mixtral = catalog.get_model(s, "mixtral-8x7b-v0.1")
        assert mixtral is not None and (mixtral.moe_experts, mixtral.experts_per_token) == (8, 2)
        qwen = catalog.get_model(s, "qwen2.5-7b")
        assert qwen is not None and qwen.family == "qwen2"
        gemma = catalog.get_model(s, "gemma-3-4b-it")
        assert gemma is not None and gemma.config["model_type"] == "gemma3_text"


def test_model_files_csv_and_sources_agree() -> None:
    with open(DATA_DIR / "models.csv", newline="") as f:
        slugs = {row["slug"] for row in csv.DictReader(f)}
    files = {p.stem for p in (DATA_DIR / "models").glob("*.json")}
    assert slugs <= files
    sources = (DATA_DIR / "models" / "SOURCES.md").read_text()
    for slug in slugs:
        assert re.search(rf"^- {re.escape(slug)} \(", sources, re.M), slug
        config = json.loads((DATA_DIR / "models" / f"{slug}.json").read_text())
        assert config["model_type"] and config["hidden_size"] > 0


def test_latest_prices_and_history(seeded: Callable[[], Session]) -> None:
    with seeded() as s:
        listing = {g.gpu.slug: g for g in catalog.list_gpus(s, with_history=True)}
    h100 = listing["h100-sxm"]
    keys = [(p.provider, p.kind) for p in h100.latest_prices]
    assert len(keys) == len(set(keys))  # one latest row per provider and kind
    aws_od = [p.observed_on.isoformat() for p in h100.history if (p.provider, p.kind) == ("aws", "on_demand")]
    assert aws_od == ["2026-09-17", "2026-03-01", "2023-07-27"]  # newest first: history is kept
    latest_aws = next(p for p in h100.latest_prices if (p.provider, p.kind) == ("aws", "on_demand"))
    assert latest_aws.usd_per_gpu_hour == 6.88 and latest_aws.observed_on.isoformat() == "2026-09-17"
    prices = [p.usd_per_gpu_hour for p in h100.latest_prices]
    assert prices == sorted(prices)


def test_suggestions_for_near_misses(seeded: Callable[[], Session]) -> None:
    with seeded() as s:
        assert catalog.suggestions(s, "llama-3-8b")[0] == "llama-3.1-8b"
        assert catalog.suggestions(s, "4090", "gpu")[0] == "rtx-4090"
        assert "h100-sxm" in catalog.suggestions(s, "h100", "gpu")
        assert catalog.get_model(s, "llama-3-8b") is None


def test_refresh_updates_facts_and_appends_prices(seeded: Callable[[], Session], data_copy: Path) -> None:
    gpus = (data_copy / "gpus.csv").read_text()
    renamed = gpus.replace("rtx-4090,NVIDIA GeForce RTX 4090", "rtx-4090,RTX 4090 (new)")
    (data_copy / "gpus.csv").write_text(renamed)
    with open(data_copy / "prices.csv", "a") as f:
        f.write("rtx-4090,runpod,spot,0.31,2026-08-01,https://example.org/runpod-august,refresh test\n")
    with seeded() as s:
        before = counts(s)
        reports = catalog.load_seed(s, data_copy)
        s.commit()
        assert (reports["gpus"].updated, reports["prices"].inserted) == (1, 1)
        assert counts(s)["price"] == before["price"] + 1
        gpu = catalog.get_gpu(s, "rtx-4090")
        assert gpu is not None and gpu.name == "RTX 4090 (new)"
        spot = catalog.list_prices(s, gpu_slug="rtx-4090", provider="runpod", kind="spot")
        assert [p.usd_per_gpu_hour for p in spot] == [0.31, 0.34]  # newest first, the old one kept


def test_a_bad_seed_file_changes_nothing(new_session: Callable[[], Session], data_copy: Path) -> None:
    bad_line = len((data_copy / "prices.csv").read_text().splitlines()) + 1
    with open(data_copy / "prices.csv", "a") as f:
        f.write("rtx-4090,runpod,spot,free,2026-08-01,https://example.org/x,\n")
    with new_session() as s:
        with pytest.raises(catalog.SeedError) as err:
            catalog.load_seed(s, data_copy)
        s.commit()
        assert set(counts(s).values()) == {0}
    issue = err.value.reports["prices"].errors[0]
    assert issue.line == bad_line and "usd_per_gpu_hour" in issue.message
