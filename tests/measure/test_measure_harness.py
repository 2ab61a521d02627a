"""The measure harness's real code path on the CPU (a tiny llama); its CUDA-only parts where a GPU exists."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the measure extra (torch) is not installed")
pytest.importorskip("transformers", reason="the measure extra (transformers) is not installed")
pytest.importorskip("peft", reason="the measure extra (peft) is not installed")

from app.measure import cli  # noqa: E402
from app.measure.model_build import build_checkpoint  # noqa: E402
from app.measure.nvml import NvmlSampler  # noqa: E402
from app.measure.spec import SpecError, load_plan, spec_from_fields  # noqa: E402
from app.measure.worker import run_one  # noqa: E402

HERE = Path(__file__).parent
TINY = HERE / "tiny-llama.json"
DOC = (HERE.parents[1] / "docs" / "calibration-format.md").read_text()
HAS_CUDA = torch.cuda.is_available()
# tiny-llama.json: hidden 64, 2 layers, 4 heads x 16, 2 kv heads, MLP 128, vocab 512, untied.
TINY_PARAMS = 2 * 512 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
TINY_LORA_QV_R16 = 2 * (16 * (64 + 64) + 16 * (64 + 32))


def tiny_cfg() -> dict:
    return json.loads(TINY.read_text())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_checkpoint(tiny_cfg(), path, "cpu")
    return path


def run(ckpt: Path, **fields) -> dict:
    base = {"model_config": tiny_cfg(), "seq_len": 32, "batch_size": 2, "steps": 3}
    spec = spec_from_fields({**base, **fields})
    return run_one(spec, ckpt, use_cuda=False, meta={"run_id": "t-001", "batch": "t"})


def test_spec_rejects_bad_fields_naming_them() -> None:
    with pytest.raises(SpecError) as e:
        spec_from_fields({"model_config": tiny_cfg(), "method": "prefix"})
    assert e.value.field == "method"
    with pytest.raises(SpecError) as e:
        spec_from_fields({"model_config": tiny_cfg(), "method": "lora", "batch_size": 0})
    assert e.value.field == "batch_size"
    with pytest.raises(SpecError) as e:
        spec_from_fields({"model": "no-such-model", "method": "lora"})
    assert e.value.field == "model" and "llama-3.2-1b" in e.value.message


def test_spec_defaults_follow_the_api() -> None:
    s = spec_from_fields({"model": "llama-3.2-1b", "method": "lora", "lora_rank": 8,
                          "lora_targets": "q_proj, v_proj"})
    assert (s.precision, s.optimizer, s.batch_size, s.seq_len, s.gradient_checkpointing) == (
        "bf16", "adamw", 1, 2048, True)
    assert s.alpha == 16 and s.lora_targets == ("q_proj", "v_proj")
    assert s.model_config["vocab_size"] == 128256 and s.model_config_source == "data/models/llama-3.2-1b.json"


def test_every_committed_plan_is_valid() -> None:
    plans = sorted((HERE.parents[1] / "data" / "calibration" / "plans").glob("*.json"))
    assert plans
    for p in plans:
        name, specs, raw = load_plan(p)
        assert name == raw["batch"] and len(specs) == len(raw["runs"])


@pytest.mark.parametrize(
    ("fields", "trainable"),
    [
        ({"method": "full", "optimizer": "adamw"}, TINY_PARAMS),
        ({"method": "full", "optimizer": "sgd", "gradient_checkpointing": False, "attention": "eager"},
         TINY_PARAMS),
        ({"method": "full", "optimizer": "adafactor", "precision": "amp_bf16"}, TINY_PARAMS),
        ({"method": "lora"}, TINY_LORA_QV_R16),
        ({"method": "lora", "gc_use_reentrant": True, "lora_rank": 4, "lora_targets": "all-linear"},
         2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))),
    ],
)
def test_cpu_run_trains_and_counts(ckpt: Path, fields: dict, trainable: int) -> None:
    line = run(ckpt, **fields)
    assert line["status"] == "ok", line.get("traceback")
    assert line["params_total"] == TINY_PARAMS
    assert line["params_trainable"] == trainable
    assert len(line["losses"]) == 3 and all(math.isfinite(x) for x in line["losses"])
    assert abs(line["losses"][0] - math.log(512)) < 1.0  # random weights: near-uniform over the vocab
    assert len(line["step_times_s"]) == 2
    assert line["tokens_per_s"] == pytest.approx(2 * 32 / line["median_step_s"], rel=1e-3)
    assert set(line["stages"]) == {"load", "peft", "forward", "backward", "optimizer_step", "zero_grad"}
    assert line["torch_peak_allocated"] is None and line["nvml_peak_used"] is None  # no CUDA here


def test_cpu_run_records_settings_as_built(ckpt: Path) -> None:
    line = run(ckpt, method="lora", lora_targets="q_proj,k_proj", precision="amp_bf16")
    s = line["settings"]
    assert s["lora_modules"] == ["k_proj", "q_proj"] and s["lora_dropout"] == 0.0
    assert s["load_dtype"] == "float32" and s["autocast_dtype"] == "bfloat16"
    assert s["optimizer"]["class"] == "torch.optim.adamw.AdamW" and s["optimizer"]["kwargs"]["lr"] == 1e-5
    assert s["gradient_checkpointing_kwargs"] == {"use_reentrant": False}


def test_a_failing_run_is_recorded_not_raised(ckpt: Path) -> None:
    line = run(ckpt, method="lora", lora_targets="no_such_proj")
    assert line["status"] == "error" and line["failed_stage"] == "peft"
    assert "no_such_proj" in line["error"]


def test_an_out_of_memory_run_is_recorded_as_oom(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real OOM needs a GPU; here the loss raises the error CUDA's allocator raises (a stand-in for
    # the card running out), so the real worker's bookkeeping for it is exercised on the CPU.
    import torch

    def out_of_memory(*_args: object, **_kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", out_of_memory)
    line = run(ckpt, method="full")
    assert line["status"] == "oom" and line["failed_stage"] == "forward"
    assert line["error"].startswith("CUDA out of memory")
    assert line["step_times_s"] == [] and line["tokens_per_s"] is None
    assert line["params_total"] == TINY_PARAMS  # what was known before the failure is kept


def test_cli_runs_a_plan_each_run_in_its_own_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({
        "batch": "cpu-test",
        "defaults": {"model_config": str(TINY), "seq_len": 16, "batch_size": 1, "steps": 2},
        "runs": [{"method": "full"}, {"method": "lora", "gradient_checkpointing": False}],
    }))
    out = tmp_path / "out.jsonl"
    rc = cli.main(["--plan", str(plan), "--device", "cpu", "--out", str(out),
                   "--workdir", str(tmp_path / "w")])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["run_id"] for x in lines] == ["cpu-test-001", "cpu-test-002"]
    assert all(x["status"] == "ok" for x in lines)
    pids = {x["pid"] for x in lines}
    assert len(pids) == 2 and os.getpid() not in pids
    assert lines[0]["command"].startswith("tunefit measure --plan")
    assert "totals: {'ok': 2}" in capsys.readouterr().out
    assert not any((tmp_path / "w").iterdir())  # the random checkpoint is deleted after its runs
    # Resuming skips what is done.
    rc = cli.main(["--plan", str(plan), "--device", "cpu", "--out", str(tmp_path / "again.jsonl"),
                   "--skip-done", str(out), "--workdir", str(tmp_path / "w")])
    assert rc == 0 and not (tmp_path / "again.jsonl").exists()


def test_cli_single_run_in_a_fresh_interpreter(tmp_path: Path) -> None:
    out = tmp_path / "one.jsonl"
    rc = cli.main(["--model-config", str(TINY), "--method", "lora", "--seq-len", "16", "--steps", "2",
                   "--no-gradient-checkpointing", "--device", "cpu", "--isolation", "spawn",
                   "--out", str(out), "--workdir", str(tmp_path / "w")])
    assert rc == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["status"] == "ok" and line["isolation"] == "spawn" and line["batch"] == "adhoc"
    assert line["gradient_checkpointing"] is False and line["model_config"] == tiny_cfg()


def test_every_field_of_a_line_is_documented(ckpt: Path) -> None:
    line = run(ckpt, method="lora", lora_targets="nope")  # an error line carries `traceback` too
    line.update(run(ckpt, method="lora"))
    missing = [k for k in line if f"`{k}`" not in DOC]
    assert not missing, f"document these fields in docs/calibration-format.md: {missing}"


class _FakeNvml(types.SimpleNamespace):
    """A stand-in for pynvml: used memory follows a script of readings."""


def test_nvml_sampler_keeps_the_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([100, 300, 250, 900, 400] + [400] * 10_000)

    class Info:
        def __init__(self, used: int) -> None:
            self.used, self.total = used, 10_000

    fake = _FakeNvml(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i, nvmlMemory_v2=2,
        nvmlDeviceGetMemoryInfo=lambda h, version=None: Info(next(readings)),
        nvmlDeviceGetName=lambda h: b"Fake GPU", nvmlSystemGetDriverVersion=lambda: "1.0")
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    s = NvmlSampler(0, interval_s=0.0001)
    assert s.api == "v2"
    s.start()
    while s.samples < 5:
        pass
    assert s.stop() == 900
    assert s.device_facts() == {"gpu_name": "Fake GPU", "driver": "1.0", "nvml_api": "v2"}


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (memory readings, NVML, bitsandbytes)")
def test_cuda_run_measures_memory(ckpt: Path) -> None:
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    spec = spec_from_fields({"model_config": tiny_cfg(), "method": "full", "seq_len": 64, "steps": 3})
    line = run_one(spec, ckpt, use_cuda=True, meta={"run_id": "gpu-001"})
    assert line["status"] == "ok", line.get("traceback")
    assert line["cuda_context_bytes"] > 0
    assert line["nvml_peak_used"] - line["nvml_baseline_used"] >= line["torch_peak_reserved"]
    assert line["torch_peak_reserved"] >= line["torch_peak_allocated"] > 0
    assert line["stages"]["optimizer_step"]["allocated"] > line["stages"]["load"]["allocated"]
    assert re.match(r"\d+\.\d+", line["cuda_capability"])
