"""A batch of runs: one random checkpoint per model, each run in its own process, one JSON line per run."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.measure.spec import REPO_ROOT, RunSpec

# Ask NVML, not the CUDA driver, whether a GPU exists: the parent must never initialise CUDA, so that
# forked children each create their own fresh context.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # runs load local checkpoints only; never wait on a network

Log = Callable[[str], None]
GIB = 2**30


def default_workdir() -> Path:
    """Where random checkpoints are written (TUNEFIT_MEASURE_WORKDIR, else the temp dir)."""
    return Path(os.environ.get("TUNEFIT_MEASURE_WORKDIR") or tempfile.gettempdir()) / "tunefit-measure"


def cuda_present() -> bool:
    """Whether a CUDA GPU is usable, asked without creating a CUDA context in this process."""
    import torch

    return torch.version.cuda is not None and torch.cuda.is_available()


# Modules the fork server imports once; every run is forked from that clean process, so runs skip the
# imports but each creates its own CUDA context. peft is left out: importing it imports bitsandbytes,
# whose import initialises CUDA, and a forked child cannot use a CUDA context made before the fork.
PRELOAD = ["torch", "transformers", "transformers.models.auto.modeling_auto", "app.measure.worker"]


def _fork_context() -> Any:
    """A fork-server context: runs fork from a fresh process, never from this (possibly busy) one."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _build_child(config: dict[str, Any], out_dir: str, device: str, result_path: str) -> None:
    from app.measure.model_build import build_checkpoint

    facts = build_checkpoint(config, Path(out_dir), device)
    Path(result_path).write_text(json.dumps(facts))


def _in_child(target: Callable[..., None], args: tuple[Any, ...], result_path: Path, isolation: str,
              timeout_s: float, job: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, str]:
    """Run target(*args) in a fresh process; return (its result JSON or None, why not)."""
    result_path.unlink(missing_ok=True)
    if isolation == "spawn" and job is not None:
        job_path = result_path.with_suffix(".job.json")
        job_path.write_text(json.dumps({**job, "result_path": str(result_path)}))
        try:
            proc = subprocess.run([sys.executable, "-m", "app.measure.worker", str(job_path)],
                                  cwd=REPO_ROOT, timeout=timeout_s, check=False)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            return None, f"timeout after {timeout_s:.0f} s"
    else:
        p = _fork_context().Process(target=target, args=args)
        p.start()
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
            p.join()
            return None, f"timeout after {timeout_s:.0f} s"
        code = p.exitcode
    if result_path.is_file():
        return json.loads(result_path.read_text()), ""
    return None, f"worker process exited with code {code} and wrote no result"


def _group(todo: list[tuple[int, RunSpec]]) -> list[tuple[str, list[tuple[int, RunSpec]]]]:
    groups: dict[str, list[tuple[int, RunSpec]]] = {}
    for i, s in todo:
        groups.setdefault(s.checkpoint_key(), []).append((i, s))
    return list(groups.items())


def _append(out: Path, line: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(json.dumps(line, sort_keys=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _describe(line: dict[str, Any]) -> str:
    peak = line.get("nvml_peak_used")
    base = line.get("nvml_baseline_used") or 0
    reserved = line.get("torch_peak_reserved")
    mem = f"{(peak - base) / GIB:7.2f} GiB" if peak else (
        f"{reserved / GIB:7.2f} GiB(r)" if reserved else "      -    ")
    tps = f"{line['tokens_per_s']:>10.0f} tok/s" if line.get("tokens_per_s") else " " * 16
    why = "" if line["status"] == "ok" else f"  [{line.get('failed_stage')}: {str(line.get('error'))[:80]}]"
    return (f"{line['run_id']:<28} {line['status']:<5} {mem} {tps}  {line.get('model')} {line['method']} "
            f"{line['precision']} {line['optimizer']} b{line['batch_size']} s{line['seq_len']} "
            f"gc={int(line['gradient_checkpointing'])} {line['attention']}"
            + (f" r{line['lora_rank']} {','.join(line['lora_targets'])}" if line["method"] != "full" else "")
            + why)


def run_batch(name: str, specs: list[RunSpec], out: Path, command: str, *, device: str = "auto",
              isolation: str = "fork", workdir: Path | None = None, deadline_s: float | None = None,
              run_timeout_s: float = 600.0, keep_checkpoints: bool = False,
              skip_run_ids: set[str] | frozenset[str] = frozenset(),
              log: Log = print) -> list[dict[str, Any]]:
    """Run every spec (grouped by model), appending one JSON line per run to `out`; return the lines."""
    t_batch = time.monotonic()
    use_cuda = cuda_present() if device == "auto" else device == "cuda"
    workdir = workdir or default_workdir()
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="tunefit-runs-"))
    lines: list[dict[str, Any]] = []
    todo = [(i, s) for i, s in enumerate(specs) if f"{name}-{i + 1:03d}" not in skip_run_ids]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    dev = "cuda" if use_cuda else "cpu"
    log(f"batch {name}: {len(todo)} of {len(specs)} runs to do, device={dev}, isolation={isolation}")
    for key, group in _group(todo):
        if deadline_s is not None and time.monotonic() - t_batch > deadline_s:
            break
        ckpt = workdir / key
        from app.measure.model_build import checkpoint_ready

        if not checkpoint_ready(ckpt):
            facts, why = _in_child(_build_child, (group[0][1].model_config, str(ckpt),
                                                  "cuda" if use_cuda else "cpu", str(scratch / "ckpt.json")),
                                   scratch / "ckpt.json", "fork", run_timeout_s)
            log(f"checkpoint {key}: {facts or why}")
            ckpt_error = "" if facts else f"random checkpoint could not be built: {why}"
        else:
            ckpt_error = ""
        for idx, spec in group:
            if deadline_s is not None and time.monotonic() - t_batch > deadline_s:
                break
            meta = {"run_id": f"{name}-{idx + 1:03d}", "batch": name, "command": command,
                    "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
                    "batch_started": stamp, "isolation": isolation}
            res = scratch / f"{uuid.uuid4().hex}.json"
            job = {"spec": spec.inputs(), "ckpt": str(ckpt), "use_cuda": use_cuda, "meta": meta}
            from app.measure.worker import child_entry

            line, why = None, ckpt_error
            if not ckpt_error and spec.num_gpus > 1:
                from app.measure.distributed import launch

                line, why = launch(job, res, run_timeout_s)
            elif not ckpt_error:
                line, why = _in_child(child_entry, (spec.inputs(), str(ckpt), use_cuda, meta, str(res)),
                                      res, isolation, run_timeout_s, job)
            if line is None:
                line = {"schema_version": 1, **meta, **spec.inputs(), "status": "error", "error": why,
                        "failed_stage": "process"}
            _append(out, line)
            lines.append(line)
            log(_describe(line))
        if not keep_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    if len(lines) < len(todo):
        log(f"deadline reached: {len(todo) - len(lines)} runs not started")
    log(f"batch {name}: {len(lines)} lines written to {out} in {time.monotonic() - t_batch:.0f} s")
    return lines


def summary(lines: list[dict[str, Any]]) -> str:
    """A short table of a batch's results, one row per run."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line["status"]] = counts.get(line["status"], 0) + 1
    head = "run_id                       status  nvml-base        tok/s  setup"
    return "\n".join([head, *(_describe(x) for x in lines), f"totals: {counts}"])
