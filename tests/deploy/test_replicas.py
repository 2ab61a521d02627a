"""Two app processes on one PostgreSQL: started together; a price written via one is served by the other."""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from deploy_dockerfile import REPO
from deploy_server import Server, base_env, free_port, serve_argv, start
from sqlalchemy import create_engine, text

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

TOKEN = "replica-test-token-7f3a"
GPU = "rtx-4090"
PROVIDER = "replica-test-cloud"
ESTIMATE = (f"/api/estimate?model=llama-3.1-8b&method=qlora&gpu={GPU}&batch_size=4&seq_len=512"
            "&dataset_samples=5000&epochs=3")


@dataclass
class Pair:
    """Two servers on one database, and that database's URL."""

    a: Server
    b: Server
    db_url: str


def _csv_rows(name: str) -> int:
    with (REPO / "data" / name).open(newline="", encoding="utf-8") as handle:
        return sum(1 for _ in csv.DictReader(handle))


@pytest.fixture
def pair(pg_url: str, tmp_path: Path) -> Iterator[Pair]:
    """Two `tunefit serve` processes launched at the same instant on one fresh PostgreSQL database."""
    env = base_env(TUNEFIT_DATABASE_URL=pg_url, TUNEFIT_ADMIN_TOKEN=TOKEN)
    port_a, port_b = free_port(), free_port()
    # Both start before either is waited for: they race to migrate and seed the empty database.
    a = start(serve_argv(port_a), env, port_a, tmp_path / "a.log", tmp_path)
    b = start(serve_argv(port_b), env, port_b, tmp_path / "b.log", tmp_path)
    try:
        a.wait_healthy(60)
        b.wait_healthy(60)
        yield Pair(a, b, pg_url)
    finally:
        a.stop()
        b.stop()


def _served_price(server: Server, provider: str) -> list[dict[str, Any]]:
    """The prices `server` lists for GPU and `provider` in /api/gpus."""
    data = httpx.get(server.url + "/api/gpus", timeout=10).json()
    rows = data.get("gpus", data) if isinstance(data, dict) else data
    gpu = next(row for row in rows if row["slug"] == GPU)
    return [p for p in gpu["prices"] if p["provider"] == provider]


def _estimate_option(server: Server, provider: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    response = httpx.get(server.url + ESTIMATE, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    options = [o for o in body["cost"]["options"] if o["provider"] == provider]
    return (options[0] if options else None), body


def _post_price(server: Server, usd: float, day: dt.date, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    payload = {"gpu_slug": GPU, "provider": PROVIDER, "kind": "on_demand", "usd_per_gpu_hour": usd,
               "observed_on": day.isoformat(), "source": "tests/deploy/test_replicas.py"}
    return httpx.post(server.url + "/api/admin/prices", json=payload, headers=headers, timeout=10)


def test_replicas_started_together_migrate_and_seed_once(pair: Pair) -> None:
    """Both came up; the schema is at one head revision and the seed catalog is there exactly once."""
    assert pair.a.proc.poll() is None and pair.b.proc.poll() is None
    engine = create_engine(pair.db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
            assert conn.execute(text("SELECT count(*) FROM gpu")).scalar_one() == _csv_rows("gpus.csv")
            assert conn.execute(text("SELECT count(*) FROM price")).scalar_one() == _csv_rows("prices.csv")
    finally:
        engine.dispose()
    gpus_a = httpx.get(pair.a.url + "/api/gpus", timeout=10).json()
    assert gpus_a == httpx.get(pair.b.url + "/api/gpus", timeout=10).json()


def test_a_price_written_via_one_replica_is_served_by_the_other(pair: Pair) -> None:
    """Write on A, read on B (after B has served, and so could have cached, the old catalog)."""
    assert _served_price(pair.b, PROVIDER) == []
    before, first_body = _estimate_option(pair.b, PROVIDER)
    assert before is None

    today = dt.datetime.now(dt.UTC).date()
    written = _post_price(pair.a, 0.77, today - dt.timedelta(days=2))
    assert written.status_code in (200, 201), written.text
    assert [p["usd_per_hour" if "usd_per_hour" in p else "usd_per_gpu_hour"] for p in
            _served_price(pair.b, PROVIDER)] == [0.77]
    option, body = _estimate_option(pair.b, PROVIDER)
    assert option is not None and option["usd_per_hour"] == pytest.approx(0.77)
    assert body["meta"] != first_body["meta"], "meta's catalog update time did not move"

    # A second, newer observation replaces the first one as the served price: invalidation is not once-only.
    assert _post_price(pair.a, 1.54, today - dt.timedelta(days=1)).status_code in (200, 201)
    newer, _ = _estimate_option(pair.b, PROVIDER)
    assert newer is not None and newer["usd_per_hour"] == pytest.approx(1.54)
    assert newer["usd_total"] == pytest.approx(option["usd_total"] * 2, rel=1e-6)
    served = _served_price(pair.a, PROVIDER)
    assert [p.get("usd_per_hour", p.get("usd_per_gpu_hour")) for p in served] == [1.54]


def test_catalog_writes_need_the_token_on_every_replica(pair: Pair) -> None:
    """No token or a wrong one is refused on either replica, and nothing is stored."""
    day = dt.datetime.now(dt.UTC).date()
    assert _post_price(pair.b, 9.99, day, token=None).status_code == 401
    assert _post_price(pair.a, 9.99, day, token="wrong").status_code in (401, 403)
    assert _served_price(pair.a, PROVIDER) == [] and _served_price(pair.b, PROVIDER) == []
