"""GPU, price and budget-tier values the core receives from the catalog (plain, frozen, explicit units)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class GpuSpec:
    """One catalog GPU: memory as nvidia-smi reports its total, rates as the vendor's dense peaks."""

    slug: str
    name: str
    vram_bytes: int
    bandwidth_bytes_per_s: float
    # Dense (no 2:4 sparsity) tensor rate with fp32 accumulate: the training-relevant number
    # (GeForce cards run it at half the fp16-accumulate rate; catalog-facts.md A.0).
    bf16_tflops: float
    fp16_tflops: float
    bf16_supported: bool
    board_power_w: float
    launch_price_usd: float | None
    consumer: bool
    architecture: str
    compute_capability: str
    # Square-matmul bf16 peak measured with torch.matmul (zzc0721/torch-performance-test-data),
    # when known; spec sheets overstate what datacenter cards reach (H200: 790 of 989).
    measured_bf16_tflops: float | None = None
    platform: str = "cuda"  # "cuda" | "rocm" | "metal": which training stack runs on it
    # The catalog's word for the link between cards: "nvlink" | "nvlink_bridge" | "pcie" |
    # "infinity_fabric" | "unified"; empty: inferred from the name and architecture.
    interconnect: str = ""

    @property
    def tensor_tflops(self) -> float:
        """The 16-bit tensor rate training runs at: bf16 when supported, else fp16 (autocast)."""
        return self.bf16_tflops if self.bf16_supported and self.bf16_tflops > 0 else self.fp16_tflops

    @property
    def is_pcie(self) -> bool:
        """Whether this is a PCIe board (no NVLink/SXM fabric between cards)."""
        if self.interconnect:
            return self.interconnect not in ("nvlink", "infinity_fabric")
        text = f"{self.slug} {self.name}".lower()
        return "pcie" in text or self.consumer or not _has_sxm_fabric(text)


def _has_sxm_fabric(text: str) -> bool:
    """Whether a datacenter card sits on an NVLink/Infinity-Fabric baseboard (SXM/OAM)."""
    if "nvl" in text:  # H100 NVL / H200 NVL: PCIe cards with a 2- or 4-way NVLink bridge
        return True
    return any(key in text for key in ("sxm", "h200", "b200", "b100", "gb200", "mi300", "mi325", "a100"))


@dataclass(frozen=True)
class Interconnect:
    """How gradients/parameters travel between the GPUs of one host (per-direction bus bandwidth)."""

    name: str
    bus_bytes_per_s: float


# NCCL all-reduce "bus bandwidth" reached in practice, per direction, below the link's nominal rate:
# NVLink3 (A100 SXM) 600 GB/s bidirectional = 300 GB/s per direction; NVLink4 (H100/H200 SXM)
# 900 GB/s = 450 per direction; NVLink5 (B200) 1.8 TB/s = 900; MI300X Infinity Fabric 7x64 GB/s = 448.
# V100 NVLink2 300 GB/s = 150 per direction. PCIe 4.0 x16 is 32 GB/s per direction, PCIe 5.0 64 GB/s.
# We take 80% of nominal, the efficiency
# nccl-tests typically report on healthy systems. GeForce RTX 40/50 cards have no peer-to-peer over
# PCIe, so NCCL stages through host memory: we take half the PCIe rate for them.
_NCCL_EFFICIENCY = 0.8


def interconnect_of(gpu: GpuSpec, num_gpus: int = 2) -> Interconnect:
    """The interconnect assumed between `num_gpus` cards of this kind in one host (per GPU class)."""
    text = f"{gpu.slug} {gpu.name}".lower()
    arch = gpu.architecture.lower()
    if gpu.interconnect == "unified":
        return Interconnect("none (one unified-memory device)", 0.0)
    if gpu.interconnect == "nvlink_bridge" and num_gpus == 2:
        # RTX 3090 / A6000 NVLink bridge: 4 links x 14.06 GB/s = 56.25 GB/s per direction (112.5 total).
        return Interconnect("NVLink bridge (56 GB/s per direction, 2 cards)", 56.25e9 * _NCCL_EFFICIENCY)
    if not gpu.is_pcie:
        if gpu.interconnect == "infinity_fabric" or "mi3" in text:
            return Interconnect("Infinity Fabric (448 GB/s per direction)", 448e9 * _NCCL_EFFICIENCY)
        if "blackwell" in arch or "b200" in text or "b100" in text:
            return Interconnect("NVLink 5 (900 GB/s per direction)", 900e9 * _NCCL_EFFICIENCY)
        if "hopper" in arch or "h100" in text or "h200" in text:
            return Interconnect("NVLink 4 (450 GB/s per direction)", 450e9 * _NCCL_EFFICIENCY)
        if "volta" in arch or "v100" in text:
            return Interconnect("NVLink 2 (150 GB/s per direction)", 150e9 * _NCCL_EFFICIENCY)
        return Interconnect("NVLink 3 (300 GB/s per direction)", 300e9 * _NCCL_EFFICIENCY)
    gen5 = "hopper" in arch or "blackwell" in arch or gpu.compute_capability.startswith(("9", "10", "12"))
    lane = 64e9 if gen5 else 32e9
    if gpu.consumer and gpu.compute_capability.startswith(("8.9", "12")):
        return Interconnect(
            f"PCIe {'5.0' if gen5 else '4.0'} x16 without peer-to-peer (staged through host memory)",
            lane * _NCCL_EFFICIENCY / 2,
        )
    return Interconnect(
        f"PCIe {'5.0' if gen5 else '4.0'} x16 ({lane / 1e9:.0f} GB/s per direction)", lane * _NCCL_EFFICIENCY
    )


@dataclass(frozen=True)
class PriceQuote:
    """One observed price for renting one GPU for one hour, with its date and source."""

    gpu_slug: str
    provider: str
    kind: str  # "spot" | "on_demand" | "community" | "serverless" | "reserved" (catalog's word)
    usd_per_hour: float
    observed_on: dt.date
    source: str

    @property
    def is_spot(self) -> bool:
        """Whether the price can be interrupted (the catalog's `spot` and `interruptible` kinds)."""
        return self.kind in ("spot", "interruptible")


@dataclass(frozen=True)
class BudgetTier:
    """A hardware budget band and the GPUs it buys (slugs from the catalog)."""

    slug: str
    name: str
    usd_min: float
    usd_max: float | None
    example_builds: tuple[str, ...]
    good_for: str
    gpu_slugs: tuple[str, ...]
    kind: str = "buy"  # "buy": hardware you own; "rent": the article's "use cloud spot" advice

    def contains(self, usd: float) -> bool:
        """Whether a budget in USD falls inside this tier."""
        return usd >= self.usd_min and (self.usd_max is None or usd <= self.usd_max)


def tier_for_budget(tiers: Iterable[BudgetTier], usd: float) -> BudgetTier | None:
    """The richest hardware (buy) tier a budget reaches (None when it is below every tier)."""
    reachable = [t for t in tiers if t.kind == "buy" and t.usd_min <= usd]
    return max(reachable, key=lambda t: t.usd_min) if reachable else None


def gpus_for_budget(tiers: Iterable[BudgetTier], usd: float) -> tuple[str, ...]:
    """Every GPU slug that the tiers a budget reaches can buy, cheapest tier first, no duplicates."""
    slugs: list[str] = []
    for tier in sorted((t for t in tiers if t.kind == "buy" and t.usd_min <= usd), key=lambda t: t.usd_min):
        slugs.extend(s for s in tier.gpu_slugs if s not in slugs)
    return tuple(slugs)
