"""The estimate page: the full page, the htmx fragment and the plain form post show the API's numbers."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from fastapi.testclient import TestClient
from htmltext import attr_of, parse, text_by_id

from app.web_view import EXAMPLE, fmt_gib, fmt_hours, fmt_int, fmt_rate, fmt_usd

ROOT = Path(__file__).resolve().parents[2]
ARTICLE_4090 = {
    "model": "llama-3.1-8b", "method": "qlora", "gpu": "rtx-4090", "batch_size": "4", "seq_len": "512",
    "dataset_samples": "5000", "epochs": "3",
}
SEVEN_B_FULL = {
    "model": "mistral-7b-v0.3", "method": "full", "precision": "amp_bf16", "batch_size": "4",
    "seq_len": "512", "gpu": "a100-80gb",
}
NO_GPU_70B = {"model": "llama-3.1-70b", "dataset_samples": "10000"}


def api(client: TestClient, params: dict[str, str]) -> dict[str, Any]:
    """The API's JSON for the same fields."""
    res = client.get("/api/estimate", params=params)
    assert res.status_code == 200, res.text
    body: dict[str, Any] = res.json()
    return body


def assert_numbers_match(html: str, body: dict[str, Any]) -> None:
    """Every headline number in the result panel is the API's number, formatted."""
    mem = body["memory"]
    assert text_by_id(html, "peak-gib").startswith(f"{fmt_gib(mem['peak_gib'])} GiB")
    if mem.get("headroom_gib") is not None:
        assert text_by_id(html, "headroom-gib").startswith(f"{fmt_gib(abs(mem['headroom_gib']))} GiB")
        assert f"of {fmt_gib(mem['vram_gib'])} GiB" in text_by_id(html, "headroom-gib")
    if body["throughput"] and body["throughput"].get("tokens_per_s") is not None:
        assert text_by_id(html, "tokens-per-s").startswith(fmt_rate(body["throughput"]["tokens_per_s"]))
    if body["time"] and body["time"].get("hours") is not None:
        hours = text_by_id(html, "hours")
        assert hours.startswith(fmt_hours(body["time"]["hours"]))
        assert f"{fmt_int(body['time']['steps'])} optimizer steps" in hours
    # The SVG bar's legend lists every breakdown term with the API's GiB.
    legend = " ".join(parse(html).texts.get("bar-title", []))
    assert f"Peak {fmt_gib(mem['peak_gib'])} GiB" in legend
    for name, gib in mem["breakdown_gib"].items():
        if gib > 0:
            assert f"{name.replace('_', ' ')}: {fmt_gib(gib)} GiB" in html
    rec = body["recommendation"]
    assert rec["gpu_name"] in text_by_id(html, "recommendation")
    for reason in rec["reasons"]:
        assert reason.replace("'", "&#39;") in html or reason in html


def test_full_page_shows_the_apis_numbers(client: TestClient) -> None:
    body = api(client, ARTICLE_4090)
    res = client.get("/", params=ARTICLE_4090)
    assert res.status_code == 200
    html = res.text
    assert html.lstrip().startswith("<!doctype html>") and '<form id="estimate-form"' in html
    assert_numbers_match(html, body)
    # The article's 4090 run fits: the verdict says so against the card's reported VRAM.
    assert body["memory"]["fits"] is True
    assert attr_of(html, "verdict", "data-fits") == "true"
    assert text_by_id(html, "verdict").startswith("✓Fits on NVIDIA GeForce RTX 4090")
    assert f"of {fmt_gib(body['memory']['vram_gib'])} GiB" in text_by_id(html, "verdict")
    # 5,000 samples × 3 epochs at batch 4: 3,750 optimizer steps.
    assert body["time"]["steps"] == 3750 and "3,750 optimizer steps" in text_by_id(html, "hours")
    # Every price of the chosen card, with its date, in the cost table.
    table = text_by_id(html, "cost-table")
    for option in body["cost"]["options"]:
        cells = f"{fmt_usd(option['usd_per_hour'])} {fmt_usd(option['usd_total'])} {option['observed_on']}"
        assert cells in table
    for warning in body["warnings"]:
        assert f'data-code="{warning["code"]}"' in html


def test_htmx_request_gets_only_the_result_block(client: TestClient) -> None:
    body = api(client, SEVEN_B_FULL)
    res = client.get("/", params=SEVEN_B_FULL, headers={"HX-Request": "true"})
    assert res.status_code == 200
    html = res.text
    assert html.lstrip().startswith('<section id="result"') and "<html" not in html and "<form" not in html
    assert_numbers_match(html, body)
    # A 7B full fine-tune with fp32 master weights is over 80 GB: the fragment says it does not fit.
    assert body["memory"]["fits"] is False and body["memory"]["peak_gib"] > 80
    assert attr_of(html, "verdict", "data-fits") == "false"
    assert text_by_id(html, "verdict").startswith("✗Does not fit on NVIDIA A100 80GB")
    assert text_by_id(html, "headroom-gib").startswith(fmt_gib(-body["memory"]["headroom_gib"]))
    # The live region is swapped out of band (innerHTML), so it stays one element in the page.
    assert 'id="live-status" class="visually-hidden" role="status" hx-swap-oob="innerHTML"' in html
    assert text_by_id(html, "live-status").startswith("Does not fit on NVIDIA A100 80GB")
    # The address bar follows the form, and caches key on HX-Request.
    assert res.headers["HX-Replace-Url"] == attr_of(html, "permalink", "href")
    assert "HX-Request" in res.headers["Vary"]


def test_no_fit_links_to_the_recommended_setup_and_the_ranking(client: TestClient) -> None:
    body = api(client, SEVEN_B_FULL)
    html = client.get("/", params=SEVEN_B_FULL).text
    rec = body["recommendation"]
    assert body["memory"]["fits"] is False
    assert (rec["gpu"], rec["num_gpus"]) != ("a100-80gb", 1)
    # The pick differs from what was asked: one link opens its estimate (and its launch config).
    pick = attr_of(html, "pick-link", "href") or ""
    picked = client.get(pick).text
    fields = dict(parse_qsl(urlsplit(pick).query))
    assert fields["gpu"] == rec["gpu"] and fields["num_gpus"] == str(rec["num_gpus"])
    assert api(client, fields)["memory"]["fits"] is True
    assert attr_of(picked, "verdict", "data-fits") == "true"
    assert 'id="launch-command"' in picked and 'id="launch-command"' not in html
    # The other ranks every GPU for the same job.
    rank = attr_of(html, "rank-link", "href") or ""
    assert dict(parse_qsl(urlsplit(rank).query)) == {**SEVEN_B_FULL, "ranking": "true"}
    ranked = client.get(rank).text
    ranked_body = api(client, {**SEVEN_B_FULL, "ranking": "true"})
    first = ranked_body["ranking"][0]
    assert f"{first['num_gpus']}× {first['gpu_name']}" in text_by_id(ranked, "ranking-table")


def test_plain_form_post_without_javascript(client: TestClient) -> None:
    # A browser without JavaScript posts every control: blanks, defaults, and a checkbox after its
    # hidden "false" (here: checked, so "true" comes last).
    form = [
        ("model", "mistral-7b-v0.3"), ("model_config", ""), ("method", "qlora"), ("gpu", "rtx-3060"),
        ("num_gpus", "1"), ("parallelism", "ddp"), ("ranking", "false"), ("dataset_samples", ""),
        ("epochs", "1"), ("precision", "bf16"), ("optimizer", "adamw"), ("batch_size", "1"),
        ("seq_len", "512"), ("attention", "sdpa"), ("grad_accum", "1"), ("gradient_checkpointing", "false"),
        ("gradient_checkpointing", "true"), ("tokens_per_sample", ""), ("lora_rank", "16"),
        ("lora_alpha", ""),
        ("lora_targets", "q_proj, v_proj"), ("double_quant", "false"), ("double_quant", "true"),
        ("owned_gpu", ""), ("budget_usd", ""), ("electricity_usd_per_kwh", "0.15"),
    ]
    res = client.post("/", content="&".join(f"{k}={v.replace(' ', '+')}" for k, v in form),
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert res.status_code == 200
    body = api(client, {"model": "mistral-7b-v0.3", "method": "qlora", "gpu": "rtx-3060", "seq_len": "512"})
    assert_numbers_match(res.text, body)
    # The article's "7B on a 12 GB card": QLoRA fits under 12 GB.
    assert body["memory"]["fits"] is True and body["memory"]["peak_gib"] < 12
    # Defaults and blanks leave the permalink: only what differs from the API's defaults remains.
    link = attr_of(res.text, "permalink", "href")
    assert link == "/?model=mistral-7b-v0.3&method=qlora&gpu=rtx-3060&seq_len=512"


def test_unchecked_box_means_false(client: TestClient) -> None:
    params = {**ARTICLE_4090, "gradient_checkpointing": "false"}
    body = api(client, params)
    res = client.get("/", params=[*ARTICLE_4090.items(), ("gradient_checkpointing", "false")])
    assert_numbers_match(res.text, body)
    box = 'id="f-gradient_checkpointing" name="gradient_checkpointing" type="checkbox" value="true">'
    assert box in res.text  # rendered unchecked
    assert "gradient_checkpointing=false" in (attr_of(res.text, "permalink", "href") or "")


def test_no_gpu_ranks_the_catalog_and_recommends(client: TestClient) -> None:
    body = api(client, NO_GPU_70B)
    html = client.get("/", params=NO_GPU_70B).text
    assert_numbers_match(html, body)
    rec = body["recommendation"]
    # The article's 70B-class case: rent on spot.
    assert rec["where"] == "cloud_spot" and "rent: cloud spot" in text_by_id(html, "recommendation")
    cards = f"{rec['num_gpus']}× {rec['gpu_name']}" if rec["num_gpus"] > 1 else rec["gpu_name"]
    assert text_by_id(html, "verdict").startswith(f"✓Fits — best pick: {cards}")
    fitting = sum(1 for row in body["ranking"] if row["fits"])
    assert f"{fitting} of {len(body['ranking'])} GPU setups fit" in text_by_id(html, "verdict")
    top = text_by_id(html, "ranking-table")
    rest = text_by_id(html, "ranking-rest")
    for row in body["ranking"][:12]:
        cells = f"{row['num_gpus']}× {row['gpu_name']}"
        assert cells in top
        numbers = [fmt_gib(row["peak_gib"]), fmt_gib(row["headroom_gib"]), fmt_int(row["max_batch_size"])]
        assert " ".join(numbers) in top
    assert len(body["ranking"]) > 12
    for row in body["ranking"][12:]:
        assert f"{row['num_gpus']}× {row['gpu_name']}" in rest


def test_permalink_and_curl_are_the_same_request(client: TestClient) -> None:
    body = api(client, ARTICLE_4090)
    html = client.get("/", params=ARTICLE_4090).text
    link = attr_of(html, "permalink", "href") or ""
    assert dict(parse_qsl(urlsplit(link).query)) == ARTICLE_4090
    again = client.get(link).text
    assert text_by_id(again, "peak-gib") == text_by_id(html, "peak-gib")
    api_link = attr_of(html, "api-link", "href") or ""
    assert api_link.startswith("/api/estimate?") and client.get(api_link).json() == body
    # The curl line posts the same fields as JSON; the API answers it with the same estimate.
    argv = shlex.split(text_by_id(html, "curl"))
    assert argv[:4] == ["curl", "-s", "-X", "POST"] and argv[4].endswith("/api/estimate")
    payload = json.loads(argv[argv.index("-d") + 1])
    assert payload == {"model": "llama-3.1-8b", "method": "qlora", "gpu": "rtx-4090", "dataset_samples": 5000,
                       "epochs": 3, "batch_size": 4, "seq_len": 512}
    assert client.post("/api/estimate", json=payload).json() == body


def test_pasted_config_json(client: TestClient) -> None:
    config = (ROOT / "data" / "models" / "llama-3.2-1b.json").read_text()
    fields = {"model_config": config, "method": "lora", "gpu": "rtx-4070"}
    body = client.post("/api/estimate", json={**fields, "model_config": json.loads(config)}).json()
    # The form also still has the catalog model typed in: the pasted config wins, and the permalink
    # and the curl line carry only it, so they stay one valid API request.
    res = client.post("/", data={**fields, "model": "llama-3.1-70b"})
    assert res.status_code == 200
    assert_numbers_match(res.text, body)
    assert 'class="paste" open' in res.text  # the pasted config stays visible
    link = dict(parse_qsl(urlsplit(attr_of(res.text, "permalink", "href") or "").query))
    assert "model" not in link and json.loads(link["model_config"]) == json.loads(config)
    assert client.get("/api/estimate", params=link).json() == body


def test_first_visit_shows_the_example(client: TestClient) -> None:
    html = client.get("/").text
    assert_numbers_match(html, api(client, EXAMPLE))
    assert "Example: the article" in html
    assert 'value="llama-3.1-8b"' in html


@pytest.mark.parametrize("htmx", [False, True])
def test_field_error_is_shown_next_to_the_field(client: TestClient, htmx: bool) -> None:
    headers = {"HX-Request": "true"} if htmx else {}
    res = client.get("/", params={"model": "llama-3.1-8b", "batch_size": "0"}, headers=headers)
    assert res.status_code == 422
    problem = text_by_id(res.text, "result")
    assert "batch size: Input should be greater than or equal to 1" in problem
    assert '<a href="#f-batch_size">' in res.text
    if not htmx:
        assert 'aria-invalid="true"' in res.text and 'id="batch_size-error"' in res.text


def test_unknown_model_offers_the_closest_slugs(client: TestClient) -> None:
    res = client.get("/", params={"model": "llama-3.1-9b", "gpu": "rtx-4090"}, headers={"HX-Request": "true"})
    assert res.status_code == 404
    api_body = client.get("/api/estimate", params={"model": "llama-3.1-9b"}).json()
    for slug in api_body["suggestions"]:
        assert f'<a href="/?model={slug}&amp;gpu=rtx-4090">{slug}</a>' in res.text


def test_unknown_gpu_is_a_field_error(client: TestClient) -> None:
    res = client.get("/", params={"model": "llama-3.1-8b", "gpu": "rtx-9090"})
    assert res.status_code == 404
    assert '<a href="#f-gpu">gpu</a>' in res.text and "rtx-9090" in text_by_id(res.text, "result")
