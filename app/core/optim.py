"""Optimizer state and step-temporary sizes for the reference optimizers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from app.core.quant import bnb8_state_tensors

# bitsandbytes 0.50.2 `Optimizer8bit.get_state_buffer`: with is_paged, only tensors of at least
# 1e5 elements get managed (cudaMallocManaged) memory; smaller ones use torch.zeros_like.
BNB_PAGED_MIN_NUMEL = 100_000


@dataclass(frozen=True)
class OptimizerBytes:
    """State tensor sizes (allocator-visible and managed) and the largest step temporary."""

    state_tensors: tuple[int, ...]
    managed_bytes: int
    step_temp_tensors: tuple[int, ...]


def optimizer_bytes(optimizer: str, params: Iterable[tuple[int, int, int]]) -> OptimizerBytes:
    """States for trainable tensors given as (numel, bytes per element, count) triples."""
    states: list[int] = []
    temps: list[int] = []
    managed = 0
    for numel, esize, count in params:
        nbytes = numel * esize
        if optimizer == "adamw":
            # torch.optim.AdamW: exp_avg and exp_avg_sq are zeros_like(param) (param dtype).  The default
            # foreach path (`_multi_tensor_adam`) allocates `exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs)`:
            # one temporary per parameter, for all parameters of a device/dtype group at once.
            states.extend([nbytes, nbytes] * count)
            temps.extend([nbytes] * count)
        elif optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            sizes = bnb8_state_tensors(numel)
            paged = optimizer == "paged_adamw_8bit" and numel >= BNB_PAGED_MIN_NUMEL
            if paged:
                # state1/state2 go to managed memory; absmax buffers stay ordinary CUDA tensors.
                managed += (sizes[0] + sizes[1]) * count
                states.extend(list(sizes[2:]) * count)
            else:
                states.extend(list(sizes) * count)
        elif optimizer == "sgd":
            # torch.optim.SGD defaults to momentum=0: no state, and the foreach update is in place.
            pass
        elif optimizer == "adafactor":
            states.extend(_adafactor_states(numel, esize) * count)
            # torch.optim.Adafactor `_multi_tensor_adafactor` squares all grads at once (`_foreach_mul`).
            temps.extend([nbytes] * count)
        else:  # pragma: no cover - setup validation rejects other names
            raise ValueError(optimizer)
    return OptimizerBytes(tuple(states), managed, tuple(temps))


def _adafactor_states(numel: int, esize: int) -> list[int]:
    # torch.optim.Adafactor keeps a factored second moment for matrices (row and column vectors)
    # and a full one for vectors; we cannot see the matrix shape from numel alone, so the caller's
    # LoRA/linear tensors are treated as matrices of sqrt-balanced shape (a small term either way).
    if numel < 4096:
        return [numel * esize]
    side = int(numel**0.5)
    return [side * esize, side * esize]
