"""A real uvicorn on a free port over a temp SQLite database, and Debian's headless Chromium."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.migrate import prepare_database
from tests.conftest import missing_part
from tests.deploy.deploy_server import LOOPBACK, free_port, running

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of `uvicorn app.main:app` in a subprocess, on a migrated, seeded SQLite file."""
    db = tmp_path_factory.mktemp("browser-db") / "tunefit.sqlite3"
    url = f"sqlite:///{db}"
    prepare_database(url)
    port = free_port()
    env = {**os.environ, "TUNEFIT_DATABASE_URL": url}
    argv = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", LOOPBACK, "--port", str(port)]
    log = tmp_path_factory.mktemp("browser-log") / "uvicorn.log"
    with running(argv, env, port, log, ROOT, timeout=30) as served:
        yield served.url


ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Any]:
    """Playwright's driver (its package only: the browser is Debian's, never a downloaded build)."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing_part("browser tests", f"{CHROMIUM} is not installed (make test's set-up installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        missing_part("browser tests", f"the playwright package is missing: {exc}")
        raise
    with sync_playwright() as pw:
        yield pw


@pytest.fixture
def open_browser(playwright_driver: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """open_browser(**context options) -> a Chromium context on a fresh --user-data-dir; closed after."""
    contexts: list[Any] = []

    def launch(**options: Any) -> Any:
        # Playwright passes a profile directory as user_data_dir (it refuses --user-data-dir in args).
        profile = tmp_path_factory.mktemp("chromium-profile")
        ctx = playwright_driver.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=ARGS, headless=True, **options
        )
        contexts.append(ctx)
        return ctx

    yield launch
    for ctx in contexts:
        ctx.close()


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go (gitignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
