"""What nvidia-smi sees beyond tensor bytes: CUDA context, allocator rounding, workspaces."""

from __future__ import annotations

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

# NVML `used` of an idle card plus the process's CUDA context (driver, runtime, primary context),
# per GPU family.  H200 (driver 580.159.04, torch 2.11+cu130): nvml_baseline_used 0 and
# cuda_context_bytes 648,871,936 in every run of data/calibration/h200-a-llama-3.2-1b-sweeps.jsonl
# (the harness measures it right after `torch.zeros(1, device="cuda")`).  Other families are not
# measured: the Hopper value stands in for them, and the estimate says so.
CUDA_CONTEXT_BYTES = {
    "hopper": 648_871_936,
}
DEFAULT_CONTEXT_FAMILY = "hopper"

# GPU memory NVML counts beyond the context and torch's reserved bytes: kernel images that CUDA's lazy
# module loading brings in on first use, and cuBLAS/cuBLASLt handles.  Measured on the H200 as
# nvml_peak_used - torch_peak_reserved - cuda_context_bytes: 138,412,032 bytes with eager attention
# (runs a-llama-3.2-1b-sweeps-009/010), 155,189,248 with SDPA (the other 13 runs): the flash-attention
# kernels add 16 MiB; QLoRA's fp32 attention loads none either (b-architectures-004/007/010: 138,412,032).
KERNELS_BASE_BYTES = 138_412_032
FLASH_KERNELS_BYTES = 155_189_248 - 138_412_032

# NCCL communicators and channel buffers (cudaMalloc outside torch's allocator), two H200s over NVLink
# with NCCL's defaults: nvml_peak_used - torch_peak_reserved - cuda_context_bytes, less the single-GPU
# kernels and handles (155,189,248).  DDP and FSDP2: 1,041,498,112 in all five FSDP2 runs
# (h200-d-fsdp-2gpu, o-multi-blind-002/004; the DDP runs 1,023-1,046 MB).  DeepSpeed holds more (its
# own process groups and streams): ZeRO-2 1,251,999,744 (k-zero-2gpu-001/003, o-multi-blind-005;
# k-006 +3 MB), ZeRO-3 1,555,300,352 (k-004/005, o-multi-blind-006/007; k-002 +64 KiB).  More GPUs are
# not measured.
NCCL_BYTES = 1_041_498_112 - 155_189_248
NCCL_BYTES_BY_ENGINE = {
    "ddp": NCCL_BYTES,
    "fsdp": NCCL_BYTES,
    "zero2": 1_251_999_744 - 155_189_248,
    "zero3": 1_555_300_352 - 155_189_248,
}

# cuBLAS workspaces come from the caching allocator, one per thread that runs matmuls (torch keeps a
# handle per thread and stream, aten/src/ATen/cuda/CublasHandlePool.cpp): the training loop's thread at
# its first matmul (RoPE's `inv_freq @ position_ids` in step 1's forward) and autograd's backward thread
# at its first (the lm_head backward).  Allocation traces of four runs on the H200 (torch 2.11,
# profiles/trace-*.jsonl.gz, made by profiles/m-trace.py) show exactly these two 32 MiB allocations,
# alive to the end, and no other workspace.  The replay allocates them where they happen: they take
# free blocks there (b-architectures-020: the backward's one splits a freed 502 MiB logits block, which
# costs the second step a new 502 MiB segment).
CUBLAS_WORKSPACE_THREAD_BYTES = 32 * MIB
CUBLAS_WORKSPACE_BYTES = 2 * CUBLAS_WORKSPACE_THREAD_BYTES

# cudaMallocManaged memory (bitsandbytes paged optimizer states) resident on the GPU.  The UVM driver
# takes GPU memory from PMA, which NVML counts, in batches of 1 << uvm_perf_pma_batch_nonpinned_order
# (default 6) root chunks of 2 MiB (NVIDIA open-gpu-kernel-modules kernel-open/nvidia-uvm/
# uvm_pmm_gpu.c): NVML shows the paged states in 128 MiB steps.  Within them an allocation occupied the
# next power of two below 2 MiB, whole 2 MiB chunks above (probe on the H200 with bitsandbytes
# PagedAdamW8bit, NVML used minus torch reserved: 336 x 128 KiB states -> 128 MiB, then 200 x 768 KiB
# states -> +256 MiB, 128 x 1 MiB -> +128 MiB, 200 x 144 KiB -> +0).  Runs: a-llama-3.2-1b-sweeps-013
# 2,432 MiB for 2,357 MiB of states; j-blind-gaps-003 384 MiB for 324 MiB; j-blind-gaps-016 128 MiB
# for 21 MiB (168 states of 128 KiB).
MANAGED_CHUNK = 2 * MIB
UVM_PMA_BATCH = 64 * MANAGED_CHUNK


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


def managed_bytes(nbytes: int) -> int:
    """GPU memory one managed allocation occupies once resident (within UVM's batches)."""
    if nbytes <= 0:
        return 0
    if nbytes <= MANAGED_CHUNK:
        return 1 << (nbytes - 1).bit_length()
    return -(-nbytes // MANAGED_CHUNK) * MANAGED_CHUNK


def uvm_resident_bytes(managed: int) -> int:
    """What NVML shows for this much resident managed memory: whole batches of UVM root chunks."""
    return -(-managed // UVM_PMA_BATCH) * UVM_PMA_BATCH


def kernel_bytes(flash: bool) -> int:
    """Lazily loaded kernels and library handles outside the allocator (flash attention or not)."""
    return KERNELS_BASE_BYTES + (FLASH_KERNELS_BYTES if flash else 0)


def cuda_context_bytes(family: str | None = None) -> int:
    """CUDA context size for a GPU family (Hopper when unknown)."""
    default = CUDA_CONTEXT_BYTES[DEFAULT_CONTEXT_FAMILY]
    return CUDA_CONTEXT_BYTES.get(family or DEFAULT_CONTEXT_FAMILY, default)
