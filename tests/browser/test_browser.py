"""Headless Chromium against a real uvicorn: fields change, the result follows without a reload."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from app.web_view import EXAMPLE, fmt_gib

pytestmark = pytest.mark.browser
TIMEOUT_MS = 15_000


def api(base: str, params: dict[str, str]) -> dict[str, Any]:
    """The API's answer for the same fields."""
    res = httpx.get(f"{base}/api/estimate", params=params, timeout=30)
    assert res.status_code == 200, res.text
    body: dict[str, Any] = res.json()
    return body


def watch_console(page: Any) -> list[str]:
    """Collect console errors and page errors (a CSP violation shows up as one)."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def wait_for_result(page: Any, fields: dict[str, str], body: dict[str, Any]) -> None:
    """Wait until the result panel is the one for `fields` (its permalink says so), then check its peak."""
    page.wait_for_function(
        """want => {
            const a = document.querySelector('#permalink');
            if (!a || document.querySelector('#result.htmx-request')) return false;
            const got = Object.fromEntries(new URL(a.href).searchParams);
            return JSON.stringify(Object.entries(got).sort()) === JSON.stringify(Object.entries(want).sort());
        }""",
        arg=fields, timeout=TIMEOUT_MS,
    )
    assert page.locator("#peak-gib").inner_text().startswith(f"{fmt_gib(body['memory']['peak_gib'])} GiB")


def test_fields_update_the_result_without_reload(server: str, open_browser: Any, artifacts: Path) -> None:
    ctx = open_browser(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    errors = watch_console(page)
    page.goto(server + "/")
    wait_for_result(page, EXAMPLE, api(server, EXAMPLE))
    assert page.get_attribute("#verdict", "data-fits") == "true"
    page.evaluate("window.__sameDocument = true")

    # The method select: a full fine-tune of the 8B model on the 4090 does not fit.
    fields = {**EXAMPLE, "method": "full"}
    page.select_option("#f-method", "full")
    full = api(server, fields)
    wait_for_result(page, fields, full)
    assert full["memory"]["fits"] is False
    assert page.get_attribute("#verdict", "data-fits") == "false"
    assert page.locator("#verdict").inner_text().startswith("✗")
    # Screen readers hear the new verdict from the live region that stays in the page.
    assert (page.text_content("#live-status") or "").startswith("Does not fit on NVIDIA GeForce RTX 4090.")
    assert page.locator("#live-status").count() == 1

    # A bigger card, chosen from the GPU select.
    fields["gpu"] = "h200"
    page.select_option("#f-gpu", "h200")
    h200 = api(server, fields)
    wait_for_result(page, fields, h200)
    assert page.get_attribute("#verdict", "data-fits") == str(h200["memory"]["fits"]).lower()

    # Typing into a number field in the folded-away settings, by keyboard (debounced).
    page.click("details.advanced > summary")
    page.focus("#f-seq_len")
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type("1024")
    fields["seq_len"] = "1024"
    longer = api(server, fields)
    wait_for_result(page, fields, longer)
    assert page.locator("#tokens-per-s").inner_text().split()[0] in (
        f"{longer['throughput']['tokens_per_s']:,.0f}",
    )
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"

    # The address bar is the permalink (htmx replaced it); the permalink link says the same.
    href = page.get_attribute("#permalink", "href") or ""
    assert dict(parse_qsl(urlsplit(page.url).query)) == dict(parse_qsl(urlsplit(href).query)) == fields
    page.screenshot(path=str(artifacts / "estimate-desktop.png"), full_page=True)

    # Opening the permalink in a fresh page shows the same estimate and the same form.
    other = ctx.new_page()
    watch_errors = watch_console(other)
    other.goto(server + href)
    wait_for_result(other, fields, longer)
    assert other.input_value("#f-method") == "full" and other.input_value("#f-gpu") == "h200"
    assert other.input_value("#f-seq_len") == "1024"
    assert errors == [] and watch_errors == [], errors + watch_errors


def test_rank_all_gpus_and_error_in_place(server: str, open_browser: Any, artifacts: Path) -> None:
    ctx = open_browser(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    errors = watch_console(page)
    fields = {"model": "llama-3.1-70b", "dataset_samples": "10000"}
    page.goto(server + "/?model=llama-3.1-70b&dataset_samples=10000")
    body = api(server, fields)
    wait_for_result(page, fields, body)
    rows = page.locator("#ranking-table tbody tr")
    assert rows.count() == min(12, len(body["ranking"]))
    first = body["ranking"][0]
    assert f"{first['num_gpus']}× {first['gpu_name']}" in rows.nth(0).inner_text()
    assert body["recommendation"]["where"] == "cloud_spot"
    page.screenshot(path=str(artifacts / "ranking-desktop.png"), full_page=True)

    # An unknown model: the panel explains and suggests, the form stays as typed.
    page.fill("#f-model", "llama-3.1-9b")
    page.wait_for_selector("#result .problem", timeout=TIMEOUT_MS)
    assert "llama-3.1-8b" in page.locator("#result .problem").inner_text()
    page.click("#result .problem a:text('llama-3.1-8b')")
    fields = {"model": "llama-3.1-8b", "dataset_samples": "10000"}
    wait_for_result(page, fields, api(server, fields))

    # Naming a card drops the ranking; the checkbox brings it back for that card's job.
    page.select_option("#f-gpu", "rtx-4090")
    fields["gpu"] = "rtx-4090"
    wait_for_result(page, fields, api(server, fields))
    assert page.locator("#ranking-table").count() == 0
    page.check("#f-ranking")
    fields["ranking"] = "true"
    ranked = api(server, fields)
    wait_for_result(page, fields, ranked)
    assert page.locator("#ranking-table tbody tr").count() == min(12, len(ranked["ranking"]))
    assert errors == [] or all("404" in e for e in errors), errors


def test_phone_layout(server: str, open_browser: Any, artifacts: Path) -> None:
    ctx = open_browser(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                       has_touch=True)
    page = ctx.new_page()
    errors = watch_console(page)
    page.goto(server + "/")
    wait_for_result(page, EXAMPLE, api(server, EXAMPLE))
    # Nothing wider than the screen; the verdict bar is on screen while the form is.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    bar = page.locator(".mini-verdict")
    assert bar.is_visible() and bar.inner_text().startswith("✓ Fits")
    page.screenshot(path=str(artifacts / "estimate-phone.png"), full_page=False)
    page.evaluate("document.querySelector('#result').scrollIntoView()")
    page.screenshot(path=str(artifacts / "estimate-phone-result.png"), full_page=False)
    page.screenshot(path=str(artifacts / "estimate-phone-full.png"), full_page=True)
    for path in ("/gpus", "/accuracy"):
        page.goto(server + path)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
    assert errors == [], errors


def test_works_without_javascript(server: str, open_browser: Any, artifacts: Path) -> None:
    ctx = open_browser(viewport={"width": 1280, "height": 900}, java_script_enabled=False)
    page = ctx.new_page()
    page.goto(server + "/")
    page.select_option("#f-method", "lora")
    page.select_option("#f-gpu", "a100-80gb")
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert urlsplit(page.url).path == "/"
    body = api(server, {**EXAMPLE, "method": "lora", "gpu": "a100-80gb"})
    assert page.locator("#peak-gib").inner_text().startswith(f"{fmt_gib(body['memory']['peak_gib'])} GiB")
    assert page.locator("#verdict").inner_text().startswith("✓Fits on NVIDIA A100 80GB")
    page.screenshot(path=str(artifacts / "estimate-nojs.png"), full_page=True)


@pytest.mark.parametrize("path", ["/gpus", "/models", "/accuracy"])
def test_catalog_and_accuracy_pages(server: str, open_browser: Any, artifacts: Path, path: str) -> None:
    ctx = open_browser(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    errors = watch_console(page)
    page.goto(server + path)
    assert page.locator("h1").inner_text()
    name = re.sub(r"\W", "", path) or "index"
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)
    assert errors == [], errors
