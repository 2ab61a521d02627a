"""Optimizer state and step-temporary sizes for the reference optimizers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from app.core.quant import bnb8_state_tensors

# bitsandbytes 0.50.2 `Optimizer8bit.get_state_buffer`: with is_paged, only tensors of at least
# 1e5 elements get managed (cudaMallocManaged) memory; smaller ones use torch.zeros_like.
BNB_PAGED_MIN_NUMEL = 100_000


# (bytes of one tensor, how many such tensors)
Group = tuple[int, int]


@dataclass(frozen=True)
class OptimizerBytes:
    """State tensors (allocator-visible, as groups), managed bytes, and the step's temporaries."""

    state_groups: tuple[Group, ...]
    managed_groups: tuple[Group, ...]  # cudaMallocManaged allocations (bitsandbytes paged states)
    step_temp_groups: tuple[Group, ...]


def optimizer_bytes(optimizer: str, params: Iterable[tuple[int, int, int, int]]) -> OptimizerBytes:
    """States for trainable tensors given as (rows, cols, bytes per element, count)."""
    states: list[Group] = []
    temps: list[Group] = []
    managed: list[Group] = []
    largest = 0
    for rows, cols, esize, count in params:
        numel = rows * cols
        nbytes = numel * esize
        if optimizer == "adamw":
            # torch.optim.AdamW: exp_avg and exp_avg_sq are zeros_like(param) (param dtype).  The default
            # foreach path (`_multi_tensor_adam`) allocates `exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs)`:
            # one temporary per parameter, for all parameters of a device/dtype group at once.
            states.append((nbytes, 2 * count))
            temps.append((nbytes, count))
        elif optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            sizes = bnb8_state_tensors(numel)
            paged = optimizer == "paged_adamw_8bit" and numel >= BNB_PAGED_MIN_NUMEL
            if paged:
                # state1/state2 go to managed memory; absmax buffers stay ordinary CUDA tensors.
                managed.extend([(sizes[0], count), (sizes[1], count)])
                states.extend((b, count) for b in sizes[2:])
            else:
                states.extend((b, count) for b in sizes)
        elif optimizer == "sgd":
            # The harness builds torch.optim.SGD(momentum=0.9): one momentum buffer per parameter
            # (`torch.clone(grad)` on the first step), updated in place by the foreach path.
            states.append((nbytes, count))
        elif optimizer == "adafactor":
            states.extend((b, count) for b in _adafactor_states(rows, cols, esize))
            # torch.optim.Adafactor defaults to the single-tensor loop (foreach=None means off, see its
            # docstring): one full-size `row_var @ col_var` estimate alive at a time.
            largest = max(largest, nbytes)
        else:  # pragma: no cover - setup validation rejects other names
            raise ValueError(optimizer)
    if largest:
        temps.append((largest, 1))
    return OptimizerBytes(tuple(states), tuple(managed), tuple(temps))


def _adafactor_states(rows: int, cols: int, esize: int) -> list[int]:
    # torch.optim.Adafactor (torch/optim/_adafactor.py `_init_group`): a matrix keeps a factored
    # second moment, row_var (rows x 1) and col_var (1 x cols); a vector keeps a full variance.
    if cols == 1:
        return [rows * esize]
    return [rows * esize, cols * esize]


def param_state_tensors(optimizer: str, rows: int, cols: int, esize: int) -> tuple[tuple[int, ...], int, int]:
    """(allocator-visible state tensor sizes, managed bytes, step temporary) for one parameter."""
    nbytes = rows * cols * esize
    if optimizer == "adamw":
        return (nbytes, nbytes), 0, nbytes
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        sizes = bnb8_state_tensors(rows * cols)
        if optimizer == "paged_adamw_8bit" and rows * cols >= BNB_PAGED_MIN_NUMEL:
            return sizes[2:], sizes[0] + sizes[1], 0
        return sizes, 0, 0
    if optimizer == "sgd":
        return (nbytes,), 0, 0
    return tuple(_adafactor_states(rows, cols, esize)), 0, nbytes
