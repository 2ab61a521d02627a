"""Request logs end to end on a real uvicorn: one JSON line per request, errors traceable by request id."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from deploy_server import Server, base_env, free_port, running, serve_argv
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.timeout(90)

ESTIMATE = "/api/estimate?model=llama-3.1-8b&method=qlora&gpu=rtx-4090&batch_size=4&seq_len=512"


@dataclass
class Exchange:
    """One request sent and what came back."""

    method: str
    path: str
    status: int
    request_id: str
    body: Any


@dataclass
class Session:
    """What a server logged while the test's requests ran, and the requests themselves."""

    exchanges: list[Exchange]
    lines: list[str]


def _records(lines: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for line in lines:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def _break_catalog(database: str) -> None:
    """Rename every table away underneath the running server: a real database fault, not a mock."""
    with sqlite3.connect(database) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            if not table.startswith("sqlite_"):
                conn.execute(f'ALTER TABLE "{table}" RENAME TO "{table}_moved"')


def _send(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Exchange:
    response = client.request(method, path, **kwargs)
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return Exchange(method, path.split("?")[0], response.status_code, response.headers["x-request-id"], body)


def _wait_for_lines(server: Server, offset: int, request_count: int) -> list[str]:
    """The log lines after `offset`, once the request lines of `request_count` requests are in."""
    deadline = time.monotonic() + 10
    while True:
        lines = server.log_text()[offset:].splitlines()
        done = sum(1 for r in _records(lines) if r.get("event") == "request")
        if done >= request_count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """Start a server, send a mix of good, bad and failing requests, and collect the log window."""
    tmp = tmp_path_factory.mktemp("logs")
    url = f"sqlite:///{tmp / 'tunefit.sqlite3'}"
    port = free_port()
    env = base_env(TUNEFIT_DATABASE_URL=url, TUNEFIT_LOG_LEVEL="INFO")
    with running(serve_argv(port), env, port, tmp / "server.log", tmp) as server, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        offset = len(server.log_text())  # the window starts after start-up's own lines
        exchanges = [
            _send(client, "GET", "/healthz"),
            _send(client, "GET", ESTIMATE),
            _send(client, "POST", "/api/estimate", json={"model": "llama-3.1-8b", "gpu": "no-such-card"}),
            _send(client, "GET", "/api/estimate?model=llama-3.1-8b&batch_size=0"),
            _send(client, "GET", "/healthz", headers={"X-Request-ID": "deploy-test-0001"}),
            _send(client, "GET", "/healthz", headers={"X-Request-ID": 'forged" "status":200'}),
        ]
        _break_catalog(str(make_url(url).database))
        exchanges.append(_send(client, "GET", "/api/gpus"))
        lines = _wait_for_lines(server, offset, len(exchanges))
    yield Session(exchanges, lines)


def test_the_requests_got_the_statuses_the_contract_names(logged: Session) -> None:
    """The mix really covers success, 404, 422 and a server-side failure."""
    assert [e.status for e in logged.exchanges[:6]] == [200, 200, 404, 422, 200, 200]
    assert logged.exchanges[-1].status >= 500, logged.exchanges[-1].body
    assert logged.exchanges[4].request_id == "deploy-test-0001", "a sane incoming X-Request-ID is echoed"
    assert '"' not in logged.exchanges[5].request_id, "a forged X-Request-ID must not be echoed"


def test_one_json_line_per_request_with_its_id(logged: Session) -> None:
    """Each request has exactly one structured line, carrying the id its response carried."""
    requests = [r for r in _records(logged.lines) if r.get("event") == "request"]
    assert len(requests) == len(logged.exchanges), requests
    by_id = {r["request_id"]: r for r in requests}
    for exchange in logged.exchanges:
        record = by_id[exchange.request_id]
        assert (record["method"], record["path"], record["status"]) == (
            exchange.method, exchange.path, exchange.status)
        assert isinstance(record["ms"], int | float) and record["ms"] >= 0
    # uvicorn's own plain access line would be a second, unstructured line per request.
    plain = [line for line in logged.lines if "HTTP/1.1" in line and not line.lstrip().startswith("{")]
    assert not plain, plain


def test_server_error_is_logged_with_the_id_the_response_carries(logged: Session) -> None:
    """A 5xx response's X-Request-ID (and body request_id, if any) is on a JSON error line with the cause."""
    failed = logged.exchanges[-1]
    if isinstance(failed.body, dict) and "request_id" in failed.body:
        assert failed.body["request_id"] == failed.request_id
    errors = [r for r in _records(logged.lines)
              if r.get("level") in ("error", "critical") and r.get("request_id") == failed.request_id]
    assert errors, f"no error line names request {failed.request_id}:\n" + "\n".join(logged.lines)
    # The cause must be in the log, since the response deliberately does not show it.
    assert "no such table" in json.dumps(errors), errors


def test_every_line_logged_while_serving_is_json(logged: Session) -> None:
    """Log shippers need one JSON object per line: no bare traceback lines while serving requests."""
    bare = [line for line in logged.lines if line.strip() and not line.lstrip().startswith("{")]
    assert not bare, "unstructured log lines while serving:\n" + "\n".join(bare[:20])
