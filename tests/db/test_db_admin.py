"""Catalog writes over HTTP: bearer-token auth (403 disabled, 401 wrong), appends, history, CSV imports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from dbhelp import counts
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app import catalog
from app.config import Settings
from app.main import create_app

Factory = Callable[[], Session]
TOKEN = "test-admin-token-9f2c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PRICE = {
    "gpu": "rtx-4090", "provider": "runpod", "kind": "spot", "usd_per_gpu_hour": 0.29,
    "observed_on": "2026-09-01", "source": "https://example.org/runpod-sept",
}


def client(url: str, token: str | None) -> TestClient:
    """The real app (create_app) on the test database, with or without an admin token."""
    return TestClient(create_app(Settings(database_url=url, admin_token=token)))


@pytest.fixture
def admin(migrated_url: str, seeded: Factory) -> TestClient:
    return client(migrated_url, TOKEN)


def test_writes_are_refused_when_no_token_is_configured(migrated_url: str, seeded: Factory) -> None:
    r = client(migrated_url, None).post("/api/admin/prices", json=PRICE, headers=AUTH)
    assert r.status_code == 403 and r.json()["detail"].startswith("catalog writes are disabled")
    with seeded() as s:
        assert len(catalog.list_prices(s, gpu_slug="rtx-4090", provider="runpod", kind="spot")) == 1


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN},
     {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "no-scheme", "basic"],
)
def test_a_missing_or_wrong_token_is_401(admin: TestClient, headers: dict[str, str]) -> None:
    r = admin.post("/api/admin/prices", json=PRICE, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "x-request-id" in r.headers


def test_a_price_is_appended_and_history_kept(admin: TestClient, seeded: Factory) -> None:
    r = admin.post("/api/admin/prices", json=PRICE, headers=AUTH)
    assert r.status_code == 201
    body = r.json()
    assert body["price"]["usd_per_gpu_hour"] == 0.29 and body["price"]["observed_on"] == "2026-09-01"
    assert [(h["observed_on"], h["usd_per_gpu_hour"]) for h in body["history"]] == [
        ("2026-09-01", 0.29), ("2026-03-01", 0.34)
    ]
    # The same key with another price would overwrite history: refused.
    r = admin.post("/api/admin/prices", json={**PRICE, "usd_per_gpu_hour": 0.5}, headers=AUTH)
    assert r.status_code == 409 and "never overwritten" in r.json()["detail"]
    later = {**PRICE, "usd_per_gpu_hour": 0.27, "observed_on": "2026-10-01"}
    assert admin.post("/api/admin/prices", json=later, headers=AUTH).status_code == 201
    with seeded() as s:
        spot = catalog.list_prices(s, gpu_slug="rtx-4090", provider="runpod", kind="spot")
        assert [p.usd_per_gpu_hour for p in spot] == [0.27, 0.29, 0.34]
    # The public catalog shows the newest price, dated and sourced.
    gpus = {g["slug"]: g for g in admin.get("/api/gpus").json()["gpus"]}
    spot_rows = [p for p in gpus["rtx-4090"]["prices"] if (p["provider"], p["kind"]) == ("runpod", "spot")]
    assert spot_rows == [{"provider": "runpod", "kind": "spot", "usd_per_hour": 0.27,
                          "observed_on": "2026-10-01", "source": PRICE["source"], "note": ""}]


@pytest.mark.parametrize(
    ("change", "field"),
    [({"gpu": "rtx-4091"}, "gpu_slug"), ({"kind": "cheap"}, "kind"),
     ({"usd_per_gpu_hour": 0}, "usd_per_gpu_hour"), ({"observed_on": "yesterday"}, "observed_on"),
     ({"source": ""}, "source")],
)
def test_invalid_prices_are_422_naming_the_field(
    admin: TestClient, change: dict[str, Any], field: str
) -> None:
    r = admin.post("/api/admin/prices", json={**PRICE, **change}, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", field]


def test_csv_import_reports_bad_lines_and_changes_nothing(admin: TestClient, seeded: Factory) -> None:
    header = "gpu_slug,provider,kind,usd_per_gpu_hour,observed_on,source,note\n"
    good = "h100-sxm,lambda,on_demand,3.29,2026-09-01,https://example.org/lambda,\n"
    bad = "h100-sxm,lambda,on_demand,-3,2026-09-02,https://example.org/lambda,\n"
    with seeded() as s:
        before = counts(s)
    headers = {**AUTH, "Content-Type": "text/csv"}
    r = admin.post("/api/admin/import/prices", content=header + good + bad, headers=headers)
    assert r.status_code == 422
    assert r.json()["errors"] == [{"line": 3, "message": "usd_per_gpu_hour: must be > 0, got -3"}]
    with seeded() as s:
        assert counts(s) == before
    r = admin.post("/api/admin/import/prices", content=header + good, headers=headers)
    assert r.status_code == 200 and r.json()["inserted"] == 1
    with seeded() as s:
        assert counts(s)["price"] == before["price"] + 1


def test_gpus_and_models_can_be_added(admin: TestClient, seeded: Factory) -> None:
    gpu = {
        "slug": "rtx-pro-6000", "name": "NVIDIA RTX PRO 6000 Blackwell", "vendor": "nvidia",
        "architecture": "Blackwell GB202", "compute_capability": "12.0", "platform": "cuda", "vram_gb": 96,
        "vram_total_mib": 98304, "vram_total_source": "derived: 96 GB x 1024 (test)", "bandwidth_gbps": 1792,
        "bf16_tflops": 500.0, "fp16_tflops": 500.0, "bf16_supported": True, "board_power_w": 600,
        "launch_price_usd": None, "consumer": False, "interconnect": "pcie", "source": "test fixture",
    }
    r = admin.post("/api/admin/gpus", json=gpu, headers=AUTH)
    assert r.status_code == 201 and r.json()["outcome"] == "inserted"
    r = admin.post("/api/admin/gpus", json={**gpu, "board_power_w": 550}, headers=AUTH)
    assert r.status_code == 200 and r.json()["gpu"]["board_power_w"] == 550
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False}
    model = {"slug": "tiny-test", "hf_id": "me/Tiny-Test", "name": "Tiny", "license": "MIT", "gated": False,
             "source": "test fixture", "config": config}
    r = admin.post("/api/admin/models", json=model, headers=AUTH)
    assert r.status_code == 201 and r.json()["model"]["params_total"] > 0
    with seeded() as s:
        stored = catalog.get_model(s, "ME/tiny-test")
        assert stored is not None and stored.config == config
