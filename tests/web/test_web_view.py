"""View helpers: permalinks keep only non-defaults, curl quotes safely, the SVG geometry is to scale."""

from __future__ import annotations

import json
import shlex

import pytest

from app.web_plot import memory_bar, scatter
from app.web_view import curl_command, fmt_hours, fmt_params, form_state, permalink, request_fields


def test_request_fields_drop_blanks_defaults_and_unknown_names() -> None:
    submitted = {"model": " llama-3.1-8b ", "precision": "bf16", "batch_size": "1", "seq_len": "512",
                 "lora_targets": "q_proj, v_proj", "dataset_samples": "", "utm_source": "x",
                 "ranking": "false"}
    assert request_fields(submitted) == {"model": "llama-3.1-8b", "seq_len": "512"}
    assert permalink("/", request_fields(submitted)) == "/?model=llama-3.1-8b&seq_len=512"
    state = form_state(submitted)
    assert state["batch_size"] == "1" and state["epochs"] == "1" and state["gradient_checkpointing"] == "true"


def test_curl_survives_quotes_in_a_pasted_config() -> None:
    config = json.dumps({"model_type": "llama", "note": "it's"})
    fields = {"model_config": config, "batch_size": "4", "double_quant": "false"}
    line = curl_command("http://h:8000/", fields)
    argv = shlex.split(line)
    assert argv[4] == "http://h:8000/api/estimate"
    body = json.loads(argv[argv.index("-d") + 1])
    assert body == {"batch_size": 4, "double_quant": False, "model_config": json.loads(config)}


@pytest.mark.parametrize(("value", "text"), [(999_900_000, "1 B"), (8_030_261_248, "8.03 B"),
                                             (6_815_744, "6.82 M"), (12, "12")])
def test_param_counts(value: int, text: str) -> None:
    assert fmt_params(value) == text


@pytest.mark.parametrize(("hours", "text"),
                         [(0.5, "30 min"), (1.1614, "1.16 h"), (72.0, "72.0 h (3.0 days)")])
def test_hours(hours: float, text: str) -> None:
    assert fmt_hours(hours) == text


def test_memory_bar_is_to_scale() -> None:
    bar = memory_bar({"weights": 10.0, "activations": 5.0, "cuda_context": 0.5, "zero": 0.0}, 15.5,
                     [("card", 24.0)])
    top = 24.0 * 1.06
    assert [s.name for s in bar.segments] == ["weights", "activations", "cuda_context"]
    assert bar.segments[1].x == pytest.approx(100 * 10 / top)
    end = bar.segments[-1].x + bar.segments[-1].width
    assert end == pytest.approx(bar.peak_x) == pytest.approx(100 * 15.5 / top)
    assert bar.lines[0].x == pytest.approx(100 * 24 / top) and not bar.lines[0].over
    # A term keeps its colour whatever else is in the breakdown.
    other = memory_bar({"activations": 1.0}, 1.0, [])
    assert other.segments[0].css == bar.segments[1].css


def test_scatter_puts_exact_predictions_on_the_diagonal() -> None:
    rows = [{"measured_gib": m, "predicted_gib": m, "method": "full"} for m in (2.0, 20.0, 140.0)]
    plot = scatter(rows)
    for pt in plot.points:
        # SVG y grows downwards: on y = x, the distance from the y axis equals the height above the x axis.
        assert pt.cx - plot.left == pytest.approx(plot.bottom - pt.cy)
