"""Catalog values for the time/cost/recommendation tests: hand-built GPUs from catalog-facts.md, and the
seed catalog (data/*.csv, data/budget_tiers.yaml) read as plain files (no SQLAlchemy in core tests)."""

from __future__ import annotations

import csv
import datetime as dt
from functools import cache

import yaml

from app.core.gpu import MIB, BudgetTier, GpuSpec, PriceQuote
from tests.core.helpers import ROOT

DATA = ROOT / "data"

# catalog-facts.md A.1 (dense bf16 with fp32 accumulate; bandwidth; board power; launch price) and
# nvidia-smi totals (RTX 4090: 24,564 MiB; H200: 143,771 MiB).
RTX_4090 = GpuSpec(
    slug="rtx-4090",
    name="NVIDIA GeForce RTX 4090",
    vram_bytes=24_564 * MIB,
    bandwidth_bytes_per_s=1008e9,
    bf16_tflops=165.2,
    fp16_tflops=330.3,
    bf16_supported=True,
    board_power_w=450,
    launch_price_usd=1599,
    consumer=True,
    architecture="Ada AD102",
    compute_capability="8.9",
    measured_bf16_tflops=160.0,
    interconnect="pcie",
)
RTX_3060 = GpuSpec(
    slug="rtx-3060",
    name="NVIDIA GeForce RTX 3060 12GB",
    vram_bytes=12_288 * MIB,
    bandwidth_bytes_per_s=360e9,
    bf16_tflops=25.5,
    fp16_tflops=51.0,
    bf16_supported=True,
    board_power_w=170,
    launch_price_usd=329,
    consumer=True,
    architecture="Ampere GA106",
    compute_capability="8.6",
    interconnect="pcie",
)
RTX_4070 = GpuSpec(
    slug="rtx-4070",
    name="NVIDIA GeForce RTX 4070",
    vram_bytes=12_288 * MIB,
    bandwidth_bytes_per_s=504e9,
    bf16_tflops=58.3,
    fp16_tflops=116.6,
    bf16_supported=True,
    board_power_w=200,
    launch_price_usd=599,
    consumer=True,
    architecture="Ada AD104",
    compute_capability="8.9",
    interconnect="pcie",
)
A100_80GB = GpuSpec(
    slug="a100-80gb",
    name="NVIDIA A100 80GB SXM4",
    vram_bytes=81_920 * MIB,
    bandwidth_bytes_per_s=2039e9,
    bf16_tflops=312.0,
    fp16_tflops=312.0,
    bf16_supported=True,
    board_power_w=400,
    launch_price_usd=None,
    consumer=False,
    architecture="Ampere GA100",
    compute_capability="8.0",
    measured_bf16_tflops=264.5,
    interconnect="nvlink",
)
H100_SXM = GpuSpec(
    slug="h100-sxm",
    name="NVIDIA H100 SXM 80GB",
    vram_bytes=81_559 * MIB,
    bandwidth_bytes_per_s=3350e9,
    bf16_tflops=989.4,
    fp16_tflops=989.4,
    bf16_supported=True,
    board_power_w=700,
    launch_price_usd=None,
    consumer=False,
    architecture="Hopper GH100",
    compute_capability="9.0",
    measured_bf16_tflops=784.0,
    interconnect="nvlink",
)
H200 = GpuSpec(
    slug="h200",
    name="NVIDIA H200",
    vram_bytes=143_771 * MIB,
    bandwidth_bytes_per_s=4800e9,
    bf16_tflops=989.0,
    fp16_tflops=989.0,
    bf16_supported=True,
    board_power_w=700,
    launch_price_usd=None,
    consumer=False,
    architecture="Hopper GH100",
    compute_capability="9.0",
    measured_bf16_tflops=790.0,
    interconnect="nvlink",
)
T4 = GpuSpec(
    slug="t4",
    name="NVIDIA T4",
    vram_bytes=15_360 * MIB,
    bandwidth_bytes_per_s=320e9,
    bf16_tflops=0.0,
    fp16_tflops=65.0,
    bf16_supported=False,
    board_power_w=70,
    launch_price_usd=None,
    consumer=False,
    architecture="Turing TU104",
    compute_capability="7.5",
    interconnect="pcie",
)
HAND_BUILT = (RTX_3060, RTX_4070, RTX_4090, A100_80GB, H100_SXM, H200)


def _f(text: str) -> float | None:
    return float(text) if text.strip() else None


@cache
def seed_gpus() -> tuple[GpuSpec, ...]:
    """data/gpus.csv as GpuSpec values."""
    out = []
    with (DATA / "gpus.csv").open() as fh:
        for r in csv.DictReader(fh):
            out.append(
                GpuSpec(
                    slug=r["slug"],
                    name=r["name"],
                    vram_bytes=int(r["vram_total_mib"]) * MIB,
                    bandwidth_bytes_per_s=float(r["bandwidth_gbps"]) * 1e9,
                    bf16_tflops=_f(r["bf16_tflops"]) or 0.0,
                    fp16_tflops=_f(r["fp16_tflops"]) or 0.0,
                    bf16_supported=r["bf16_supported"] == "true",
                    board_power_w=float(r["board_power_w"]),
                    launch_price_usd=_f(r["launch_price_usd"]),
                    consumer=r["consumer"] == "true",
                    architecture=r["architecture"],
                    compute_capability=r["compute_capability"],
                    measured_bf16_tflops=_f(r["measured_bf16_tflops"]),
                    platform=r["platform"],
                    interconnect=r["interconnect"],
                )
            )
    return tuple(out)


@cache
def seed_prices() -> tuple[PriceQuote, ...]:
    """data/prices.csv as PriceQuote values."""
    with (DATA / "prices.csv").open() as fh:
        return tuple(
            PriceQuote(
                gpu_slug=r["gpu_slug"],
                provider=r["provider"],
                kind=r["kind"],
                usd_per_hour=float(r["usd_per_gpu_hour"]),
                observed_on=dt.date.fromisoformat(r["observed_on"]),
                source=r["source"],
            )
            for r in csv.DictReader(fh)
        )


@cache
def seed_tiers() -> tuple[BudgetTier, ...]:
    """data/budget_tiers.yaml as BudgetTier values."""
    raw = yaml.safe_load((DATA / "budget_tiers.yaml").read_text())
    return tuple(
        BudgetTier(
            slug=t["slug"],
            name=t["name"],
            usd_min=float(t["usd_min"]),
            usd_max=float(t["usd_max"]) if t.get("usd_max") is not None else None,
            example_builds=tuple(t.get("example_builds", ())),
            good_for=str(t.get("good_for", "")),
            gpu_slugs=tuple(t.get("gpu_slugs", ())),
            kind=str(t.get("kind", "buy")),
        )
        for t in raw["tiers"]
    )


def seed_gpu(slug: str) -> GpuSpec:
    """One GPU of the seed catalog."""
    return next(g for g in seed_gpus() if g.slug == slug)
