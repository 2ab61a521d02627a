"""The memory bar keeps kin terms together (ZeRO's fp32 master copy beside the weights)."""

from __future__ import annotations

from app.web_plot import PLACE, TERM_ORDER, memory_bar


def test_zero_terms_sit_beside_their_kin() -> None:
    bar = memory_bar(
        {"cuda_context": 0.6, "zero_buckets": 0.1, "weights": 4.0, "master_weights": 8.0, "ddp_buckets": 1.0},
        13.7,
        [("A100", 80.0)],
    )
    assert [s.name for s in bar.segments] == [
        "weights", "master_weights", "ddp_buckets", "zero_buckets", "cuda_context",
    ]
    assert len({s.css for s in bar.segments}) == len(bar.segments)  # every term its own colour


def test_every_coloured_term_has_a_place() -> None:
    assert set(TERM_ORDER) <= set(PLACE)
