"""Warnings people need before a fine-tune (from the seed article and from measurement)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from app.core.architecture import Architecture
from app.core.cost import CostOption
from app.core.gpu import GIB, GpuSpec
from app.core.memory import MemoryEstimate, estimate_memory
from app.core.notices import Notice
from app.core.ranking import Job, RankRow, throughput_for_job
from app.core.setup import TrainingSetup


def not_fit(gpu: GpuSpec, setup: TrainingSetup, peak_bytes: int) -> Notice:
    """The setup does not fit the named GPU."""
    return Notice(
        "does_not_fit",
        f"The peak of {peak_bytes / GIB:,.1f} GiB per GPU exceeds the {gpu.name}'s "
        f"{gpu.vram_bytes / GIB:,.1f} GiB "
        f"({setup.method}, batch {setup.batch_size} × {setup.seq_len} tokens, {setup.num_gpus} GPU"
        f"{'s' if setup.num_gpus > 1 else ''}): see the recommendation and the ranking for setups that fit.",
    )


def gc_notice(
    arch: Architecture, setup: TrainingSetup, gpu: GpuSpec, job: Job, tokens_per_s: float
) -> tuple[Notice, ...]:
    """What gradient checkpointing costs in time and saves in memory, for this setup."""
    other = replace(setup, gradient_checkpointing=not setup.gradient_checkpointing)
    other_tps = throughput_for_job(arch, other, gpu, job).tokens_per_s
    other_peak = estimate_memory(arch, other).peak_bytes / GIB
    fits = "fits" if other_peak * GIB <= gpu.vram_bytes else "does not fit"
    if setup.gradient_checkpointing:
        extra = (other_tps / tokens_per_s - 1) * 100 if tokens_per_s > 0 else 0.0
        text = (
            f"Gradient checkpointing recomputes each layer's forward during backward: about "
            f"{extra:,.0f}% more time here (the article says ~30%: a recomputed forward adds about a "
            f"third of the compute, and more where Python's per-layer hooks, not the GPU, set the pace). "
            f"Without it the peak would be {other_peak:,.1f} GiB, which {fits} the {gpu.name}."
        )
    else:
        extra = (tokens_per_s / other_tps - 1) * 100 if other_tps > 0 else 0.0
        text = (
            f"Gradient checkpointing is off: turning it on would lower the peak to {other_peak:,.1f} GiB "
            f"at about {extra:,.0f}% more time (it recomputes each layer's forward during backward)."
        )
    return (Notice("gradient_checkpointing_cost", text),)


def cheapest_cloud_option(rows: Iterable[RankRow]) -> CostOption | None:
    """The cheapest rentable setup that fits with headroom, as a cost option (for break-even)."""
    priced = [r for r in rows if r.recommendable and r.usd is not None and r.price is not None]
    if not priced:
        return None
    row = min(priced, key=lambda r: r.usd or 0.0)
    assert row.price is not None and row.usd is not None
    p = row.price
    return CostOption(
        row.gpu_slug, row.num_gpus, p.provider, p.kind, p.usd_per_hour, row.usd, p.observed_on, p.source
    )


def gpu_notices(gpu: GpuSpec, setup: TrainingSetup) -> tuple[Notice, ...]:
    """Card-specific pitfalls: no bf16, no bitsandbytes backend."""
    notices: list[Notice] = []
    wants_bf16 = setup.precision in ("bf16", "amp_bf16") or (
        setup.method == "qlora" and setup.precision != "fp16"
    )
    if wants_bf16 and not gpu.bf16_supported:
        notices.append(
            Notice(
                "no_bf16",
                f"The {gpu.name} (compute capability {gpu.compute_capability}) has no bf16 tensor cores: "
                f"bf16 runs emulated, ~30× slower. Use precision fp16 or amp_fp16 "
                f"(QLoRA: bnb_4bit_compute_dtype=float16) with a loss scaler.",
            )
        )
    if gpu.platform == "metal" and setup.method == "qlora":
        notices.append(
            Notice(
                "qlora_unsupported", "bitsandbytes NF4 (QLoRA) does not run on Apple GPUs; use LoRA (or MLX)."
            )
        )
    if gpu.consumer and gpu.platform == "cuda":
        notices.append(
            Notice(
                "display_memory",
                "A consumer card that also drives a display loses a few hundred MiB to the desktop: "
                "keep that much more headroom, or train headless.",
            )
        )
    return tuple(notices)


def general_notices(
    mem: MemoryEstimate, setup: TrainingSetup, job: Job, load_gib: float
) -> tuple[Notice, ...]:
    """The article's two habits: the peak comes at the first step; test 100 steps before a long run."""
    peak = mem.peak_bytes / GIB
    fp16: tuple[Notice, ...] = ()
    if setup.method == "full" and setup.precision == "fp16":
        # Measured: e-gemma3-mixtral-fp16-008 (Llama-3.2-1B, fp16 weights and AdamW states, no scaler)
        # had NaN losses from its second step; HF Trainer's fp16=True refuses fp16 parameters outright
        # ("Attempting to unscale FP16 gradients").
        fp16 = (
            Notice(
                "fp16_full_diverges",
                "Pure fp16 full fine-tuning (fp16 weights and optimizer states, no loss scaler) diverges: "
                "a measured Llama-3.2-1B run had NaN losses from its second step. Use amp_fp16 (fp32 "
                "weights with a GradScaler, HF Trainer's fp16=True) or bf16 where the card has it.",
            ),
        )
    return (
        *fp16,
        Notice(
            "peak_at_first_step",
            f"nvidia-smi shows about {load_gib:,.1f} GiB after loading the model; the peak of "
            f"{peak:,.1f} GiB arrives at the first backward/optimizer step, not at load, so a run that "
            f"loads fine can still run out of memory at step 1.",
        ),
        Notice(
            "test_100_steps",
            "Run 100 steps first (SFTConfig max_steps=100): confirm the peak memory and the speed, and that "
            "the loss goes down, before committing hours of GPU time.",
        ),
    )


def zero_speed_notice(setup: TrainingSetup) -> tuple[Notice, ...]:
    """DeepSpeed ZeRO full fine-tuning runs slower than the model of its time says (measured, unmodelled)."""
    if setup.method != "full" or setup.num_gpus < 2 or setup.parallelism not in ("zero2", "zero3"):
        return ()
    return (
        Notice(
            "zero_speed_unmodelled",
            "DeepSpeed ZeRO full fine-tuning ran 1.9-3.0x slower than tunefit estimated on two H200s "
            "(h200-k-zero-2gpu runs 001-005, Llama-3.2-1B ZeRO-2/3 and Llama-3.1-8B ZeRO-3; Llama-3.2-1B "
            "ZeRO-2 ran 32,439 tok/s where DDP ran 62,008): what costs that time is not modelled yet, so the "
            "time and cost here are optimistic by about that much. Its memory is modelled and measured.",
        ),
    )
