"""What nvidia-smi sees beyond tensor bytes: CUDA context, allocator rounding, workspaces."""

from __future__ import annotations

from collections.abc import Iterable

MIB = 1 << 20
GIB = 1 << 30

# PyTorch c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize = 512 (every request rounds up to a
# multiple of 512 bytes), kSmallSize = 1 MiB (small pool, carved from kSmallBuffer = 2 MiB
# segments), kMinLargeAlloc = 10 MiB (requests between 1 and 10 MiB are carved from
# kLargeBuffer = 20 MiB segments), kRoundLarge = 2 MiB (larger requests get their own segment
# rounded up to 2 MiB).
MIN_BLOCK = 512
SMALL_SIZE = 1 * MIB
MIN_LARGE_ALLOC = 10 * MIB
ROUND_LARGE = 2 * MIB

# CUDA context of a PyTorch process (driver, runtime, loaded kernels, cuBLAS/cuBLASLt handles), per
# GPU family, as NVML reports it before any tensor is allocated.  Source: the calibration harness's
# `cuda_context_bytes` (data/calibration/h200-*.jsonl); families without a measurement use the
# Hopper value and say so.
CUDA_CONTEXT_BYTES = {
    "hopper": 530 * MIB,
}
DEFAULT_CONTEXT_FAMILY = "hopper"

# cuBLAS workspaces come from the caching allocator (torch `getCurrentCUDABlasHandle` /
# `getCUDABlasLtWorkspace`): on Hopper `CUBLAS_WORKSPACE_CONFIG` defaults to ":4096:2:16:8"
# (2 x 4 MiB + 8 x 16 KiB per handle and stream) and the cuBLASLt workspace is 32 MiB
# (aten/src/ATen/cuda/CublasHandlePool.cpp, torch >= 2.5).
CUBLAS_WORKSPACE_BYTES = 2 * 4 * MIB + 8 * 16 * 1024 + 32 * MIB


def block_size(nbytes: int) -> int:
    """Bytes the caching allocator hands out for one request of `nbytes`."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_bytes(nbytes: int) -> int:
    """Reserved bytes attributable to one live tensor (large requests get 2 MiB-rounded segments)."""
    size = block_size(nbytes)
    if size >= MIN_LARGE_ALLOC:
        return -(-size // ROUND_LARGE) * ROUND_LARGE
    return size


def reserved_for(tensors: Iterable[int]) -> int:
    """Reserved bytes for a set of live tensors of the given sizes."""
    return sum(segment_bytes(n) for n in tensors)


def cuda_context_bytes(family: str | None = None) -> int:
    """CUDA context size for a GPU family (Hopper when unknown)."""
    default = CUDA_CONTEXT_BYTES[DEFAULT_CONTEXT_FAMILY]
    return CUDA_CONTEXT_BYTES.get(family or DEFAULT_CONTEXT_FAMILY, default)
