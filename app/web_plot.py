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
    rank = {name: i for i, name in enumerate(TERM_ORDER)}
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
    """A square measured (x) vs predicted (y) plot with the y = x line and a ±10 % band."""

    size: float
    pad: float
    points: list[Point]
    ticks: list[tuple[float, str]]
    band: str  # SVG polygon points of the ±10 % band
    ideal: tuple[float, float, float, float]


def scatter(rows: Sequence[Mapping[str, Any]], size: float = 420, pad: float = 48) -> Scatter:
    """Geometry of measured vs predicted peak GiB for the accuracy page."""
    top = max([1.0, *(max(float(r["measured_gib"]), float(r["predicted_gib"])) for r in rows)]) * 1.05
    step = nice_step(top)
    top = math.ceil(top / step) * step
    inner = size - 2 * pad

    def sx(v: float) -> float:
        return pad + v / top * inner

    def sy(v: float) -> float:
        return size - pad - v / top * inner

    points = [
        Point(sx(float(r["measured_gib"])), sy(float(r["predicted_gib"])), str(r.get("method", "")),
              f"{r.get('model')} {r.get('method')} {r.get('settings', '')}: "
              f"measured {r['measured_gib']:.2f}, predicted {r['predicted_gib']:.2f} GiB")
        for r in rows
    ]
    ticks = [(i * step, f"{i * step:g}") for i in range(round(top / step) + 1)]
    corners = ((0, 0), (top / 1.1, top), (top, top), (top, top * 0.9))
    band = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in corners)
    return Scatter(size, pad, points, [(sx(v), t) for v, t in ticks], band, (sx(0), sy(0), sx(top), sy(top)))
