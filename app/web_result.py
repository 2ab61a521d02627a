"""The result panel's view model: picks and words the service response's numbers (computes none)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.web_plot import Bar, memory_bar
from app.web_view import fmt_gib, method_name, permalink

# The ranking table shows this many rows; the rest fold away behind a "show all" summary.
RANKING_ROWS_SHOWN = 12


@dataclass(frozen=True)
class Verdict:
    """The one-line answer: fits / does not fit, peak against the card's VRAM."""

    kind: str  # "fits" | "nofit"
    headline: str
    sub: str
    short: str  # the phone's sticky bar


@dataclass(frozen=True)
class ResultView:
    """Everything the result block shows besides the raw response."""

    verdict: Verdict | None
    bar: Bar | None
    gpu_name: str | None  # the card the memory figures are for
    num_gpus: int
    chosen: bool  # the user named the card (else tunefit picked it)
    method: str
    method_chosen: bool
    ranking_top: list[Mapping[str, Any]]
    ranking_rest: list[Mapping[str, Any]]
    page_url: str
    api_url: str
    curl: str
    pick_url: str | None = None  # this form set to the recommended setup, when that differs
    rank_url: str | None = None  # this form with every GPU ranked, when no ranking is shown


def _cards(n: int, name: str) -> str:
    return f"{n}× {name}" if n > 1 else name


def _verdict(r: Mapping[str, Any], gpu_name: str | None, n: int, chosen: bool) -> Verdict | None:
    mem = r.get("memory") or {}
    peak, vram, head = mem.get("peak_gib"), mem.get("vram_gib"), mem.get("headroom_gib")
    if peak is None:
        return None
    per_gpu = " per GPU" if n > 1 else ""
    fitting = sum(1 for row in r.get("ranking") or [] if row.get("fits"))
    total = len(r.get("ranking") or [])
    ranked = "" if chosen else f" {fitting} of {total} GPU setups fit; see the ranking."
    if mem.get("fits") is None or vram is None or not gpu_name:
        return Verdict("nofit", "Does not fit any catalog GPU setup",
                       f"Peak {fmt_gib(peak)} GiB{per_gpu}: try QLoRA, a shorter sequence or more GPUs.",
                       f"Does not fit · peak {fmt_gib(peak)} GiB")
    cards = _cards(n, gpu_name)
    if mem["fits"]:
        head_text = f"Fits on {cards}" if chosen else f"Fits — best pick: {cards}"
        sub = (f"Peak {fmt_gib(peak)} GiB{per_gpu} of {fmt_gib(vram)} GiB — "
               f"{fmt_gib(head)} GiB to spare.{ranked}")
        return Verdict("fits", head_text, sub, f"Fits · {fmt_gib(peak)} of {fmt_gib(vram)} GiB")
    short = f" ({fmt_gib(-head)} GiB short)" if head is not None and head < 0 else ""
    head_text = f"Does not fit on {cards}" if chosen else f"Does not fit — closest: {cards}"
    sub = f"Peak {fmt_gib(peak)} GiB{per_gpu}, but the card has {fmt_gib(vram)} GiB{short}.{ranked}"
    return Verdict("nofit", head_text, sub, f"Does not fit · {fmt_gib(peak)} of {fmt_gib(vram)} GiB")


def _gpu_name(r: Mapping[str, Any], slug: str | None, names: Mapping[str, str]) -> str | None:
    """The display name of the card the memory figures are for."""
    if not slug:
        return None
    rec = r.get("recommendation") or {}
    if rec.get("gpu") == slug and rec.get("gpu_name"):
        return str(rec["gpu_name"])
    return names.get(slug, slug)


def result_view(r: Mapping[str, Any] | None, fields: Mapping[str, str], names: Mapping[str, str],
                urls: tuple[str, str, str]) -> ResultView:
    """Build the result panel's view of one service response; `urls` = (page, API, curl)."""
    page_url, api_url, curl = urls
    chosen = bool(fields.get("gpu"))
    if r is None:
        return ResultView(None, None, None, 1, chosen, "", False, [], [], page_url, api_url, curl)
    mem = r.get("memory") or {}
    slug = mem.get("gpu")
    n = int(mem.get("num_gpus") or 1)
    gpu_name = _gpu_name(r, slug, names)
    bar = None
    if mem.get("peak_gib") is not None:
        cards = []
        if mem.get("vram_gib") is not None and gpu_name:
            cards.append((f"{gpu_name} · {fmt_gib(mem['vram_gib'])} GiB", float(mem["vram_gib"])))
        bar = memory_bar(mem.get("breakdown_gib") or {}, float(mem["peak_gib"]), cards)
    ranking = list(r.get("ranking") or [])
    rec = r.get("recommendation") or {}
    method = method_name(mem.get("method") or rec.get("method") or "")
    return ResultView(_verdict(r, gpu_name, n, chosen), bar, gpu_name, n, chosen, method,
                      bool(fields.get("method")), ranking[:RANKING_ROWS_SHOWN], ranking[RANKING_ROWS_SHOWN:],
                      page_url, api_url, curl, _pick_url(rec, mem, fields),
                      None if ranking else permalink("/", {**fields, "ranking": "true"}))


def _pick_url(rec: Mapping[str, Any], mem: Mapping[str, Any], fields: Mapping[str, str]) -> str | None:
    """The estimate of the recommended setup, when it is not the one shown."""
    keys = ("method", "gpu", "num_gpus", "parallelism")
    if not rec.get("gpu") or all(rec.get(k) == mem.get(k) for k in keys):
        return None
    pick = {**fields, **{k: str(rec[k]) for k in keys if rec.get(k) is not None}}
    return permalink("/", pick)
