"""DeepSpeed ZeRO-2/3 and accelerate FSDP2 per-GPU terms, computed by hand from the libraries' source."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.core.engines import engine_config
from app.core.memory import estimate_memory
from app.core.setup import TrainingSetup
from app.core.zero import zero_terms
from tests.core.helpers import arch

LLAMA8 = arch("llama-3.1-8b")
LLAMA70 = arch("llama-3.1-70b")
PSI = 8_030_261_248  # Llama-3.1-8B parameters
H = 4096
N = 8
# stage_1_and_2.py: the flat buffer is padded to a multiple of 2 x world size, then split in N.
PART = -(-PSI // (2 * N)) * 2


def _full(parallelism: str, precision: str = "bf16") -> TrainingSetup:
    return TrainingSetup("full", precision=precision, num_gpus=N, parallelism=parallelism)  # type: ignore[arg-type]


def test_llama8_zero2_per_gpu_terms_by_hand() -> None:
    b = estimate_memory(LLAMA8, _full("zero2")).breakdown
    assert PART == 1_003_782_656
    assert b["weights"] == 2 * PSI  # bf16 flat buffer of the whole model on every rank
    assert b["master_weights"] == 4 * PART  # single_partition_of_fp32_groups
    assert b["optimizer_states"] == 2 * 4 * PART  # torch AdamW exp_avg + exp_avg_sq on the fp32 partition
    assert b["gradients"] == 2 * PART  # grads_in_partition (bf16) at the step
    # step(): bf16 flat copy + fp32 gradient, then fp32 gradient + AdamW's sqrt temporary.
    assert b["optimizer_step_temporaries"] == 6 * PART
    assert "gathered_params" not in b and "autocast_weight_copies" not in b


def test_llama8_zero3_per_gpu_terms_by_hand() -> None:
    b = estimate_memory(LLAMA8, _full("zero3")).breakdown
    assert b["weights"] == 2 * PSI // N
    assert b["master_weights"] == 4 * PART
    assert b["optimizer_states"] == 8 * PART
    assert b["gradients"] == 2 * PART  # grad_partitions_flat_buffer
    # One sub-group (8.03e9 / 8 < sub_group_size 1e9 + the lm_head's partition): fp32 grad + AdamW temp.
    assert b["optimizer_step_temporaries"] == 8 * PART


def test_zero_buckets_and_gathered_params_in_the_backward() -> None:
    z2 = zero_terms(LLAMA8, _full("zero2"), frozenset())
    z3 = zero_terms(LLAMA8, _full("zero3"), frozenset())
    assert z2.buckets == 2 * 2 * H * H  # reduce_bucket_size = hidden^2, double-buffered (overlap_comm)
    assert z3.buckets == 2 * H * H
    assert z2.gathered == 0
    # reuse distance 1e9 elements + prefetch bucket 0.9 h^2, bf16, in 512-byte blocks.
    assert z3.gathered == -(-2 * (1_000_000_000 + int(0.9 * H * H)) // 512) * 512
    assert z2.grad_transient == 2 * 128_256 * H  # the lm_head's unsharded bf16 gradient


def test_amp_precision_trains_like_bf16_under_deepspeed() -> None:
    """DeepSpeed casts the module to bf16: amp_bf16 has no fp32 weights or autocast copies."""
    for par in ("zero2", "zero3"):
        amp = estimate_memory(LLAMA8, _full(par, "amp_bf16"))
        bf16 = estimate_memory(LLAMA8, _full(par))
        assert amp.peak_bytes == bf16.peak_bytes
        assert any("fp32 master partition" in s for s in amp.assumptions)


def test_zero3_beats_zero2_and_70b_zero2_does_not_fit_an_h200() -> None:
    z2 = estimate_memory(LLAMA70, _full("zero2"))
    z3 = estimate_memory(LLAMA70, _full("zero3"))
    assert z3.peak_bytes < z2.peak_bytes
    assert z2.breakdown["weights"] > 130 * 2**30  # 2 x 70.6e9 bytes unsharded
    assert z3.peak_gib > 16 * 70.6e9 / N / 2**30  # the ZeRO paper's 16 psi / N is a floor


def test_lora_adapters_bf16_under_zero2_fp32_under_zero3() -> None:
    base = TrainingSetup("lora", lora_targets=("all-linear",), num_gpus=N, parallelism="zero2")
    z2 = zero_terms(LLAMA70, base, frozenset(lin.name for lin in LLAMA70.linears))
    z3 = zero_terms(
        LLAMA70, replace(base, parallelism="zero3"), frozenset(lin.name for lin in LLAMA70.linears)
    )
    t = sum(lin.layers * 16 * (lin.in_features + lin.out_features) for lin in LLAMA70.linears)
    assert z2.adapters == pytest.approx(2 * t, abs=512 * 1000)
    assert z3.adapters == pytest.approx(4 * t / N, abs=512)
    assert z3.master == 0  # fp32 adapters: the fp32 partition is shared, not copied
    assert z2.master == pytest.approx(4 * t / N, abs=512)


def test_accelerate_fsdp_amp_gathers_bf16_copies_without_autocast() -> None:
    accel = _full("fsdp", "amp_bf16")
    harness = replace(accel, full_model_load_per_gpu=True)
    a = estimate_memory(LLAMA8, accel).breakdown
    h = estimate_memory(LLAMA8, harness).breakdown
    assert "autocast_weight_copies" not in a and "autocast_weight_copies" in h
    assert a["weights"] == h["weights"] == 4 * PSI // N  # fp32 shards either way


def test_handed_out_configs_match_the_modelled_precision() -> None:
    pure = engine_config(LLAMA8, _full("fsdp"))
    assert pure.accelerate_config_yaml is not None and "mixed_precision: no" in pure.accelerate_config_yaml
    assert pure.sft_config["bf16"] is False and pure.sft_config["model_init_kwargs"]["dtype"] == "bfloat16"
    amp = engine_config(LLAMA8, _full("fsdp", "amp_bf16"))
    assert amp.accelerate_config_yaml is not None and "mixed_precision: bf16" in amp.accelerate_config_yaml
    assert amp.sft_config["bf16"] is True and amp.sft_config["model_init_kwargs"]["dtype"] == "float32"
    ds = engine_config(LLAMA8, _full("zero3", "amp_bf16"))
    assert ds.deepspeed_config is not None and ds.deepspeed_config["bf16"]["enabled"] is True
    assert ds.sft_config["model_init_kwargs"]["dtype"] == "bfloat16"
    assert ds.deepspeed_config["zero_optimization"]["stage3_max_reuse_distance"] == 1_000_000_000


def test_resolved_config_fills_every_auto_as_hf_trainer() -> None:
    from app.core.engines import deepspeed_config, resolve_deepspeed_auto

    handed = deepspeed_config(_full("zero3"), 3)
    cfg = resolve_deepspeed_auto(handed, H, micro_batch=2, num_gpus=N, grad_accum=4)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (2, 4)
    assert cfg["train_batch_size"] == 2 * 4 * N and cfg["gradient_clipping"] == 1.0
    z = cfg["zero_optimization"]
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"]) == (H * H, int(0.9 * H * H))
    assert z["stage3_param_persistence_threshold"] == 10 * H and "auto" not in str(cfg)


def test_zero_whole_partition_tensors_keep_segments_of_their_own() -> None:
    """Every flat ZeRO tensor is larger than any block the forward/backward frees, so the replay reserves
    the bf16 flat buffer, the fp32 master, both AdamW states, the step's fp32 gradient and AdamW's sqrt
    side by side (h200-k-zero-2gpu-001: the first step added exactly four part x 4-byte segments)."""
    from app.core.zero_replay import zero_reserved

    llama1 = arch("llama-3.2-1b")
    psi = 1_235_814_400
    part = -(-psi // 4) * 2  # two GPUs
    setup = TrainingSetup("full", batch_size=4, seq_len=1024, num_gpus=2, parallelism="zero2",
                          full_model_load_per_gpu=True)
    reserved = zero_reserved(llama1, setup, frozenset(), 1_000_000_000, 0)
    assert reserved >= 2 * psi + 5 * 4 * part
    z = zero_terms(llama1, setup, frozenset())
    peak = estimate_memory(llama1, setup)
    assert z.reserved == reserved
    # the torch part of the peak is the replay's reserved bytes
    outside = ("cuda_context", "cuda_kernels_and_handles", "nccl_buffers")
    assert sum(v for k, v in peak.breakdown.items() if k not in outside) == reserved


def test_zero_full_fine_tuning_says_its_speed_is_not_modelled() -> None:
    from app.core.advice import zero_speed_notice

    assert [n.code for n in zero_speed_notice(_full("zero3"))] == ["zero_speed_unmodelled"]
    assert zero_speed_notice(_full("ddp")) == ()
    assert zero_speed_notice(TrainingSetup("lora", num_gpus=N, parallelism="zero2")) == ()  # LoRA: +8%


def test_zero_keeps_its_cached_segments_under_their_own_name() -> None:
    b = estimate_memory(LLAMA8, _full("zero2")).breakdown
    assert b["zero_cached_segments"] > 0 and b.get("zero_buckets", 0) in (0, 2 * 2 * H * H)
