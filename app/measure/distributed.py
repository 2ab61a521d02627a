"""FSDP, DDP and DeepSpeed ZeRO runs on several GPUs of one host: torchrun starts one process per GPU;
rank 0 writes the line.

Each rank loads the whole checkpoint onto its GPU with from_pretrained (as a plain script does), applies
the same training setup, then shards every decoder layer and the root with FSDP2 `fully_shard` (fsdp),
wraps the model in DistributedDataParallel with its defaults (ddp), or hands model and optimizer to
`deepspeed.initialize` with the config tunefit hands out (zero2/zero3, app/core/engines.py); each rank
trains on its own micro-batch of batch_size sequences.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from app.core.architecture import parse_config
from app.core.calibration import setup_of
from app.core.engines import deepspeed_config, resolve_deepspeed_auto
from app.measure.spec import REPO_ROOT, RunSpec, spec_from_fields
from app.measure.worker import Hooks, _quiet, run_one

# Set on the device machines (their KINDS.md): NVLink multicast can take the host's GPUs out of service.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# HF Trainer's decay split (transformers trainer.py `get_decay_parameter_names`): no weight decay for
# biases and norms.
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")

RANK_KEYS = ("rank", "status", "error", "failed_stage", "nvml_baseline_used", "cuda_context_bytes",
             "torch_peak_allocated", "torch_peak_reserved", "nvml_peak_used", "stages", "step_peaks")


class FsdpHooks(Hooks):
    """Start the process group on the run's device; shard decoder layers and the root with FSDP2."""

    def __init__(self, use_cuda: bool) -> None:
        self.use_cuda = use_cuda
        self.device: torch.device | None = None

    def after_device(self, device: torch.device) -> None:
        """Join the process group (NCCL on GPUs, gloo on the CPU)."""
        self.device = device
        if self.use_cuda:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")

    def wrap(self, model: Any) -> Any:
        """fully_shard each decoder layer, then the whole model (reshard after forward: ZeRO-3 style)."""
        from torch.distributed.fsdp import fully_shard

        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model


class DdpHooks(FsdpHooks):
    """Start the process group; wrap the model in DistributedDataParallel (25 MiB buckets, the default)."""

    def wrap(self, model: Any) -> Any:
        """DistributedDataParallel over the rank's device, as a plain DDP script builds it."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)


def zero_run_config(spec: RunSpec) -> dict[str, Any]:
    """The DeepSpeed config engines.py hands out for this run, its "auto" values filled as HF Trainer does."""
    setup = setup_of(spec.inputs())
    hidden = parse_config(spec.model_config).hidden_size
    stage = 3 if spec.parallelism == "zero3" else 2
    return resolve_deepspeed_auto(deepspeed_config(setup, stage), hidden, spec.batch_size, spec.num_gpus)


def trainer_param_groups(model: Any, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The two parameter groups HF Trainer's create_optimizer builds (decay, no decay; trainable only)."""
    decay: list[Any] = []
    other: list[Any] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = isinstance(_owner(model, name), torch.nn.LayerNorm) or _NO_DECAY.search(name.lower())
        (other if no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def _owner(model: Any, name: str) -> Any:
    mod = name.rpartition(".")[0]
    return model.get_submodule(mod) if mod else model


class ZeroHooks(FsdpHooks):
    """DeepSpeed ZeRO-2/3: the Trainer's optimizer and the handed-out config go to deepspeed.initialize."""

    owns_step = True

    def __init__(self, use_cuda: bool, spec: RunSpec) -> None:
        super().__init__(use_cuda)
        self.spec = spec
        self.ds_engine: Any = None

    def wrap(self, model: Any) -> Any:
        """Nothing yet: DeepSpeed wraps model and optimizer together (engine())."""
        return model

    def param_groups(self, model: Any) -> list[Any]:
        """HF Trainer's decay / no-decay groups (DeepSpeed drops an empty one, engine.py)."""
        return trainer_param_groups(model)

    def engine(self, model: Any, opt: Any) -> tuple[Any, Any, dict[str, Any]]:
        """deepspeed.initialize over the existing process group; return engine, its optimizer, settings."""
        import deepspeed  # only on this path: the harness imports without DeepSpeed

        config = zero_run_config(self.spec)
        engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        self.ds_engine = engine
        return engine, ds_opt, {"deepspeed": deepspeed.__version__, "config": config,
                                "optimizer_wrapper": type(ds_opt).__name__}

    def backward(self, loss: Any) -> None:
        """engine.backward(loss): loss scaling (fp16) and ZeRO's gradient reduction hooks."""
        self.ds_engine.backward(loss)

    def step(self) -> None:
        """engine.step(): the ZeRO optimizer step, then the engine zeroes the gradients."""
        self.ds_engine.step()


def _hooks(spec: RunSpec, use_cuda: bool) -> Hooks:
    if spec.is_zero:
        return ZeroHooks(use_cuda, spec)
    return (DdpHooks if spec.parallelism == "ddp" else FsdpHooks)(use_cuda)


def main(argv: list[str] | None = None) -> int:
    """Entry point under torchrun: `python -m torch.distributed.run ... -m app.measure.distributed JOB`."""
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(args[0]).read_text())
    _quiet()
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    spec = spec_from_fields(job["spec"])
    hooks = _hooks(spec, job["use_cuda"])
    line = run_one(spec, Path(job["ckpt"]), job["use_cuda"], job["meta"], index=local, hooks=hooks)
    line["rank"] = rank
    lines: list[Any] = [None] * int(os.environ["WORLD_SIZE"])
    if dist.is_initialized():
        dist.all_gather_object(lines, line)
        dist.destroy_process_group()
    else:
        lines = [line]
    if rank == 0:
        Path(job["result_path"]).write_text(json.dumps(merge_ranks([x for x in lines if x is not None])))
    return 0


def merge_ranks(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's line, with every rank's memory under `ranks` and the top-level peaks the largest rank's."""
    out = dict(lines[0])
    out["ranks"] = [{k: x.get(k) for k in RANK_KEYS} for x in lines]
    for k in ("torch_peak_allocated", "torch_peak_reserved", "nvml_peak_used"):
        vals = [x[k] for x in lines if x.get(k) is not None]
        out[k] = max(vals) if vals else None
    bad = [x for x in lines if x["status"] != "ok"]
    if bad:
        first = bad[0]
        out.update(status=first["status"], error=first.get("error"), failed_stage=first.get("failed_stage"))
    return out


def launch(job: dict[str, Any], result_path: Path, timeout_s: float) -> tuple[dict[str, Any] | None, str]:
    """Run a job under torchrun with one process per GPU; return (the merged line or None, why not)."""
    job_path = result_path.with_suffix(".job.json")
    job_path.write_text(json.dumps({**job, "result_path": str(result_path)}))
    n = int(job["spec"]["num_gpus"])
    # NVML numbers GPUs in PCI order; make CUDA agree so each rank samples its own card.
    env = {**NO_MULTICAST, **os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "app.measure.distributed", str(job_path)]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout_s:.0f} s"
    if result_path.is_file():
        return json.loads(result_path.read_text()), ""
    return None, f"torchrun exited with code {proc.returncode} and rank 0 wrote no result"


if __name__ == "__main__":
    raise SystemExit(main())
