"""The app shell: health, catalog endpoints, request ids, security headers, body limit, CORS, errors."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from app.version import VERSION

JSON = "application/json"
HEX_ID = re.compile(r"^[0-9a-f]{32}$")


def test_healthz_reports_the_database_and_catalog(any_db_client: TestClient) -> None:
    """/healthz answers ok with the backend's name and when the catalog was loaded."""
    r = any_db_client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["version"] == VERSION
    assert body["database"] in ("sqlite", "postgresql")
    assert body["catalog_updated"] and body["catalog_updated"][:2] == "20"


def test_healthz_is_503_on_an_unmigrated_database(
    sqlite_url: str, make_client: Callable[..., TestClient]
) -> None:
    """An empty, never-migrated database is not ready: 503, JSON, still with a request id."""
    r = make_client(sqlite_url).get("/healthz")
    assert r.status_code == 503
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_gpus_lists_the_catalog_with_dated_sourced_prices(any_db_client: TestClient) -> None:
    """GET /api/gpus: every GPU, VRAM as nvidia-smi reports it, each price with a date and a source."""
    r = any_db_client.get("/api/gpus")
    assert r.status_code == 200
    body = r.json()
    gpus = {g["slug"]: g for g in body["gpus"]}
    assert len(gpus) >= 30
    assert {"rtx-4090", "a100-80gb", "a100-80gb-pcie", "h100-sxm", "h100-pcie", "h200"} <= set(gpus)
    assert gpus["rtx-4090"]["vram_total_mib"] == 24564
    assert gpus["rtx-4090"]["vram_gib"] == round(24564 / 1024, 3)
    priced = [p for g in gpus.values() for p in g["prices"]]
    assert len(priced) >= 30
    for price in priced:
        assert price["usd_per_hour"] > 0
        assert re.match(r"^\d{4}-\d{2}-\d{2}$", price["observed_on"])
        assert price["source"]
    assert body["meta"]["version"] == VERSION
    assert body["meta"]["catalog_updated"]


def test_models_lists_models_tiers_and_prices(client: TestClient) -> None:
    """GET /api/models: slugs with their HF ids and sizes, the budget tiers, the dated prices."""
    body = client.get("/api/models").json()
    models = {m["slug"]: m for m in body["models"]}
    assert models["llama-3.1-8b"]["hf_id"] == "meta-llama/Llama-3.1-8B"
    assert 8.0e9 < models["llama-3.1-8b"]["params_total"] < 8.1e9
    assert 70e9 < models["llama-3.1-70b"]["params_total"] < 71e9
    assert {"mistral-7b-v0.3", "qwen2.5-7b"} <= set(models)
    assert len(body["tiers"]) >= 3 and all(t["gpu_slugs"] is not None for t in body["tiers"])
    assert all(p["observed_on"] and p["source"] for p in body["prices"])


def test_request_id_generated_echoed_or_replaced(client: TestClient) -> None:
    """A fresh id when none is sent; a sane one is echoed; a forged one is replaced."""
    generated = client.get("/healthz").headers["x-request-id"]
    assert HEX_ID.match(generated)
    assert client.get("/healthz").headers["x-request-id"] != generated
    echoed = client.get("/healthz", headers={"X-Request-ID": "abc-123.X:y"})
    assert echoed.headers["x-request-id"] == "abc-123.X:y"
    forged = client.get("/healthz", headers={"X-Request-ID": 'a" b\tc' + "x" * 300})
    assert HEX_ID.match(forged.headers["x-request-id"])


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("GET", "/healthz", {}, 200),
        ("GET", "/api/gpus", {}, 200),
        ("GET", "/api/estimate?model=no-such-model", {}, 404),
        ("POST", "/api/estimate", {"json": {"model": "llama-3.1-8b", "batch_size": 0}}, 422),
        ("POST", "/api/estimate", {"content": b"{not json", "headers": {"content-type": JSON}}, 422),
        ("GET", "/no/such/page", {}, 404),
        ("DELETE", "/api/estimate", {}, 405),
        ("POST", "/api/estimate", {"content": b"x" * 300_000}, 413),
    ],
)
def test_every_response_carries_request_id_and_security_headers(
    client: TestClient, method: str, path: str, kwargs: dict[str, object], status: int
) -> None:
    """Successes and errors alike: X-Request-ID, strict CSP, nosniff, no framing, referrer policy."""
    r = client.request(method, path, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    assert HEX_ID.match(r.headers["x-request-id"])
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"]
    assert r.headers["content-type"].startswith("application/json")
    assert "Traceback" not in r.text


def test_body_over_the_limit_is_413_even_without_content_length(
    seeded_url: str, make_client: Callable[..., TestClient]
) -> None:
    """A chunked body (no Content-Length) is cut off at settings.max_body_bytes too."""
    client = make_client(seeded_url, max_body_bytes=1000)

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 100

    r = client.post("/api/estimate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "1000 bytes" in r.json()["detail"]
    small = client.post("/api/estimate", json={"model": "no-such-model"})
    assert small.status_code == 404, "a body under the limit is passed through intact"


def test_cors_only_for_configured_origins(seeded_url: str, make_client: Callable[..., TestClient]) -> None:
    """TUNEFIT_CORS_ORIGINS lets the named origins call the API; others get no CORS grant."""
    client = make_client(seeded_url, cors_origins=["https://tools.example"])
    pre = client.options(
        "/api/estimate",
        headers={"Origin": "https://tools.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"},
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://tools.example"
    assert pre.headers["x-request-id"]
    got = client.get("/healthz", headers={"Origin": "https://tools.example"})
    assert got.headers["access-control-allow-origin"] == "https://tools.example"
    assert "x-request-id" in got.headers["access-control-expose-headers"].lower()
    other = client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    plain = make_client(seeded_url).get("/healthz", headers={"Origin": "https://tools.example"})
    assert "access-control-allow-origin" not in plain.headers


def test_unexpected_error_is_json_with_the_request_id(
    seeded_url: str, make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in an endpoint: logged with the request id, answered as JSON, no traceback shown."""
    client = make_client(seeded_url)

    @client.app.get("/boom")  # type: ignore[attr-defined]
    def boom() -> None:
        raise RuntimeError("secret internals")

    with caplog.at_level("ERROR", logger="tunefit"):
        r = client.get("/boom", headers={"X-Request-ID": "trace-me-42"})
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error; the server log has details", "request_id": "trace-me-42"}
    assert "secret internals" not in r.text
    assert r.headers["x-request-id"] == "trace-me-42"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert any("trace-me-42" in rec.getMessage() for rec in caplog.records)


def test_database_failure_is_503_not_500(seeded_url: str, make_client: Callable[..., TestClient]) -> None:
    """The catalog tables vanishing under a running app: 503 with the request id."""
    import sqlite3

    from sqlalchemy.engine import make_url

    client = make_client(seeded_url)
    assert client.get("/api/gpus").status_code == 200
    with sqlite3.connect(str(make_url(seeded_url).database)) as conn:
        conn.execute("ALTER TABLE gpu RENAME TO gpu_moved")
    r = client.get("/api/gpus")
    assert r.status_code == 503
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_openapi_documents_the_estimate_fields_with_bounds(client: TestClient) -> None:
    """The schema names every field of design.md with its bounds, model_config under its own name."""
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["EstimateRequest"]["properties"]
    expected = {
        "model", "model_config", "method", "precision", "optimizer", "batch_size", "seq_len",
        "gradient_checkpointing", "attention", "lora_rank", "lora_alpha", "lora_targets", "double_quant",
        "gpu", "num_gpus", "parallelism", "dataset_samples", "epochs", "grad_accum", "tokens_per_sample",
        "owned_gpu", "budget_usd", "electricity_usd_per_kwh",
    }
    assert expected <= set(props)
    assert props["batch_size"]["minimum"] == 1 and props["batch_size"]["default"] == 1
    assert props["seq_len"]["default"] == 2048 and props["seq_len"]["maximum"] >= 10**7
    assert props["electricity_usd_per_kwh"]["default"] == 0.15
    get_params = {p["name"] for p in schema["paths"]["/api/estimate"]["get"]["parameters"]}
    assert expected <= get_params
