"""Optimizer steps and wall-clock time of a job from its dataset size, counted the way HF Trainer counts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.core.notices import Notice

# The seed article's worked example: 5,000 samples x 3 epochs at batch 4, reported as "12.5K steps".
_ARTICLE_SAMPLES, _ARTICLE_EPOCHS, _ARTICLE_STEPS = 5_000, 3, 12_500


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps a dataset makes, and how many tokens the GPUs process for it."""

    dataset_samples: int
    epochs: int
    batch_size: int  # micro-batch per GPU
    grad_accum: int
    num_gpus: int
    tokens_per_sample: int
    steps_per_epoch: int
    steps: int  # optimizer steps over all epochs
    tokens: int  # tokens processed, counting the last, padded step of each epoch as full

    @property
    def samples_per_step(self) -> int:
        """The effective (global) batch: samples per optimizer step over all GPUs."""
        return self.batch_size * self.grad_accum * self.num_gpus


def plan_schedule(
    dataset_samples: int,
    epochs: int = 1,
    batch_size: int = 1,
    grad_accum: int = 1,
    num_gpus: int = 1,
    tokens_per_sample: int = 2048,
) -> Schedule:
    """Steps per epoch = ceil(samples / (batch x grad_accum x GPUs)); total = that x epochs.

    HF Trainer (transformers 5.x `set_initial_training_values`) takes the per-rank dataloader length
    ceil(ceil(samples / GPUs) / batch) and then ceil(len / grad_accum) optimizer steps per epoch;
    nested integer ceilings compose, so this equals one ceiling of the product. Rounding is per epoch:
    the last, short step of every epoch is a step of its own.
    """
    per_epoch = max(1, math.ceil(dataset_samples / (batch_size * grad_accum * num_gpus)))
    steps = per_epoch * epochs
    return Schedule(
        dataset_samples=dataset_samples,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        num_gpus=num_gpus,
        tokens_per_sample=tokens_per_sample,
        steps_per_epoch=per_epoch,
        steps=steps,
        tokens=steps * batch_size * grad_accum * num_gpus * tokens_per_sample,
    )


@dataclass(frozen=True)
class JobTime:
    """Wall-clock time of a job at a given training throughput."""

    steps: int
    seconds_per_step: float
    hours: float
    steps_per_hour: float
    tokens_per_s: float


def job_time(schedule: Schedule, tokens_per_s: float) -> JobTime:
    """Hours for a schedule at a whole-setup throughput (tokens/s over all GPUs)."""
    seconds = schedule.tokens / tokens_per_s if tokens_per_s > 0 else math.inf
    per_step = seconds / schedule.steps if schedule.steps else 0.0
    return JobTime(
        steps=schedule.steps,
        seconds_per_step=per_step,
        hours=seconds / 3600.0,
        steps_per_hour=3600.0 / per_step if per_step > 0 else 0.0,
        tokens_per_s=tokens_per_s,
    )


def schedule_notices(schedule: Schedule) -> tuple[Notice, ...]:
    """Spell out the steps arithmetic, and correct the seed article's slip where the numbers match it."""
    s = schedule
    text = (
        f"Optimizer steps = ceil({s.dataset_samples:,} samples / ({s.batch_size} batch × {s.grad_accum} "
        f"grad_accum × {s.num_gpus} GPU{'s' if s.num_gpus > 1 else ''})) × {s.epochs} epoch"
        f"{'s' if s.epochs > 1 else ''} = {s.steps_per_epoch:,} × {s.epochs} = {s.steps:,} steps "
        f"(rounded up per epoch, as HF Trainer does)."
    )
    notices = [Notice(code="steps_arithmetic", message=text)]
    if s.dataset_samples == _ARTICLE_SAMPLES and s.epochs == _ARTICLE_EPOCHS and s.steps != _ARTICLE_STEPS:
        notices.append(
            Notice(
                code="article_steps_slip",
                message=(
                    f"The article's '3 epochs over 5K samples = 12.5K steps' is an arithmetic slip: "
                    f"at {s.samples_per_step} sample{'s' if s.samples_per_step > 1 else ''} per step it is "
                    f"{s.steps:,} optimizer steps (12.5K steps would need "
                    f"{_ARTICLE_STEPS * s.samples_per_step // _ARTICLE_EPOCHS:,} samples per epoch)."
                ),
            )
        )
    if s.dataset_samples < s.samples_per_step:
        notices.append(
            Notice(
                code="batch_exceeds_dataset",
                message=(
                    f"One optimizer step takes {s.samples_per_step:,} samples but the dataset has "
                    f"{s.dataset_samples:,}: each epoch is one short step."
                ),
            )
        )
    return tuple(notices)
