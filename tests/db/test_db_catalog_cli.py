"""`tunefit catalog load | import-prices | import-gpus | list` against a real database."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from dbhelp import DATA_DIR

from app.cli import main


@pytest.fixture
def cli_db(db_url: str, settings_database: Callable[[str], str]) -> str:
    """Point the CLI's settings at a fresh database (migrated by the commands themselves)."""
    return settings_database(db_url)


def _rows(name: str) -> int:
    return len((DATA_DIR / name).read_text().splitlines()) - 1  # minus the header


def test_load_twice_then_list(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["catalog", "load"]) == 0
    first = capsys.readouterr().out
    assert f"gpus: {_rows('gpus.csv')} inserted" in first
    assert f"models: {_rows('models.csv')} inserted" in first
    assert main(["catalog", "load"]) == 0
    assert f"prices: 0 inserted, 0 updated, {_rows('prices.csv')} unchanged" in capsys.readouterr().out
    assert main(["catalog", "list", "models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"llama-3.1-70b", "qwen3-30b-a3b"} <= {m["slug"] for m in listed["models"]}
    assert listed["last_updated"]


def test_import_prices_reports_lines_and_exit_status(
    cli_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["catalog", "load"]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "gpu_slug,provider,kind,usd_per_gpu_hour,observed_on,source,note\n"
        "rtx-3090,vast.ai,spot,0.17,2026-09-01,https://example.org/vast,\n"
        "rtx-3090,vast.ai,sometimes,0.17,2026-09-02,https://example.org/vast,\n"
    )
    assert main(["catalog", "import-prices", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "line 3: kind:" in err and "nothing was imported" in err
    good = tmp_path / "good.csv"
    good.write_text("\n".join(bad.read_text().splitlines()[:2]) + "\n")
    assert main(["catalog", "import-prices", str(good)]) == 0
    assert "prices: 1 inserted" in capsys.readouterr().out
