"""Pydantic request/response models of the JSON API (field names are the contract in design.md)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.core.setup import Attention, Method, Optimizer, Parallelism, Precision, TrainingSetup

# Bounds: outside them a value is a typo (422); inside them but absurd (a 10^12-token sequence) the
# estimate answers 200 with `fits` false and a warning.  10^15 keeps every integer exact in
# JavaScript (2^53 ≈ 9.007e15), so browsers and JSON tools round-trip what they send.
MAX_SEQ_LEN = 10**15
MAX_BATCH_SIZE = 1_000_000
MAX_NUM_GPUS = 65_536
MAX_LORA_RANK = 65_536
MAX_COUNT = 10**12  # dataset samples
MAX_EPOCHS = 100_000
MAX_GRAD_ACCUM = 1_000_000
MAX_BUDGET_USD = 1e12
MAX_LORA_TARGETS = 64
SLUG_MAX = 200
DEFAULT_LORA_TARGETS = TrainingSetup.lora_targets
_MODULE_NAME = r"^[A-Za-z0-9_.\-]{1,100}$"

Slug = Annotated[str, Field(min_length=1, max_length=SLUG_MAX)]
ModuleName = Annotated[str, Field(pattern=_MODULE_NAME)]


def _blank_to_none(cls: Any, value: Any) -> Any:
    """An empty form or query field means 'not given'."""
    if isinstance(value, str):
        return value.strip() or None
    return value


_FORBID_EXTRA = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class EstimateFields(BaseModel):
    """The estimate fields shared by the JSON body and the query string (all but two)."""

    model_config = _FORBID_EXTRA

    model: Slug | None = Field(
        None,
        description="Catalog slug (`llama-3.1-8b`) or Hugging Face id (`meta-llama/Llama-3.1-8B`); "
        "give this or `model_config`.",
        examples=["llama-3.1-8b"],
    )
    method: Method | None = Field(None, description="full | lora | qlora; omitted: tunefit recommends one.")
    precision: Precision = TrainingSetup.precision
    optimizer: Optimizer = TrainingSetup.optimizer
    batch_size: int = Field(
        TrainingSetup.batch_size, ge=1, le=MAX_BATCH_SIZE, description="Micro-batch per GPU."
    )
    seq_len: int = Field(TrainingSetup.seq_len, ge=1, le=MAX_SEQ_LEN, description="Tokens per sequence.")
    gradient_checkpointing: bool = TrainingSetup.gradient_checkpointing
    attention: Attention = TrainingSetup.attention
    lora_rank: int = Field(TrainingSetup.lora_rank, ge=1, le=MAX_LORA_RANK)
    lora_alpha: int | None = Field(None, ge=1, le=1 << 30, description="Default: 2 × lora_rank.")
    double_quant: bool = Field(
        TrainingSetup.double_quant, description="QLoRA: quantize the quantization constants too."
    )
    gpu: Slug | None = Field(None, description="Catalog GPU slug; omitted: rank the catalog.")
    num_gpus: int = Field(TrainingSetup.num_gpus, ge=1, le=MAX_NUM_GPUS)
    parallelism: Parallelism = TrainingSetup.parallelism
    dataset_samples: int | None = Field(None, ge=1, le=MAX_COUNT)
    epochs: int = Field(1, ge=1, le=MAX_EPOCHS)
    grad_accum: int = Field(1, ge=1, le=MAX_GRAD_ACCUM)
    tokens_per_sample: int | None = Field(None, ge=1, le=MAX_SEQ_LEN, description="Default: seq_len.")
    owned_gpu: Slug | None = Field(None, description="A catalog GPU slug the user already owns.")
    budget_usd: float | None = Field(None, ge=0, le=MAX_BUDGET_USD)
    electricity_usd_per_kwh: float = Field(0.15, ge=0, le=100)
    ranking: bool = Field(False, description="Also rank the catalog when a `gpu` is given.")

    _blank_is_none = field_validator("model", "gpu", "owned_gpu", mode="before")(_blank_to_none)


class EstimateRequest(EstimateFields):
    """One estimate: what to train, how, on what, and for how much data (the JSON body)."""

    # `model_config` is pydantic's own attribute name, so the field lives under another name.
    hf_config: dict[str, Any] | None = Field(
        None, alias="model_config", description="A Hugging Face config.json object (any model, offline)."
    )
    lora_targets: list[ModuleName] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        max_length=MAX_LORA_TARGETS,
        description="Module names (`q_proj`, ...) or `all-linear`; a comma-separated string also works.",
    )

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        """Accept `q_proj,v_proj` as well as a JSON list."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def effective_lora_alpha(self) -> int:
        """lora_alpha, defaulting to twice the rank."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    @property
    def effective_tokens_per_sample(self) -> int:
        """tokens_per_sample, defaulting to seq_len."""
        return self.tokens_per_sample if self.tokens_per_sample is not None else self.seq_len


class EstimateQuery(EstimateFields):
    """The same fields as query parameters: lists comma-separated, model_config as URL-encoded JSON."""

    @model_validator(mode="before")
    @classmethod
    def _drop_blanks(cls, data: Any) -> Any:
        """`batch_size=` (a form submitted by GET sends every field) means the default."""
        if isinstance(data, Mapping):
            return {k: v for k, v in data.items() if not (isinstance(v, str) and not v.strip())}
        return data

    hf_config: str | None = Field(
        None, alias="model_config", description="A config.json object as URL-encoded JSON."
    )
    lora_targets: str | None = Field(
        None, max_length=8192, description="Comma-separated module names or all-linear."
    )


class QueryFieldError(Exception):
    """Converting query parameters to an EstimateRequest failed; `errors` are pydantic's, loc-prefixed."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("invalid query parameters")
        self.errors = errors


def request_from_query(query: EstimateQuery) -> EstimateRequest:
    """Turn validated query parameters into the same EstimateRequest a JSON body makes."""
    data = query.model_dump(exclude_unset=True)
    raw_config = data.pop("hf_config", None)
    if raw_config is not None:
        data["model_config"] = _parse_config_text(raw_config)
    if data.get("lora_targets") is None:
        data.pop("lora_targets", None)
    try:
        return EstimateRequest.model_validate(data)
    except ValidationError as exc:
        raise QueryFieldError([dict(e) for e in exc.errors()]) from exc


def _parse_config_text(text: str) -> Any:
    """model_config as JSON text; a clear field error when it is not a JSON object."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise QueryFieldError(
            [{"type": "json_invalid", "loc": ("model_config",), "msg": f"not valid JSON: {exc}"[:300]}]
        ) from exc
    if not isinstance(value, dict):
        raise QueryFieldError(
            [{"type": "dict_type", "loc": ("model_config",), "msg": "must be a JSON object (config.json)"}]
        )
    return value


class ErrorItem(BaseModel):
    """One validation problem in FastAPI's shape."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    """422: `detail` lists each field's problem."""

    detail: list[ErrorItem]


class NotFoundBody(BaseModel):
    """404: what was not found and the closest catalog slugs."""

    detail: str
    suggestions: list[str]
