"""Parse and validate catalog rows (CSV text, YAML, JSON payloads) into plain dicts; no database here."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.models import PRICE_KINDS, TIER_KINDS

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
INTERCONNECTS = ("nvlink", "nvlink_bridge", "pcie", "infinity_fabric", "unified")
PLATFORMS = ("cuda", "rocm", "metal")


class RowError(ValueError):
    """One field of one row is invalid."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class RowIssue:
    """A rejected row: its line number in the file (1 = header) and why."""

    line: int
    message: str


@dataclass
class ImportReport:
    """What an import did (or, with errors, would have done: a bad file changes nothing)."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[RowIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no row was rejected (and the changes were applied)."""
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        """JSON shape used by the admin API and the CLI."""
        return {
            "ok": self.ok,
            "inserted": self.inserted,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "errors": [{"line": e.line, "message": e.message} for e in self.errors],
        }


def _text(v: Any) -> str:
    return "" if v is None else str(v).strip()


def _req_str(v: Any) -> str:
    s = _text(v)
    if not s:
        raise ValueError("is required")
    return s


def _opt_str(v: Any) -> str:
    return _text(v)


def _slug(v: Any) -> str:
    s = _req_str(v)
    if not SLUG_RE.match(s):
        raise ValueError(f"{s!r} is not a slug (lower-case letters, digits, '.', '-', '_')")
    return s


def _num(v: Any, *, positive: bool = True, optional: bool = False) -> float | None:
    s = _text(v)
    if not s:
        if optional:
            return None
        raise ValueError("is required")
    try:
        x = float(s.replace(",", "")) if isinstance(v, str) else float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{s!r} is not a number") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{s!r} is not a finite number")
    if positive and x <= 0:
        raise ValueError(f"must be > 0, got {s}")
    return x


def _pos(v: Any) -> float:
    x = _num(v)
    assert x is not None
    return x


def _opt_pos(v: Any) -> float | None:
    return _num(v, optional=True)


def _nonneg(v: Any) -> float:
    x = _num(v, positive=False)
    assert x is not None
    if x < 0:
        raise ValueError(f"must be >= 0, got {x}")
    return x


def _opt_nonneg(v: Any) -> float | None:
    return None if _text(v) == "" else _nonneg(v)


def _pos_int(v: Any) -> int:
    x = _pos(v)
    if x != int(x):
        raise ValueError(f"{x} is not a whole number")
    return int(x)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = _text(v).lower()
    if s in ("true", "yes", "1"):
        return True
    if s in ("false", "no", "0"):
        return False
    raise ValueError(f"{s!r} is not true/false")


def _date(v: Any) -> dt.date:
    if isinstance(v, dt.date):
        return v
    s = _req_str(v)
    try:
        return dt.date.fromisoformat(s)
    except ValueError:
        raise ValueError(f"{s!r} is not a date (YYYY-MM-DD)") from None


def _choice(options: Iterable[str]) -> Callable[[Any], str]:
    opts = tuple(options)

    def check(v: Any) -> str:
        s = _req_str(v)
        if s not in opts:
            raise ValueError(f"{s!r} is not one of {', '.join(opts)}")
        return s

    return check


def _source(v: Any) -> str:
    s = _req_str(v)
    if len(s) < 4:
        raise ValueError("must name where the number came from (a URL or a document)")
    return s


Spec = dict[str, Callable[[Any], Any]]

GPU_FIELDS: Spec = {
    "slug": _slug, "name": _req_str, "vendor": _req_str, "architecture": _req_str,
    "compute_capability": _req_str, "platform": _choice(PLATFORMS), "vram_gb": _pos,
    "vram_total_mib": _pos_int, "vram_total_source": _source, "bandwidth_gbps": _pos,
    "bf16_tflops": _opt_pos, "fp16_tflops": _pos, "bf16_supported": _bool,
    "measured_bf16_tflops": _opt_pos, "board_power_w": _pos, "launch_price_usd": _opt_pos,
    "consumer": _bool, "interconnect": _choice(INTERCONNECTS), "source": _source,
}
GPU_OPTIONAL = {"bf16_tflops", "measured_bf16_tflops", "launch_price_usd", "platform"}

PRICE_FIELDS: Spec = {
    "gpu_slug": _slug, "provider": _req_str, "kind": _choice(PRICE_KINDS),
    "usd_per_gpu_hour": _pos, "observed_on": _date, "source": _source, "note": _opt_str,
}
PRICE_OPTIONAL = {"note"}

MODEL_FIELDS: Spec = {
    "slug": _slug, "hf_id": _req_str, "name": _req_str, "license": _req_str, "gated": _bool,
    "params_total_b": _opt_pos, "params_active_b": _opt_pos, "source": _source,
}
MODEL_OPTIONAL = {"params_total_b", "params_active_b"}

TIER_FIELDS: Spec = {
    "slug": _slug, "name": _req_str, "kind": _choice(TIER_KINDS), "usd_min": _nonneg,
    "usd_max": _opt_nonneg, "good_for": _req_str, "notes": _opt_str, "source": _source,
}


def parse_row(row: Mapping[str, Any], spec: Spec, optional: set[str]) -> dict[str, Any]:
    """Validate one row against `spec`; raises RowError naming the first bad field (message: all of them)."""
    out: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for name, conv in spec.items():
        if name not in row or row[name] is None:
            if name in optional:
                out[name] = conv("") if name in ("note", "notes") else None
            else:
                problems.append((name, "is missing"))
            continue
        try:
            out[name] = conv(row[name])
        except ValueError as exc:
            problems.append((name, str(exc)))
    if problems:
        first, message = problems[0]
        rest = "; ".join(f"{f}: {m}" for f, m in problems[1:])
        raise RowError(first, message + (f"; {rest}" if rest else ""))
    if "platform" in spec and out.get("platform") is None:
        out["platform"] = "cuda"  # a GPU row without a platform column is an NVIDIA/CUDA card
    return out


Parsed = tuple[list[tuple[int, dict[str, Any]]], list[RowIssue]]


def parse_csv(text: str, spec: Spec, optional: set[str]) -> Parsed:
    """Parse CSV text: (line, row) for good rows and a RowIssue for each bad one, header checked."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [f for f in spec if f not in header and f not in optional]
    if missing:
        return [], [RowIssue(1, f"header lacks column(s): {', '.join(missing)}")]
    unknown = [h for h in header if h not in spec]
    if unknown:
        return [], [RowIssue(1, f"unknown column(s): {', '.join(unknown)}")]
    good: list[tuple[int, dict[str, Any]]] = []
    bad: list[RowIssue] = []
    for raw in reader:
        line = reader.line_num
        if None in raw:  # more cells than header columns
            bad.append(RowIssue(line, f"{len(header) + len(raw[None])} cells for {len(header)} columns"))
            continue
        if all(_text(v) == "" for v in raw.values()):
            continue
        try:
            good.append((line, parse_row(raw, spec, optional)))
        except RowError as exc:
            bad.append(RowIssue(line, str(exc)))
    if not good and not bad:
        bad.append(RowIssue(1, "no data rows"))
    return good, bad


def model_values(row: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A Model row's values from a validated models.csv row and its config.json."""
    if not isinstance(config, Mapping) or not config.get("model_type"):
        raise RowError("config", "must be a Hugging Face config.json object with a model_type")
    total, active = _params(row, config)
    experts = config.get("num_local_experts") or config.get("num_experts")
    per_token = config.get("num_experts_per_tok")
    return {
        "slug": row["slug"],
        "hf_id": row["hf_id"],
        "name": row["name"],
        "family": str(config["model_type"]),
        "config": dict(config),
        "params_total": total,
        "params_active": active,
        "license": row["license"],
        "gated": row["gated"],
        "moe_experts": int(experts) if experts else None,
        "experts_per_token": int(per_token) if experts and per_token else None,
        "source": row["source"],
    }


def _params(row: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[int, int]:
    """Parameter counts from the core's parser when it reads the config, else the facts table (billions)."""
    try:
        from app.core.architecture import parse_config

        arch = parse_config(config)
        if arch.params_total > 0:
            return arch.params_total, arch.params_active_per_token or arch.params_total
    except ImportError:
        pass
    except ValueError as exc:  # CoreInputError: fall back to the table when it has numbers
        if row.get("params_total_b") is None:
            raise RowError("config", str(exc)) from None
    total_b = row.get("params_total_b")
    if total_b is None:
        raise RowError("params_total_b", "is required when the config cannot be parsed")
    active_b = row.get("params_active_b") or total_b
    return round(total_b * 1e9), round(active_b * 1e9)
