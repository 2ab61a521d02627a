"""Presentation helpers for the web page: form state, permalinks, curl and number formatting.

Nothing here computes a memory, time or cost figure: every number shown comes from the service's
response; this module only picks, scales (for drawing) and formats them.
"""

from __future__ import annotations

import functools
import json
import math
import shlex
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode

from app.schemas import DEFAULT_LORA_TARGETS, EstimateFields

# Form fields in the order a permalink lists them (the API's names; model_config last: it is long).
FIELD_ORDER: tuple[str, ...] = (
    "model", "method", "gpu", "num_gpus", "ranking", "dataset_samples", "epochs",
    "precision", "optimizer", "batch_size", "seq_len", "gradient_checkpointing", "attention",
    "lora_rank", "lora_alpha", "lora_targets", "double_quant", "parallelism", "grad_accum",
    "tokens_per_sample", "owned_gpu", "budget_usd", "electricity_usd_per_kwh", "model_config",
)
BOOL_FIELDS = frozenset({"gradient_checkpointing", "double_quant", "ranking"})
ADVANCED_FIELDS = frozenset({
    "precision", "optimizer", "batch_size", "seq_len", "gradient_checkpointing", "attention", "lora_rank",
    "lora_alpha", "lora_targets", "double_quant", "parallelism", "grad_accum", "tokens_per_sample",
})
BUDGET_FIELDS = frozenset({"owned_gpu", "budget_usd", "electricity_usd_per_kwh"})
# What a first visit shows: the article's RTX 4090 QLoRA run, with data so time and cost appear too.
EXAMPLE: dict[str, str] = {
    "model": "llama-3.1-8b", "method": "qlora", "gpu": "rtx-4090", "batch_size": "4", "seq_len": "512",
    "dataset_samples": "5000", "epochs": "3",
}


METHOD_CHOICES = [("", "Recommend for me"), ("qlora", "QLoRA — 4-bit base + adapters"),
                  ("lora", "LoRA — 16-bit base + adapters"), ("full", "Full fine-tune")]
PRECISION_CHOICES = [("bf16", "bf16"), ("amp_bf16", "AMP bf16"), ("fp16", "fp16"), ("amp_fp16", "AMP fp16"),
                     ("fp32", "fp32")]
OPTIMIZER_CHOICES = [("adamw", "AdamW"), ("adamw_8bit", "AdamW 8-bit"),
                     ("paged_adamw_8bit", "Paged AdamW 8-bit"), ("adafactor", "Adafactor"), ("sgd", "SGD")]
ATTENTION_CHOICES = [("sdpa", "SDPA"), ("flash_attention_2", "FlashAttention-2"), ("eager", "Eager")]
PARALLELISM_CHOICES = [("ddp", "DDP"), ("fsdp", "FSDP"), ("zero2", "ZeRO-2"), ("zero3", "ZeRO-3")]
CHOICES = {
    "method": METHOD_CHOICES, "precision": PRECISION_CHOICES, "optimizer": OPTIMIZER_CHOICES,
    "attention": ATTENTION_CHOICES, "parallelism": PARALLELISM_CHOICES,
}


METHOD_NAMES = {"full": "Full fine-tune", "lora": "LoRA", "qlora": "QLoRA"}
# Short names for the collapsed "Advanced settings" line, so non-default values stay visible.
_SHORT = {
    "precision": "", "optimizer": "", "batch_size": "batch ", "seq_len": "seq ", "attention": "",
    "grad_accum": "accum ", "tokens_per_sample": "tokens/sample ", "lora_rank": "r", "lora_alpha": "alpha ",
    "lora_targets": "", "gradient_checkpointing": "checkpointing ", "double_quant": "double quant ",
}


def advanced_summary(fields: Mapping[str, str]) -> str:
    """The non-default advanced settings in a few words (`batch 4, seq 512`)."""
    return ", ".join(f"{_SHORT[k]}{fields[k]}" for k in FIELD_ORDER if k in fields and k in _SHORT)


def gpu_groups(gpus: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Catalog GPUs split into consumer/workstation and data-centre cards, each by VRAM."""
    groups: dict[str, list[dict[str, Any]]] = {"Consumer and workstation": [], "Data centre": []}
    for g in sorted(gpus, key=lambda g: (float(g["vram_gib"]), g["name"])):
        groups["Consumer and workstation" if g.get("consumer") else "Data centre"].append(g)
    return [(k, v) for k, v in groups.items() if v]


def gpu_options(gpus: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The GPU select's option groups: (slug, "name · 24 GB") by group."""
    return [(group, [(g["slug"], f"{g['name']} · {g['vram_gb']:g} GB") for g in rows])
            for group, rows in gpu_groups(gpus)]


def _text(value: Any) -> str:
    """A default or submitted value as the text a form control holds."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else str(value)
    return str(value)


@functools.cache
def _api_defaults() -> Mapping[str, str]:
    # The schema never changes in a process: read it once, not twice per page request.
    out = {name: _text(info.get_default(call_default_factory=True))
           for name, info in EstimateFields.model_fields.items()}
    out["lora_targets"] = ",".join(DEFAULT_LORA_TARGETS)
    out["model_config"] = ""
    return MappingProxyType(out)


def api_defaults() -> dict[str, str]:
    """The API's default for every form field, as form text (the schema is the one source)."""
    return dict(_api_defaults())


def normalise(values: Mapping[str, str]) -> dict[str, str]:
    """Submitted fields, trimmed; unknown names dropped; a blank field means 'not given'."""
    out: dict[str, str] = {}
    for name in FIELD_ORDER:
        raw = values.get(name)
        if raw is None:
            continue
        text = raw.strip()
        if name == "lora_targets":
            text = ",".join(part.strip() for part in text.split(",") if part.strip())
        if text:
            out[name] = text
    if "model_config" in out:
        # The page has both controls; a pasted config.json is the more deliberate act, so it wins
        # (the API itself refuses both at once).
        out.pop("model", None)
    return out


def request_fields(values: Mapping[str, str]) -> dict[str, str]:
    """The fields that differ from the API's defaults: what a permalink or an API call must carry."""
    defaults = _api_defaults()
    return {k: v for k, v in normalise(values).items() if defaults.get(k) != v}


def form_state(submitted: Mapping[str, str]) -> dict[str, str]:
    """What each form control shows: the submitted text, else the API's default."""
    state = api_defaults()
    state.update(normalise(submitted))
    return state


def permalink(path: str, fields: Mapping[str, str]) -> str:
    """The GET URL of this estimate (page or API), with only the non-default fields."""
    ordered = [(k, fields[k]) for k in FIELD_ORDER if k in fields]
    return f"{path}?{urlencode(ordered)}" if ordered else path


def _json_value(name: str, text: str) -> Any:
    """A form field's text as the JSON value the API takes (numbers, booleans, lists, objects)."""
    if name in BOOL_FIELDS:
        return text.lower() in ("true", "1", "on", "yes")
    if name == "lora_targets":
        return [part for part in text.split(",") if part]
    if name == "model_config":
        try:
            return json.loads(text)
        except ValueError:
            return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def curl_command(base_url: str, fields: Mapping[str, str]) -> str:
    """The equivalent API call: POST /api/estimate with the same fields as a JSON body."""
    body = {k: _json_value(k, fields[k]) for k in FIELD_ORDER if k in fields}
    payload = json.dumps(body, separators=(", ", ": "))
    return (f"curl -s -X POST {shlex.quote(base_url.rstrip('/') + '/api/estimate')} "
            f"-H 'Content-Type: application/json' -d {shlex.quote(payload)}")


# ---------------------------------------------------------------- formatting (Jinja filters)

def fmt_gib(value: Any, digits: int = 2) -> str:
    """GiB with fixed decimals (the API's own rounding shows through unchanged)."""
    if value is None:
        return "–"
    return f"{float(value):,.{digits}f}"


def fmt_int(value: Any) -> str:
    """An integer with thousands separators."""
    if value is None:
        return "–"
    return f"{round(float(value)):,}"


def fmt_params(value: Any) -> str:
    """A parameter count, compactly: 8.03 B, 13.6 M."""
    if value is None:
        return "–"
    n = float(value)
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        # 999.9 M reads as 1 B, not "1e+03 M".
        if abs(n) >= size * 0.9995:
            return f"{n / size:.3g} {unit}"
    return f"{n:,.0f}"


def fmt_usd(value: Any) -> str:
    """Dollars: cents under $100, whole dollars above."""
    if value is None:
        return "–"
    v = float(value)
    return f"${v:,.2f}" if abs(v) < 100 else f"${v:,.0f}"


def fmt_hours(value: Any) -> str:
    """Hours, with minutes or days where they read better."""
    if value is None:
        return "–"
    h = float(value)
    if h < 1:
        return f"{h * 60:.0f} min"
    if h >= 48:
        return f"{h:,.1f} h ({h / 24:,.1f} days)"
    return f"{h:,.2f} h"


def fmt_rate(value: Any) -> str:
    """A rate such as tokens/s with three significant figures."""
    if value is None:
        return "–"
    v = float(value)
    return f"{v:,.0f}" if v >= 100 else f"{v:,.3g}"


def label(name: str) -> str:
    """A breakdown key or enum value as words: `optimizer_states` → `optimizer states`."""
    return name.replace("_", " ")


def method_name(value: Any) -> str:
    """A method's display name: QLoRA, LoRA, Full fine-tune."""
    return METHOD_NAMES.get(str(value), str(value or ""))


FILTERS = {
    "method": method_name, "gib": fmt_gib, "int": fmt_int, "params": fmt_params, "usd": fmt_usd,
    "hours": fmt_hours,
    "rate": fmt_rate, "label": label,
}
