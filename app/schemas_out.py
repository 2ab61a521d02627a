"""Response models of POST/GET /api/estimate: the contract of design.md, for the OpenAPI docs and tests.

The body itself is the core's EstimateResult as JSON (services.to_jsonable); these models name what a
client may rely on. Every model allows extra members: the API is extended, never broken.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_OPEN = ConfigDict(extra="allow")


class Out(BaseModel):
    """Base of the response models: extra members allowed."""

    model_config = _OPEN


class MemoryOut(Out):
    """Peak per-GPU memory as nvidia-smi shows it (GiB = 2^30 bytes) and the fit on the GPU."""

    peak_gib: float
    peak_bytes: int
    breakdown_gib: dict[str, float] = Field(description="Named terms that add up to peak_gib.")
    gpu: str | None
    vram_gib: float | None
    fits: bool | None = Field(description="Null when no GPU was named and none was recommended.")
    headroom_gib: float | None


class ParamsOut(Out):
    """Parameter counts."""

    total: int
    trainable: int


class ThroughputOut(Out):
    """Training tokens/s of the whole setup (all GPUs)."""

    tokens_per_s: float
    gpu: str
    num_gpus: int


class TimeOut(Out):
    """Optimizer steps and hours of the job (needs dataset_samples)."""

    steps: int
    hours: float | None


class CostOptionOut(Out):
    """The job at one dated catalog price."""

    provider: str
    kind: str
    usd_per_hour: float
    usd_total: float | None
    observed_on: str
    source: str


class CostOut(Out):
    """Every catalog price of the GPU, and owning the card instead."""

    options: list[CostOptionOut]
    ownership: dict[str, object] | None


class RankingRowOut(Out):
    """One catalog GPU setup for the request."""

    gpu: str
    num_gpus: int
    fits: bool
    peak_gib: float
    headroom_gib: float
    max_batch_size: int
    tokens_per_s: float | None
    hours: float | None
    usd: float | None


class RecommendationOut(Out):
    """What tunefit advises, and why."""

    method: str
    gpu: str | None
    num_gpus: int
    where: str = Field(description="local | cloud_spot | cloud_on_demand")
    budget_tier: str | None
    reasons: list[str]


class WarningOut(Out):
    """A warning with a stable code."""

    code: str
    message: str


class MetaOut(Out):
    """tunefit's version and when the catalog last changed."""

    version: str
    catalog_updated: str | None


class EstimateResponse(Out):
    """The answer to one estimate request."""

    model: str | None = Field(description="The catalog slug, or null for a pasted model_config.")
    memory: MemoryOut
    params: ParamsOut
    throughput: ThroughputOut | None
    time: TimeOut | None
    cost: CostOut | None
    ranking: list[RankingRowOut]
    recommendation: RecommendationOut
    warnings: list[WarningOut]
    assumptions: list[str]
    meta: MetaOut
