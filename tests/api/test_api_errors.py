"""Bad input -> a 4xx that names the field (FastAPI's shape), or 404 with suggestions; never a 500."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

MODELS_DIR = Path(__file__).resolve().parents[2] / "data" / "models"
BASE = {"model": "llama-3.1-8b", "method": "qlora", "gpu": "rtx-4090"}


def _config_without(key: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((MODELS_DIR / "llama-3.1-8b.json").read_text())
    config.pop(key)
    return config


def _config_with(**fields: Any) -> dict[str, Any]:
    """Llama-3.1-8B's config with `fields` set (rope_scaling dropped: GET sends flat values)."""
    return {**_config_without("rope_scaling"), **fields}


# (fields sent, the field a 422 must name). Sent over POST as JSON and over GET as query parameters.
BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"batch_size": 0}, "batch_size"),
    ({"method": "foo"}, "method"),
    ({"seq_len": -1}, "seq_len"),
    ({"precision": "int3"}, "precision"),
    ({"optimizer": "adam9"}, "optimizer"),
    ({"attention": "magic"}, "attention"),
    ({"parallelism": "zero9"}, "parallelism"),
    ({"num_gpus": 0}, "num_gpus"),
    ({"lora_rank": 0}, "lora_rank"),
    ({"epochs": 0}, "epochs"),
    ({"electricity_usd_per_kwh": -1}, "electricity_usd_per_kwh"),
    ({"budget_usd": -5}, "budget_usd"),
    ({"method": "lora", "lora_targets": ["q_proj", "not_a_module"]}, "lora_targets"),
    ({"method": "lora", "lora_targets": ["q proj; drop"]}, "lora_targets"),
    # peft refuses half of transformers 5's fused gate_up (w1 without w3)
    ({"model": "mixtral-8x7b-v0.1", "method": "lora", "lora_targets": ["w1"]}, "lora_targets"),
    ({"model": None, "model_config": _config_without("hidden_size")}, "model_config"),
    ({"model_config": {"hidden_size": 4096}}, "model_config"),
    ({"model": None, "model_config": _config_with(kv_lora_rank=8)}, "model_config"),  # latent attention
    ({"model": None, "model_config": _config_with(model_type="phi")}, "model_config"),  # no gated MLP
    ({"model": None}, "model"),
]


def _loc_field(item: dict[str, Any]) -> str:
    return str(item["loc"][1])


@pytest.mark.parametrize(("fields", "field"), BAD_FIELDS, ids=[f for _, f in BAD_FIELDS])
def test_post_422_names_the_field(client: TestClient, fields: dict[str, Any], field: str) -> None:
    """POST: status 422, FastAPI's {detail: [{loc: [body, field], msg, type}]}."""
    r = client.post("/api/estimate", json={**BASE, **fields})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    assert any(item["loc"][0] == "body" and _loc_field(item) == field for item in detail), detail
    assert all(item["msg"] and item["type"] for item in detail)
    assert r.headers["x-request-id"]


@pytest.mark.parametrize(("fields", "field"), BAD_FIELDS, ids=[f for _, f in BAD_FIELDS])
def test_get_422_names_the_field(client: TestClient, fields: dict[str, Any], field: str) -> None:
    """GET: the same errors with loc [query, field]."""
    params: dict[str, str] = {}
    for key, value in {**BASE, **fields}.items():
        if value is None:
            continue
        params[key] = (
            ",".join(value)
            if isinstance(value, list)
            else (json.dumps(value) if isinstance(value, dict) else str(value))
        )
    query = "&".join(f"{k}={quote(v)}" for k, v in params.items())
    r = client.get("/api/estimate?" + query)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(item["loc"][0] == "query" and _loc_field(item) == field for item in detail), detail


def test_model_and_model_config_together_is_ambiguous(client: TestClient) -> None:
    """Both given: 422 naming model_config, rather than silently preferring one."""
    config = json.loads((MODELS_DIR / "llama-3.1-8b.json").read_text())
    r = client.post("/api/estimate", json={**BASE, "model_config": config})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "model_config"]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({**BASE, "batch_size": 4.5}, 422, "batch_size"),
        ({**BASE, "budget_usd": "lots"}, 422, "budget_usd"),
        ({**BASE, "unknown_field": 1}, 422, "unknown_field"),
        ({**BASE, "lora_targets": []}, 422, "lora_targets"),
        ({**BASE, "gradient_checkpointing": "maybe"}, 422, "gradient_checkpointing"),
        ({**BASE, "model_config": [1, 2]}, 422, "model_config"),
        ({**BASE, "model": "x" * 500}, 422, "model"),
    ],
)
def test_wrong_types_are_422(client: TestClient, body: dict[str, Any], status: int, field: str) -> None:
    """Wrong JSON types, unknown fields and oversized strings are named, not ignored."""
    r = client.post("/api/estimate", json=body)
    assert r.status_code == status, r.text
    assert any(field in item["loc"] for item in r.json()["detail"])


def test_nan_and_infinity_are_rejected(client: TestClient) -> None:
    """Python's json accepts NaN/Infinity literals; the API does not let them reach the core."""
    for literal in ("NaN", "Infinity", "-Infinity"):
        raw = '{"model": "llama-3.1-8b", "budget_usd": ' + literal + "}"
        r = client.post("/api/estimate", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (literal, r.text)


def test_malformed_json_and_non_object_bodies(client: TestClient) -> None:
    """Not JSON, a JSON array, deep nesting: 4xx, never 500."""
    headers = {"content-type": "application/json"}
    assert client.post("/api/estimate", content="{", headers=headers).status_code == 422
    assert client.post("/api/estimate", content="[1,2]", headers=headers).status_code == 422
    deep = '{"model_config": ' + "[" * 50_000 + "]" * 50_000 + "}"
    assert client.post("/api/estimate", content=deep, headers=headers).status_code in (400, 422)
    bad_config = client.get("/api/estimate?model_config=" + quote("{not json"))
    assert bad_config.status_code == 422
    assert bad_config.json()["detail"][0]["loc"] == ["query", "model_config"]


def test_unknown_model_404_with_suggestions(any_db_client: TestClient) -> None:
    """'llama-3.1-8' is not a model; the closest slugs come back, llama-3.1-8b first."""
    r = any_db_client.post("/api/estimate", json={**BASE, "model": "llama-3.1-8"})
    assert r.status_code == 404
    body = r.json()
    assert "llama-3.1-8" in body["detail"]
    assert body["suggestions"][0] == "llama-3.1-8b"
    assert r.headers["x-request-id"]


@pytest.mark.parametrize("field", ["gpu", "owned_gpu"])
def test_unknown_gpu_404_with_suggestions(client: TestClient, field: str) -> None:
    """'rtx4090' (no dash) suggests rtx-4090, for the GPU and for the owned card alike."""
    r = client.get(f"/api/estimate?model=llama-3.1-8b&{field}=rtx4090")
    assert r.status_code == 404
    assert "rtx-4090" in r.json()["suggestions"]
    assert field in r.json()["detail"]


def test_an_unknown_model_type_is_answered_with_its_reading_first(client: TestClient) -> None:
    """A Llama-shaped config of a type tunefit does not follow: an answer, whose first warning says so."""
    r = client.post(
        "/api/estimate", json={**BASE, "model": None, "model_config": _config_with(model_type="olmo2")}
    )
    assert r.status_code == 200, r.text
    first = r.json()["warnings"][0]
    assert first["code"] == "architecture_read_as_llama" and "'olmo2'" in first["message"]
