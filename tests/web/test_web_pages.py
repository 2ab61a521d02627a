"""Catalog and accuracy pages show the service's numbers; every page is CSP-clean and self-hosted."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from htmltext import csp_violations, text_by_id

from app.core.architecture import parse_config
from app.core.calibration import compare, load_runs
from app.web_view import fmt_gib, fmt_int, fmt_usd

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_page_lists_specs_and_dated_sourced_prices(client: TestClient) -> None:
    api = client.get("/api/gpus").json()["gpus"]
    html = client.get("/gpus").text
    assert len(api) > 20
    for gpu in api:
        row = text_by_id(html, f"gpu-{gpu['slug']}")
        assert gpu["name"] in row and gpu["slug"] in row
        assert f"{fmt_gib(gpu['vram_gb'], 0)} GB {fmt_gib(gpu['vram_gib'])}" in row
        for price in gpu["prices"]:
            assert f"{fmt_usd(price['usd_per_hour'])}/h {price['provider']}" in row
            assert f"seen {price['observed_on']}" in row
            if price["source"].startswith("http"):
                assert f'href="{price["source"]}"' in html
    # The RTX 4090 reports 24,564 MiB: 23.99 GiB, not "24".
    assert "23.99" in text_by_id(html, "gpu-rtx-4090")


def test_model_page_shows_architecture_numbers(client: TestClient) -> None:
    api = client.get("/api/models").json()["models"]
    html = client.get("/models").text
    for model in api:
        row = text_by_id(html, f"model-{model['slug']}")
        arch = parse_config(json.loads((ROOT / "data" / "models" / f"{model['slug']}.json").read_text()))
        numbers = [fmt_int(arch.num_layers), fmt_int(arch.hidden_size),
                   f"{fmt_int(arch.num_heads)} ({fmt_int(arch.num_kv_heads)})",
                   fmt_int(arch.intermediate_size),
                   fmt_int(arch.vocab_size), fmt_int(arch.max_position_embeddings)]
        assert " ".join(numbers) in row, (model["slug"], row)
    assert "8 of 128" in text_by_id(html, "model-qwen3-30b-a3b")  # MoE: experts per token of experts


def test_accuracy_page_shows_measured_against_predicted(client: TestClient) -> None:
    runs = load_runs()
    if not runs:
        pytest.skip("no measured runs in data/calibration/*.jsonl yet")
    html = client.get("/accuracy").text
    table = text_by_id(html, "accuracy-table")
    for rec in runs:
        c = compare(rec)
        measured = c.measured_bytes / 2**30
        predicted = c.predicted.peak_bytes / 2**30
        assert f"{c.run_id} " in table
        error = round(100 * c.error, 1) + 0.0  # the page never shows "-0.0"
        assert f"{measured:.2f} {predicted:.2f} {error:+.1f} %" in table, c.run_id
    assert text_by_id(html, "acc-runs") == str(len(runs))
    assert html.count('<circle class="pt ') == len(runs)
    # The reference stack is read from the runs themselves.
    gpus = {str(r["gpu_name"]) for r in runs if r.get("gpu_name")}
    assert text_by_id(html, "stack-gpus") == ", ".join(sorted(gpus))
    torch_versions = {str((r.get("versions") or {}).get("torch")) for r in runs if r.get("versions")}
    for version in torch_versions:
        assert version in html


@pytest.mark.parametrize("path", ["/", "/?model=llama-3.1-70b&dataset_samples=10000", "/gpus", "/models",
                                  "/accuracy", "/?model=nope"])
def test_pages_pass_a_strict_csp(client: TestClient, path: str) -> None:
    res = client.get(path)
    assert res.headers["content-type"].startswith("text/html")
    assert csp_violations(res.text) == []
    assert "default-src 'self'" in res.headers["Content-Security-Policy"]
    # Every form control has a label (the form's controls carry ids f-<field>).
    for ident in re.findall(r'<(?:input|select|textarea)[^>]*\bid="(f-[a-z_]+)"', res.text):
        assert f'<label for="{ident}">' in res.text, ident


def test_vendored_htmx_is_the_pinned_file(client: TestClient) -> None:
    readme = (ROOT / "static" / "vendor" / "README.md").read_text()
    found = re.search(r"`(htmx-[\d.]+\.min\.js)` \| [^|]+\| [^|]+\| `([0-9a-f]{64})`", readme)
    assert found, "static/vendor/README.md must list the htmx file and its sha256"
    name, digest = found.groups()
    assert hashlib.sha256((ROOT / "static" / "vendor" / name).read_bytes()).hexdigest() == digest
    html = client.get("/").text
    assert f'<script src="/static/vendor/{name}" defer></script>' in html
    res = client.get(f"/static/vendor/{name}")
    assert res.status_code == 200 and hashlib.sha256(res.content).hexdigest() == digest
