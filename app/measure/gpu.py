"""The CUDA-only parts of a run: context measurement, stage-wise allocator readings, device facts.

On a machine without CUDA the worker uses `NullProbe`, so the rest of the code path (load, peft, loss,
backward, optimizer step, JSON line) runs the same on the CPU; these readings are then null.
"""

from __future__ import annotations

from typing import Any

import torch

from app.measure.nvml import NvmlSampler, NvmlUnavailable

STAGE_KEYS = ("allocated", "reserved", "peak_allocated", "peak_reserved", "nvml_used")


class NullProbe:
    """Stage readings on the CPU: every value null."""

    def __init__(self) -> None:
        self.max_allocated: int | None = None
        self.max_reserved: int | None = None

    def reading(self) -> dict[str, int | None]:
        """A stage's readings (all null here)."""
        return dict.fromkeys(STAGE_KEYS)

    def sync(self) -> None:
        """Nothing to wait for on the CPU."""


class CudaProbe:
    """Allocator and NVML readings at stage boundaries; peaks are per stage (reset after each reading)."""

    def __init__(self, device: torch.device, sampler: NvmlSampler | None) -> None:
        self.device = device
        self.sampler = sampler
        self.max_allocated = 0
        self.max_reserved = 0

    def sync(self) -> None:
        """Wait for the GPU so readings and timings see finished work."""
        torch.cuda.synchronize(self.device)

    def reading(self) -> dict[str, int | None]:
        """Allocated/reserved now, peaks since the last reading, NVML used now; then reset the peaks."""
        self.sync()
        peak_a = int(torch.cuda.max_memory_allocated(self.device))
        peak_r = int(torch.cuda.max_memory_reserved(self.device))
        self.max_allocated = max(self.max_allocated, peak_a)
        self.max_reserved = max(self.max_reserved, peak_r)
        nv = None
        if self.sampler is not None:
            nv = self.sampler.used()
            self.sampler.note(nv)
        out: dict[str, int | None] = {
            "allocated": int(torch.cuda.memory_allocated(self.device)),
            "reserved": int(torch.cuda.memory_reserved(self.device)),
            "peak_allocated": peak_a,
            "peak_reserved": peak_r,
            "nvml_used": nv,
        }
        torch.cuda.reset_peak_memory_stats(self.device)
        return out


def start_cuda(index: int = 0) -> tuple[torch.device, NvmlSampler | None, dict[str, Any]]:
    """NVML baseline before any CUDA call, then create the CUDA context, measure it, start sampling."""
    facts: dict[str, Any] = {}
    sampler: NvmlSampler | None
    try:
        sampler = NvmlSampler(index)
        facts["nvml_baseline_used"] = sampler.used()
        facts.update(sampler.device_facts())
    except NvmlUnavailable as exc:
        sampler = None
        facts["nvml_baseline_used"] = None
        facts["nvml_error"] = str(exc)
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    torch.zeros(1, device=device)  # creates the context and the allocator's first 2 MiB segment
    torch.cuda.synchronize(device)
    props = torch.cuda.get_device_properties(device)
    facts["gpu_name"] = facts.get("gpu_name") or torch.cuda.get_device_name(device)
    facts["torch_total_memory"] = int(props.total_memory)
    facts["cuda_capability"] = f"{props.major}.{props.minor}"
    if sampler is not None:
        after = sampler.used()
        facts["gpu_total_memory"] = sampler.total()
        reserved = int(torch.cuda.memory_reserved(device))
        facts["cuda_context_bytes"] = after - facts["nvml_baseline_used"] - reserved
        facts["cuda_context_method"] = (
            "NVML used after torch.cuda.set_device + one 4-byte tensor + synchronize, minus NVML used before "
            "any CUDA call in this process, minus torch reserved then (2 MiB); lazily loaded kernels and "
            "cuBLAS/cuDNN handles added later are not in it")
        sampler.start()
    else:
        facts["gpu_total_memory"] = int(props.total_memory)
        facts["cuda_context_bytes"] = None
    return device, sampler, facts
