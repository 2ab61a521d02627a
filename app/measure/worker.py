"""One measured run, inside its own process: load, set up, train a few steps, return the JSON line."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from app.measure import SCHEMA_VERSION
from app.measure.gpu import CudaProbe, NullProbe, start_cuda
from app.measure.model_build import apply_training_setup, count_params, load_for_training
from app.measure.spec import RunSpec, spec_from_fields

LR = 1e-5


def versions() -> dict[str, str | None]:
    """Versions of the stack that was measured."""
    def v(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": v("transformers"),
        "peft": v("peft"),
        "bitsandbytes": v("bitsandbytes"),
        "cuda": torch.version.cuda,
        "nvidia-ml-py": v("nvidia-ml-py"),
    }


def build_optimizer(spec: RunSpec, params: list[Any]) -> tuple[Any, dict[str, Any]]:
    """The optimizer the API names, built as PyTorch/bitsandbytes build it by default (lr aside)."""
    if spec.optimizer == "adamw":
        opt: Any = torch.optim.AdamW(params, lr=LR)
    elif spec.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if spec.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        opt = cls(params, lr=LR)
    elif spec.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    else:
        opt = torch.optim.Adafactor(params, lr=1e-2)
    kw = {k: v for k, v in opt.defaults.items() if isinstance(v, (int, float, bool, str, type(None), tuple))}
    return opt, {"class": f"{type(opt).__module__}.{type(opt).__qualname__}", "kwargs": kw}


def _autocast(spec: RunSpec, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if spec.is_zero:
        return contextlib.nullcontext()  # DeepSpeed trains the 16-bit module it cast; HF runs no autocast
    if spec.precision == "amp_bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if spec.precision == "amp_fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


class _Stage:
    """Remembers which stage a failure happened in."""

    name = "start"

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.name = name
        yield


class Hooks:
    """Where a multi-GPU run plugs in: after the device exists, after the model is set up, and (for an
    engine that owns backward and step, like DeepSpeed) around the optimizer."""

    owns_step = False  # True: engine() wraps model and optimizer; backward()/step() replace the loop's own

    def after_device(self, device: torch.device) -> None:
        """Called once the device (and its CUDA context) exists."""

    def wrap(self, model: Any) -> Any:
        """Return the model to train (e.g. sharded); the default trains it as it is."""
        return model

    def param_groups(self, model: Any) -> list[Any]:
        """What the optimizer is built on: the trainable parameters, in one group."""
        return [p for p in model.parameters() if p.requires_grad]

    def engine(self, model: Any, opt: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Wrap model and optimizer in the engine; return them and the engine's settings (owns_step only)."""
        return model, opt, {}

    def backward(self, loss: Any) -> None:
        """The engine's backward (owns_step only)."""
        loss.backward()

    def step(self) -> None:
        """The engine's optimizer step and gradient reset (owns_step only)."""


def run_one(spec: RunSpec, ckpt: Path, use_cuda: bool, meta: dict[str, Any], index: int = 0,
            hooks: Hooks | None = None) -> dict[str, Any]:
    """Run one setup for spec.steps steps and return its JSON line (status ok, oom or error)."""
    hooks = hooks or Hooks()
    t_start = time.perf_counter()
    line: dict[str, Any] = {"schema_version": SCHEMA_VERSION, **meta, **spec.inputs()}
    line.update(status="error", error=None, failed_stage=None, pid=os.getpid(), versions=versions())
    stage = _Stage()
    probe: CudaProbe | NullProbe = NullProbe()
    sampler = None
    stages: dict[str, dict[str, int | None]] = {}
    step_peaks: list[dict[str, int | None]] = []
    times: list[float] = []
    losses: list[float] = []
    try:
        with stage("cuda_init"):
            if use_cuda:
                device, sampler, facts = start_cuda(index)
                probe = CudaProbe(device, sampler)
                line.update(facts)
            else:
                device = torch.device("cpu")
                line.update(gpu_name=None, gpu_total_memory=None, driver=None, nvml_baseline_used=None,
                            cuda_context_bytes=None)
            hooks.after_device(device)
            torch.manual_seed(spec.seed)
        with stage("load"):
            t0 = time.perf_counter()
            model, settings = load_for_training(spec, ckpt, str(device))
            stages["load"] = probe.reading()
            line["load_s"] = round(time.perf_counter() - t0, 3)
        with stage("peft"):
            model = apply_training_setup(model, spec, settings)
            stages["peft"] = probe.reading()
        line["params_total"], line["params_trainable"] = count_params(model)
        if spec.num_gpus > 1:
            with stage("shard"):
                model = hooks.wrap(model)
                stages["shard"] = probe.reading()
        params = hooks.param_groups(model)
        with stage("optimizer_init"):
            opt, opt_desc = build_optimizer(spec, params)
            settings["optimizer"] = opt_desc
            amp_scaler = spec.precision == "amp_fp16" and not hooks.owns_step
            scaler = torch.amp.GradScaler(device.type) if amp_scaler else None
            amp = None if spec.is_zero else spec.precision
            settings["autocast_dtype"] = {"amp_bf16": "bfloat16", "amp_fp16": "float16"}.get(amp or "")
            settings["grad_scaler"] = scaler is not None
        if hooks.owns_step:
            with stage("engine"):
                model, opt, settings["engine"] = hooks.engine(model, opt)
                stages["engine"] = probe.reading()
        line["settings"] = settings
        vocab = int(spec.model_config.get("vocab_size") or model.config.vocab_size)
        x = torch.randint(0, vocab, (spec.batch_size, spec.seq_len), device=device)
        for i in range(spec.steps):
            first = i == 0
            probe.sync()
            t0 = time.perf_counter()
            with stage("forward" if first else f"step{i + 1}"), _autocast(spec, device):
                loss = model(input_ids=x, labels=x).loss
            if first:
                stages["forward"] = probe.reading()
            with stage("backward" if first else f"step{i + 1}"):
                if hooks.owns_step:
                    hooks.backward(loss)
                else:
                    (scaler.scale(loss) if scaler else loss).backward()
            if first:
                stages["backward"] = probe.reading()
            with stage("optimizer_step" if first else f"step{i + 1}"):
                if hooks.owns_step:
                    hooks.step()  # DeepSpeed's engine.step() steps and clears the gradients itself
                elif scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                if first:
                    stages["optimizer_step"] = probe.reading()
                if not hooks.owns_step:
                    opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if first:
                stages["zero_grad"] = probe.reading()
            else:
                probe.sync()
                times.append(time.perf_counter() - t0)
                step_peaks.append(probe.reading())
        line["status"] = "ok"
    except torch.OutOfMemoryError as exc:
        line.update(status="oom", error=str(exc).splitlines()[0][:500], failed_stage=stage.name)
    except Exception as exc:
        line.update(status="error", error=f"{type(exc).__name__}: {exc}"[:1000], failed_stage=stage.name,
                    traceback=traceback.format_exc()[-3000:])
    _finish(line, probe, sampler, stages, step_peaks, times, losses, spec)
    line["wall_s"] = round(time.perf_counter() - t_start, 3)
    return line


def _finish(line: dict[str, Any], probe: CudaProbe | NullProbe, sampler: Any,
            stages: dict[str, Any], step_peaks: list[Any], times: list[float],
            losses: list[float], spec: RunSpec) -> None:
    if isinstance(probe, CudaProbe):
        with contextlib.suppress(Exception):  # after an error the device may refuse even a reading
            probe.reading()  # folds the failing stage's peak into the maxima
    line["torch_peak_allocated"] = probe.max_allocated
    line["torch_peak_reserved"] = probe.max_reserved
    line["nvml_peak_used"] = sampler.stop() if sampler is not None else None
    line["nvml_samples"] = sampler.samples if sampler is not None else None
    line["stages"] = stages
    line["step_peaks"] = step_peaks
    line["step_times_s"] = [round(t, 6) for t in times]
    med = statistics.median(times) if times else None
    line["median_step_s"] = round(med, 6) if med else None
    line["tokens_per_s"] = round(spec.batch_size * spec.seq_len * spec.num_gpus / med, 1) if med else None
    line["losses"] = [round(v, 4) for v in losses]


def _quiet() -> None:
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def child_entry(spec_fields: dict[str, Any], ckpt: str, use_cuda: bool, meta: dict[str, Any],
                result_path: str) -> None:
    """Entry point of the run's own process: run and write the line to `result_path`."""
    _quiet()
    spec = spec_from_fields(spec_fields)
    line = run_one(spec, Path(ckpt), use_cuda, meta)
    Path(result_path).write_text(json.dumps(line))


def main(argv: list[str] | None = None) -> int:
    """`python -m app.measure.worker JOB.json`: the spawn-mode child (a fresh interpreter)."""
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(args[0]).read_text())
    child_entry(job["spec"], job["ckpt"], job["use_cuda"], job["meta"], job["result_path"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
