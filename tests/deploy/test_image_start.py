"""The image's start command, settings and HEALTHCHECK, run for real on a laid-out copy of the image."""

from __future__ import annotations

import csv
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from deploy_dockerfile import REPO
from deploy_image import Image, build, snapshot
from deploy_server import LOOPBACK, free_port, running
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.timeout(120)

ESTIMATE = ("/api/estimate?model=llama-3.1-8b&method=qlora&gpu=rtx-4090&batch_size=4&seq_len=512"
            "&dataset_samples=5000&epochs=3")


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    """The image laid out from the Dockerfile (removed afterwards)."""
    built = build()
    try:
        yield built
    finally:
        shutil.rmtree(built.root, ignore_errors=True)


def _seed_gpu_slugs() -> set[str]:
    with (REPO / "data" / "gpus.csv").open(newline="", encoding="utf-8") as handle:
        return {row["slug"] for row in csv.DictReader(handle)}


def _healthcheck(image: Image, env: dict[str, str]) -> int:
    assert image.healthcheck is not None
    done = subprocess.run(["sh", "-c", image.healthcheck], env=env, cwd=image.workdir, user=image.uid,
                          group=image.uid, extra_groups=[] if image.uid is not None else None,
                          capture_output=True, timeout=20)
    return done.returncode


def test_image_cmd_serves_the_seeded_catalog(image: Image, tmp_path: Path) -> None:
    """CMD with the image's ENV migrates, seeds, serves; HEALTHCHECK passes; SIGTERM stops it cleanly."""
    port = free_port()
    # Loopback instead of the image's 0.0.0.0 (tests bind nothing public); the compose default of an
    # empty admin token is kept so the test also proves that an empty token refuses writes.
    env = {**image.path_env(), "HOST": LOOPBACK, "PORT": str(port), "TUNEFIT_ADMIN_TOKEN": ""}
    database = Path(str(make_url(env["TUNEFIT_DATABASE_URL"]).database))
    assert image.workdir in database.parents, "the image's SQLite file must live inside its WORKDIR"
    writable = database.parent
    before = snapshot(image.workdir, skip=writable)

    with running(image.cmd, env, port, tmp_path / "server.log", image.workdir, timeout=60,
                 user=image.uid) as server:
        health = httpx.get(server.url + "/healthz", timeout=5)
        assert health.status_code == 200 and health.headers.get("x-request-id")

        gpus = httpx.get(server.url + "/api/gpus", timeout=10)
        assert gpus.status_code == 200, gpus.text
        rows = gpus.json()
        rows = rows.get("gpus", rows) if isinstance(rows, dict) else rows
        assert {row["slug"] for row in rows} == _seed_gpu_slugs()
        priced = [p for row in rows for p in row.get("prices", [])]
        assert priced and all(p["observed_on"] and p["source"] for p in priced)

        estimate = httpx.get(server.url + ESTIMATE, timeout=30)
        assert estimate.status_code == 200, estimate.text
        assert estimate.json()["time"]["steps"] == 3750 and estimate.json()["cost"]["options"]

        page = httpx.get(server.url + "/", timeout=10)
        assert page.status_code == 200 and "<form" in page.text, "the web page is not served from the image"
        for asset in sorted(p for p in (REPO / "static").rglob("*") if p.is_file()):
            src = "/" + asset.relative_to(REPO).as_posix()
            assert httpx.get(server.url + src, timeout=5).status_code == 200, f"{src} is missing in the image"

        # The compose file's default TUNEFIT_ADMIN_TOKEN is empty: that must mean "writes refused".
        write = httpx.post(server.url + "/api/admin/prices", headers={"Authorization": "Bearer"}, json={},
                           timeout=5)
        assert write.status_code in (401, 403), write.text

        assert _healthcheck(image, env) == 0
        assert database.exists(), "TUNEFIT_DATABASE_URL from the image's ENV was not used"
        status = server.stop()

    # uvicorn shuts down gracefully, then re-raises SIGTERM (exit 143 in Docker); None = had to be killed.
    assert status in (0, -signal.SIGTERM), f"`docker stop` (SIGTERM) did not end the server cleanly: {status}"
    assert "Application shutdown complete" in server.log_text()
    assert _healthcheck(image, env) != 0, "the HEALTHCHECK passes with no server: it checks nothing"
    after = snapshot(image.workdir, skip=writable)
    assert after == before, f"the app wrote outside its data folder: {set(after) ^ set(before)}"
    if image.uid is not None:
        assert database.stat().st_uid == image.uid, "the server did not run as the image's non-root user"


def test_image_builds_the_c_replay(image: Image) -> None:
    """The image's `pip install` compiles the C allocator replay (its gcc step), not the slow fallback."""
    probe = "from app.core import trace; print(trace._replay is not None)"
    done = subprocess.run(
        [str(image.venv / "bin" / "python"), "-c", probe],
        env=image.path_env(), cwd=image.workdir, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
