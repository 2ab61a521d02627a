"""What wrapping a model in torch's DistributedDataParallel allocates, for the load replay.

torch 2.11 `DistributedDataParallel.__init__`, with the harness's defaults (distributed.py: device_ids
only, bucket_cap_mb 25, gradient_as_bucket_view False):
1. `_sync_module_states` broadcasts every parameter from rank 0 through c10d `broadcast_coalesced`
   (buffer 250 MiB): tensors are grouped per dtype by `compute_bucket_assignment_by_size` (a group
   closes once it reaches the limit), each group of two or more is flattened into a new tensor (one
   tensor is broadcast as a view of itself), and at most two are in flight: the oldest is unflattened
   back and freed before a third is made.
2. The Reducer's buckets: without find_unused_parameters the first iteration's bucketing is disabled
   (`compute_bucket_size_limits`: limit sys.maxsize), so the trainable parameters of each dtype make one
   bucket, whose flat gradient buffer `initialize_buckets` allocates (`at::empty`) and keeps until the
   second forward's pre-hook rebuilds the buckets (1 MiB, then 25 MiB each) in gradient-ready order:
   the old buffer freed first (`buckets_.clear()`), then the new ones allocated (trace.py replays both).
Measured after the wrap (`stages.shard`) on two H200s: Llama-3.2-1B full reserves 5.38 GiB for 4.61
allocated (the load's 2.32, the two in-flight broadcast flats' 0.77, the one 2.3 GiB bucket: replayed
5.39), its LoRA twin 3.10 (replayed 3.10); Llama-3.1-8B, Qwen2.5-7B LoRA and Llama-3.2-3B QLoRA within
0.08 GiB (tests/core/test_ddp.py). Over the steps, the rebuild frees the one big bucket's segment, which
then takes the second step's transients: Llama-3.2-1B full DDP reserves 17.80 GiB, replayed 17.80 (with
the bucket but without the rebuild, 20.7; the single-GPU run reserves 18.43).
"""

from __future__ import annotations

BROADCAST_BUCKET_BYTES = 250 * 1024 * 1024  # DistributedDataParallel's broadcast_bucket_size
FIRST_BUCKET = (1 << 62,)  # the first iteration's one bucket per dtype (sys.maxsize)
REBUILT_LIMITS = (1024 * 1024, 25 * 1024 * 1024)  # `_DEFAULT_FIRST_BUCKET_BYTES`, bucket_cap_mb=25


def group_by_size(
    tensors: list[tuple[int, int]], limits: tuple[int, ...], in_order: bool = False
) -> list[tuple[int, int]]:
    """(bytes, tensor count) of each group `compute_bucket_assignment_by_size` makes from (bytes, dtype
    key) tensors: sorted by their first tensor, or (`in_order`: tensor indices given, as a rebuild
    passes them) in the order they close, the open ones last."""
    open_: dict[int, tuple[int, int, int]] = {}  # dtype -> (first index, bytes, tensors)
    step: dict[int, int] = {}
    done: list[tuple[int, int, int]] = []
    for i, (nbytes, dtype) in enumerate(tensors):
        first, size, count = open_.get(dtype, (i, 0, 0))
        size, count = size + nbytes, count + 1
        if size >= limits[min(step.get(dtype, 0), len(limits) - 1)]:
            done.append((first, size, count))
            open_.pop(dtype, None)
            step[dtype] = step.get(dtype, 0) + 1
        else:
            open_[dtype] = (first, size, count)
    groups = done + list(open_.values()) if in_order else sorted(done + list(open_.values()))
    return [(size, count) for _, size, count in groups]


def broadcast_ops(states: list[tuple[int, int]]) -> list[int]:
    """`_sync_module_states` as load-script ops (a size allocates, -1 - k frees the k-th of these)."""
    ops: list[int] = []
    made = 0
    in_flight: list[int] = []
    for flat, count in group_by_size(states, (BROADCAST_BUCKET_BYTES,)):
        if len(in_flight) >= 2:
            k = in_flight.pop(0)
            if k >= 0:
                ops.append(-1 - k)
        if count == 1:  # flatten_dense_tensors of one tensor is a view of it: nothing allocated
            in_flight.append(-1)
            continue
        ops.append(flat)
        in_flight.append(made)
        made += 1
    ops.extend(-1 - k for k in in_flight if k >= 0)
    return ops


def buckets(trainable: list[tuple[int, int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the first iteration's buckets, the rebuilt ones), each in the order the Reducer allocates them.

    The rebuild (`Reducer::rebuild_buckets`, limits 1 MiB then 25 MiB) groups the parameters in the
    order their gradients became ready, taken here as model.parameters() reversed (the backward runs
    the layers last to first), keeping that order (`tensor_indices` given: no sort).
    """
    first = tuple(size for size, _ in group_by_size(trainable, FIRST_BUCKET)[::-1])
    ready = trainable[::-1]
    rebuilt = tuple(size for size, _ in group_by_size(ready, REBUILT_LIMITS, in_order=True))
    return first, rebuilt
