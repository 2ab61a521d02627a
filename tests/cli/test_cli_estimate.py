"""`tunefit estimate|serve|catalog|measure`: the same answers as the API, clear errors, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.cli import main
from app.config import Settings
from app.main import create_app
from tests.api.apihelp import prepare_database
from tests.deploy.deploy_server import free_port, running, serve_argv

TUNEFIT = Path(sys.executable).parent / "tunefit"
MODELS_DIR = Path(__file__).resolve().parents[2] / "data" / "models"
ARGS = ["--model", "llama-3.1-8b", "--method", "qlora", "--gpu", "rtx-4090", "--batch-size", "4",
        "--seq-len", "512"]
SAME_AS_API = {"model": "llama-3.1-8b", "method": "qlora", "gpu": "rtx-4090", "batch_size": 4, "seq_len": 512}


@pytest.fixture
def db_env(sqlite_url: str, settings_database: Callable[[str], str]) -> str:
    """TUNEFIT_DATABASE_URL pointing at a fresh (not yet migrated) SQLite file, for in-process main()."""
    return settings_database(sqlite_url)


def api_answer(url: str, fields: dict[str, Any]) -> dict[str, Any]:
    """What POST /api/estimate answers for `fields` on the database at `url`."""
    with TestClient(create_app(Settings(database_url=url))) as client:
        r = client.post("/api/estimate", json=fields)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv) in-process: exit status, stdout, stderr."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_json_is_the_api_response(db_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--json` prints exactly what the API answers (it migrates and seeds a fresh database first)."""
    code, out, _ = run_main(["estimate", *ARGS, "--json"], capsys)
    assert code == 0
    printed = json.loads(out)
    assert printed == api_answer(db_env, SAME_AS_API)
    assert printed["memory"]["fits"] is True


def test_every_api_field_has_a_kebab_case_flag(db_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Lists comma-separated, booleans as --x/--no-x, numbers as text: the same request as the API's."""
    argv = [*ARGS, "--lora-targets", "q_proj,k_proj,v_proj", "--gradient-checkpointing",
            "--lora-rank", "32", "--lora-alpha", "16", "--dataset-samples", "5000", "--epochs", "3",
            "--grad-accum", "2", "--tokens-per-sample", "400", "--precision", "bf16", "--optimizer",
            "paged_adamw_8bit", "--attention", "sdpa", "--no-double-quant", "--num-gpus", "1",
            "--parallelism", "ddp", "--budget-usd", "2500", "--electricity-usd-per-kwh", "0.3",
            "--owned-gpu", "rtx-4090", "--ranking"]
    code, out, err = run_main(["estimate", *argv, "--json"], capsys)
    assert code == 0, err
    fields = {**SAME_AS_API, "lora_targets": ["q_proj", "k_proj", "v_proj"], "gradient_checkpointing": True,
              "lora_rank": 32, "lora_alpha": 16, "dataset_samples": 5000, "epochs": 3, "grad_accum": 2,
              "tokens_per_sample": 400, "precision": "bf16", "optimizer": "paged_adamw_8bit",
              "attention": "sdpa", "double_quant": False, "num_gpus": 1, "parallelism": "ddp",
              "budget_usd": 2500, "electricity_usd_per_kwh": 0.3, "owned_gpu": "rtx-4090", "ranking": True}
    assert json.loads(out) == api_answer(db_env, fields)
    assert json.loads(out)["time"]["steps"] == 5000 // (4 * 2) * 3


def test_model_config_from_a_file(db_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--model-config PATH` estimates an offline config.json like the catalog model it is."""
    argv = [a for a in ARGS if a not in ("--model", "llama-3.1-8b")]
    code, out, err = run_main(["estimate", *argv, "--model-config", str(MODELS_DIR / "llama-3.1-8b.json"),
                               "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["memory"] == api_answer(db_env, SAME_AS_API)["memory"]


def test_text_output_summarises(db_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --json: peak memory, the fit, the recommendation, in lines people read."""
    code, out, _ = run_main(["estimate", *ARGS, "--dataset-samples", "5000", "--epochs", "3"], capsys)
    assert code == 0
    assert "peak memory:" in out and "fits" in out
    assert "3,750 optimizer steps" in out
    assert "recommendation: qlora on 1× rtx-4090 (local)" in out


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--batch-size", "0"], "--batch-size"), (["--seq-len", "-1"], "--seq-len"),
     (["--lora-targets", "q_proj,nope_proj"], "--lora-targets")],
)
def test_bad_values_name_the_flag(
    db_env: str, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    """Exit 2 with the offending flag named, nothing on stdout."""
    code, out, err = run_main(["estimate", *ARGS, *argv], capsys)
    assert code == 2
    assert flag in err and out == ""


def test_bad_choice_is_rejected_by_argparse(db_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An enum flag lists its choices."""
    with pytest.raises(SystemExit) as exc:
        main(["estimate", *ARGS, "--method", "foo"])
    assert exc.value.code == 2
    assert "full" in capsys.readouterr().err


def test_unknown_model_suggests(db_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 1 with the closest slugs."""
    code, _, err = run_main(["estimate", "--model", "llama-3.1-8"], capsys)
    assert code == 1
    assert "did you mean: llama-3.1-8b" in err


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """`tunefit --help` names serve, estimate, measure and catalog."""
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("serve", "estimate", "measure", "catalog"))


def test_catalog_subcommands_are_wired(db_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`tunefit catalog load` then `list gpus --json` go to app.catalog_cli."""
    assert main(["catalog", "load"]) == 0
    capsys.readouterr()
    assert main(["catalog", "list", "gpus", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "rtx-4090" in json.dumps(listed)


def test_measure_is_delegated(capsys: pytest.CaptureFixture[str]) -> None:
    """`tunefit measure --help` is the harness's own help."""
    with pytest.raises(SystemExit) as exc:
        main(["measure", "--help"])
    assert exc.value.code == 0
    assert "--lora-targets" in capsys.readouterr().out


def test_console_script_prints_the_api_json(sqlite_url: str) -> None:
    """The installed `tunefit` script, as a user runs it, on a temporary database."""
    env = {**os.environ, "TUNEFIT_DATABASE_URL": sqlite_url}
    done = subprocess.run([str(TUNEFIT), "estimate", *ARGS, "--json"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == api_answer(sqlite_url, SAME_AS_API)


@pytest.mark.timeout(90)
def test_serve_migrates_seeds_and_serves(tmp_path: Path) -> None:
    """`tunefit serve` on an empty database: migrates, loads the seed, answers /healthz and estimates."""
    url = f"sqlite:///{tmp_path / 'served.sqlite3'}"
    port = free_port()
    env = {**os.environ, "TUNEFIT_DATABASE_URL": url}
    with running(serve_argv(port), env, port, tmp_path / "serve.log", Path.cwd(), timeout=60) as server:
        health = httpx.get(server.url + "/healthz", timeout=10)
        assert health.json()["status"] == "ok"
        r = httpx.get(server.url + "/api/estimate", params={k: str(v) for k, v in SAME_AS_API.items()},
                      timeout=10)
        assert r.status_code == 200 and r.json()["memory"]["fits"] is True
    lines = [ln for ln in (tmp_path / "serve.log").read_text().splitlines() if ln.strip()]
    assert lines and all(ln.lstrip().startswith("{") for ln in lines), "every log line is JSON"
    assert prepare_database(url) == url  # already at head and seeded: a no-op
