"""`tunefit measure`: the API's fields as kebab-case flags (one run), or --plan FILE (a batch of runs)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from app.core.setup import ATTENTIONS, METHODS, OPTIMIZERS, PARALLELISMS, PRECISIONS, TrainingSetup
from app.measure.spec import RunSpec, SpecError

_D = TrainingSetup  # the API's defaults are the core's


def build_parser(prog: str = "tunefit measure") -> argparse.ArgumentParser:
    """The argument parser of `tunefit measure`."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run real fine-tuning steps on this machine's GPU and append one JSON line per run "
                    "(format: docs/calibration-format.md). Needs the extra tunefit[measure].")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="catalog slug (data/models/<slug>.json or data/calibration/configs/)")
    src.add_argument("--model-config", type=Path, help="a Hugging Face config.json file")
    src.add_argument("--plan", type=Path, help="a JSON/YAML batch: {batch, defaults, runs: [{field: value}]}")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--precision", choices=PRECISIONS, default=_D.precision)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=_D.optimizer)
    p.add_argument("--batch-size", type=int, default=_D.batch_size)
    p.add_argument("--seq-len", type=int, default=_D.seq_len)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=_D.gradient_checkpointing)
    p.add_argument("--attention", choices=ATTENTIONS, default=_D.attention)
    p.add_argument("--lora-rank", type=int, default=_D.lora_rank)
    p.add_argument("--lora-alpha", type=int, default=None, help="default: 2 x rank")
    p.add_argument("--lora-targets", default=",".join(_D.lora_targets), help="module names or all-linear")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=_D.double_quant)
    p.add_argument("--num-gpus", type=int, default=_D.num_gpus)
    p.add_argument("--parallelism", choices=PARALLELISMS, default=_D.parallelism)
    p.add_argument("--steps", type=int, default=RunSpec.steps,
                   help="optimizer steps; the first is the untimed warm-up")
    p.add_argument("--gc-reentrant", action="store_true", help="reentrant GC (default: non-reentrant)")
    p.add_argument("--out", type=Path, default=Path("measure.jsonl"), help="JSONL file to append to")
    p.add_argument("--batch", dest="batch_name", default=None, help="default: the plan's, or adhoc")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--isolation", choices=("fork", "spawn"), default="fork",
                   help="fork: from a fork server (imports shared, CUDA fresh); spawn: a fresh interpreter")
    p.add_argument("--workdir", type=Path, default=None, help="where random checkpoints go (deleted after)")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--deadline-s", type=float, default=None, help="start no new run after this many seconds")
    p.add_argument("--run-timeout-s", type=float, default=600.0)
    p.add_argument("--skip-done", type=Path, default=None,
                   help="a JSONL file: skip runs whose run_id already has a line there (resume a batch)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the runs, run nothing")
    return p


def _fields(a: argparse.Namespace) -> dict[str, Any]:
    f: dict[str, Any] = {
        "method": a.method, "precision": a.precision, "optimizer": a.optimizer, "batch_size": a.batch_size,
        "seq_len": a.seq_len, "gradient_checkpointing": a.gradient_checkpointing, "attention": a.attention,
        "lora_rank": a.lora_rank, "lora_alpha": a.lora_alpha, "lora_targets": a.lora_targets,
        "double_quant": a.double_quant, "num_gpus": a.num_gpus, "parallelism": a.parallelism,
        "steps": a.steps, "gc_use_reentrant": a.gc_reentrant,
    }
    if a.model_config is not None:
        f["model_config"] = str(a.model_config)
    else:
        f["model"] = a.model
    return f


def main(argv: list[str] | None = None, prog: str = "tunefit measure") -> int:
    """Parse flags, run the run or the plan, print a summary; 0 when every run produced a line."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    a = parser.parse_args(args_list)
    from app.measure.spec import load_plan, spec_from_fields

    try:
        if a.plan is not None:
            name, specs, _raw = load_plan(a.plan)
        else:
            if a.model is None and a.model_config is None:
                parser.error("give --model, --model-config or --plan")
            name, specs = "adhoc", [spec_from_fields(_fields(a))]
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = a.batch_name or name
    done: set[str] = set()
    if a.skip_done is not None and a.skip_done.is_file():
        import json

        done = {json.loads(x)["run_id"] for x in a.skip_done.read_text().splitlines() if x.strip()}
    if a.dry_run:
        for i, s in enumerate(specs, 1):
            print(f"{i:3d} {s.model or s.model_config_source} {s.method} {s.precision} {s.optimizer} "
                  f"b{s.batch_size} s{s.seq_len} gc={int(s.gradient_checkpointing)} {s.attention}")
        return 0
    from app.measure.runner import run_batch, summary

    command = f"{prog} {shlex.join(args_list)}"
    lines = run_batch(name, specs, a.out, command, device=a.device, isolation=a.isolation,
                      workdir=a.workdir, deadline_s=a.deadline_s, run_timeout_s=a.run_timeout_s,
                      keep_checkpoints=a.keep_checkpoints, skip_run_ids=done)
    print(summary(lines))
    return 0 if len(lines) + len(done) >= len(specs) else 1
