"""A short, bounded run of scripts/loadtest.py: estimate keeps up with /healthz, and nothing fails."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from deploy_dockerfile import REPO

pytestmark = pytest.mark.timeout(120)


def test_estimate_reaches_half_of_healthz_throughput_without_errors() -> None:
    """GET /api/estimate (GPU + dataset) does at least half the req/s of GET /healthz on one uvicorn."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "loadtest.py"), "--json",
         "--rounds", "4", "--duration", "1.5", "--warmup", "1", "--ceiling", "1.5"],
        capture_output=True, text=True, timeout=110, cwd=REPO,
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    report = json.loads(done.stdout)
    health, estimate = report["phases"]
    assert report["estimate_check"]["steps"] == 3750, "the load hit something other than the real estimate"
    assert health["errors"] == 0 and estimate["errors"] == 0, (health["statuses"], estimate["statuses"])
    assert health["requests"] > 500, f"/healthz barely ran: {health}"
    # The generator must not be what limits /healthz, or the ratio would flatter /api/estimate.
    assert report["ceiling"]["rps"] > 3 * health["rps"], (report["ceiling"], health)
    assert report["ratio"] >= 0.5, f"estimate {estimate['rps']} req/s vs healthz {health['rps']} req/s"
    assert done.returncode == 0, done.stdout
