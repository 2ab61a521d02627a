"""SVG geometry for the web pages: the memory bar and the measured-vs-predicted scatter plot.

Coordinates only: the values drawn come from the service responses unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Segment:
    """One breakdown term drawn as a rectangle (x and width in percent of the plot)."""

    name: str
    gib: float
    x: float
    width: float
    css: str


@dataclass(frozen=True)
class Line:
    """A card's VRAM drawn as a vertical line at `x` percent, labelled on the side with room."""

    text: str
    gib: float
    x: float
    anchor: str
    over: bool


@dataclass(frozen=True)
class Bar:
    """Everything the bar's SVG needs: segments (largest first), VRAM lines, ticks, peak marker."""

    segments: list[Segment]
    lines: list[Line]
    ticks: list[tuple[float, str]]
    peak_gib: float
    peak_x: float
    peak_anchor: str


def nice_step(span: float, count: int = 5) -> float:
    """A round tick spacing giving about `count` ticks over `span`."""
    if span <= 0:
        return 1.0
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        if raw <= mult * mag:
            return mult * mag
    return 10 * mag


def _anchor(x: float) -> str:
    # Labels right of the middle grow leftwards so they never run off the plot.
    return "end" if x > 55 else "start"


# Each known breakdown term keeps its colour and place as fields change, so a reader sees what grew.
TERM_ORDER = (
    "weights", "adapters", "gradients", "optimizer_states", "optimizer_states_paged",
    "optimizer_step_temporaries", "activations", "logits_and_loss", "gathered_params", "ddp_buckets",
    "allocator_fragmentation", "cuda_context", "cuda_kernels_and_handles", "library_workspaces",
)
PALETTE_SIZE = 14
# Where the terms without a fixed colour sit in the bar: next to their kin (ZeRO's fp32 master copy by the
# weights, its buckets by DDP's), not after everything else.
PLACE = (
    "weights", "master_weights", "adapters", "gradients", "optimizer_states", "optimizer_states_paged",
    "optimizer_step_temporaries", "activations", "logits_and_loss", "qlora_dequant_workspace",
    "autocast_weight_copies", "gathered_params", "ddp_buckets", "zero_buckets", "zero_cached_segments",
    "nccl_buffers",
    "moe_load_cache", "cached_full_model_load", "allocator_fragmentation", "cuda_context",
    "cuda_kernels_and_handles", "library_workspaces",
)


def _colours(names: list[str]) -> dict[str, str]:
    """A CSS class per term: fixed for known terms, the free ones in turn for any others."""
    fixed = {name: i for i, name in enumerate(TERM_ORDER)}
    free = [i for i in range(PALETTE_SIZE) if i not in {fixed[n] for n in names if n in fixed}]
    out: dict[str, str] = {}
    for name in names:
        index = fixed[name] if name in fixed else (free.pop(0) if free else len(out) % PALETTE_SIZE)
        out[name] = f"seg-{index}"
    return out


def memory_bar(breakdown_gib: Mapping[str, Any], peak_gib: float, cards: Iterable[tuple[str, float]]) -> Bar:
    """Lay out the breakdown as a stacked bar against each card's VRAM line (percent geometry)."""
    cards = list(cards)
    top = max([peak_gib, *(g for _, g in cards)]) * 1.06 or 1.0
    scale = 100.0 / top
    rank = {name: i for i, name in enumerate(PLACE)}
    terms = sorted(((k, float(v)) for k, v in breakdown_gib.items() if v and float(v) > 0),
                   key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
    colours = _colours([k for k, _ in terms])
    segments: list[Segment] = []
    x = 0.0
    for name, gib in terms:
        segments.append(Segment(name, gib, x, gib * scale, colours[name]))
        x += gib * scale
    lines = [Line(text, gib, gib * scale, _anchor(gib * scale), peak_gib > gib) for text, gib in cards]
    step = nice_step(top)
    ticks = [(i * step * scale, f"{i * step:g}") for i in range(int(top / step) + 1)]
    peak_x = peak_gib * scale
    return Bar(segments, lines, ticks, peak_gib, peak_x, _anchor(peak_x))


@dataclass(frozen=True)
class Point:
    """One calibration run in the scatter plot (SVG user units)."""

    cx: float
    cy: float
    css: str
    title: str


@dataclass(frozen=True)
class Scatter:
    """A square log-log plot of measured (x) vs predicted (y), with y = x and a ±10 % band."""

    size: float
    left: float  # x of the y axis
    bottom: float  # y of the x axis
    top: float  # y of the plot's top edge (= x of its right edge, mirrored)
    right: float
    points: list[Point]
    ticks: list[tuple[float, float, str]]  # x position, y position, label
    band: str  # SVG polygon points of the ±10 % band
    ideal: tuple[float, float, float, float]


# Log axes: a 10 % error is the same distance from the diagonal for a 2 GiB run and a 140 GiB one.
_TICK_STEPS = (1, 2, 5)


def _log_ticks(low: float, high: float) -> list[float]:
    out: list[float] = []
    decade = 10.0 ** math.floor(math.log10(low))
    while decade <= high:
        out.extend(decade * m for m in _TICK_STEPS if low <= decade * m <= high)
        decade *= 10
    return out


def scatter(rows: Sequence[Mapping[str, Any]], size: float = 420) -> Scatter:
    """Geometry of measured vs predicted peak GiB for the accuracy page (log-log)."""
    left, right, bottom = 56.0, size - 12.0, size - 44.0
    top = bottom - (right - left)  # a square plot area: the diagonal is at 45 degrees
    values = [float(r[k]) for r in rows for k in ("measured_gib", "predicted_gib") if float(r[k]) > 0]
    low = min(values, default=1.0) / 1.25
    high = max(values, default=10.0) * 1.25
    span = math.log10(high) - math.log10(low)

    def frac(v: float) -> float:
        return (math.log10(max(v, low)) - math.log10(low)) / span

    def sx(v: float) -> float:
        return left + frac(v) * (right - left)

    def sy(v: float) -> float:
        return bottom - frac(v) * (bottom - top)

    points = [
        Point(sx(float(r["measured_gib"])), sy(float(r["predicted_gib"])), str(r.get("method", "")),
              f"{r.get('run_id')} {r.get('model')} {r.get('method')} {r.get('settings', '')}: "
              f"measured {r['measured_gib']:.2f}, predicted {r['predicted_gib']:.2f} GiB")
        for r in rows
    ]
    ticks = [(sx(v), sy(v), f"{v:g}") for v in _log_ticks(low, high)]
    upper = [(v, v * 1.1) for v in (low, high / 1.1)]
    lower = [(v, v * 0.9) for v in (high, low / 0.9)]
    band = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in [*upper, *lower])
    ideal = (sx(low), sy(low), sx(high), sy(high))
    return Scatter(size, left, bottom, top, right, points, ticks, band, ideal)
