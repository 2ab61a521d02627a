"""FSDP and DDP runs on several GPUs of one host: torchrun starts one process per GPU; rank 0 writes the line.

Each rank loads the whole checkpoint onto its GPU with from_pretrained (as a plain script does), applies
the same training setup, then shards every decoder layer and the root with FSDP2 `fully_shard` (fsdp) or
wraps the model in DistributedDataParallel with its defaults (ddp); each rank trains on its own
micro-batch of batch_size sequences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from app.measure.spec import REPO_ROOT, spec_from_fields
from app.measure.worker import Hooks, _quiet, run_one

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


def main(argv: list[str] | None = None) -> int:
    """Entry point under torchrun: `python -m torch.distributed.run ... -m app.measure.distributed JOB`."""
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(args[0]).read_text())
    _quiet()
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    spec = spec_from_fields(job["spec"])
    hooks = (DdpHooks if spec.parallelism == "ddp" else FsdpHooks)(job["use_cuda"])
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
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "OMP_NUM_THREADS": "1"}
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
