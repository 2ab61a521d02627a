"""estimate_memory: trainable counts, breakdown arithmetic, mechanisms' directions, input checks."""

from __future__ import annotations

import time

import pytest

from app.core.errors import CoreInputError
from app.core.memory import estimate_memory
from app.core.setup import TrainingSetup
from tests.core.helpers import arch

ALL = ("all-linear",)


@pytest.mark.parametrize(
    ("slug", "rank", "targets", "expected"),
    [
        # r * sum(in + out) per targeted linear, per layer (GQA: k/v are hidden -> kv_heads*head_dim)
        ("llama-3.1-8b", 16, ALL, 41_943_040),
        ("llama-3.1-8b", 64, ALL, 167_772_160),
        ("llama-3.1-8b", 16, ("q_proj", "v_proj"), 6_815_744),
        ("mistral-7b-v0.3", 16, ("q_proj", "v_proj"), 6_815_744),
        ("qwen2.5-7b", 8, ("q_proj", "v_proj"), 2_523_136),
        # Mixtral in transformers 5: only attention is nn.Linear, and peft 0.21 adds the router and the
        # fused experts as target_parameters (moe_lora): r(h + E), 2r x E(h + 2mi), r x E(mi + h)
        (
            "mixtral-8x7b-v0.1",
            16,
            ALL,
            32 * (16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2) + 16 * (4096 + 8)
                  + 32 * 8 * (4096 + 2 * 14336) + 16 * 8 * (14336 + 4096)),
        ),
        ("mixtral-8x7b-v0.1", 16, ("q_proj", "v_proj"), 32 * 16 * ((4096 + 4096) + (4096 + 1024))),
        ("mixtral-8x7b-v0.1", 8, ("w1", "w3"), 32 * 16 * 8 * (4096 + 2 * 14336)),
        ("qwen3-30b-a3b", 16, ("down_proj",), 48 * 16 * 128 * (768 + 2048)),
    ],
)
def test_lora_trainable_params(slug: str, rank: int, targets: tuple[str, ...], expected: int) -> None:
    est = estimate_memory(arch(slug), TrainingSetup("lora", lora_rank=rank, lora_targets=targets))
    assert est.params_trainable == expected
    assert est.params_total == arch(slug).params_total


def test_phi3_all_linear_count_is_rank_times_widths() -> None:
    a = arch("phi-3-mini-4k-instruct")
    per_layer = (3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072)
    est = estimate_memory(a, TrainingSetup("lora", lora_targets=ALL))
    assert est.params_trainable == 16 * per_layer * 32


def test_full_trains_everything() -> None:
    est = estimate_memory(arch("llama-3.2-1b"), TrainingSetup("full"))
    assert est.params_trainable == est.params_total == 1_235_814_400


@pytest.mark.parametrize(
    "setup",
    [
        TrainingSetup("full"),
        TrainingSetup("full", precision="amp_bf16", gradient_checkpointing=False),
        TrainingSetup("lora", attention="eager", batch_size=2),
        TrainingSetup("qlora", optimizer="paged_adamw_8bit", lora_targets=ALL),
        TrainingSetup("full", num_gpus=4, parallelism="fsdp"),
        TrainingSetup("lora", num_gpus=2, parallelism="ddp"),
    ],
)
def test_breakdown_adds_up(setup: TrainingSetup) -> None:
    est = estimate_memory(arch("llama-3.1-8b"), setup)
    assert sum(est.breakdown.values()) == est.peak_bytes
    assert all(v >= 0 for v in est.breakdown.values())
    assert est.breakdown["cuda_context"] > 0 and est.assumptions


def peak(slug: str, **kw: object) -> int:
    return estimate_memory(arch(slug), TrainingSetup(**kw)).peak_bytes  # type: ignore[arg-type]


def test_mechanism_directions() -> None:
    m = "llama-3.1-8b"
    assert peak(m, method="qlora") < peak(m, method="lora") < peak(m, method="full")
    assert peak(m, method="lora", gradient_checkpointing=False) > peak(m, method="lora")
    assert peak(m, method="lora", attention="eager", seq_len=4096) > peak(m, method="lora", seq_len=4096)
    assert peak(m, method="lora", batch_size=8) > peak(m, method="lora", batch_size=2)
    assert peak(m, method="full", precision="amp_bf16") > peak(m, method="full", precision="bf16")
    assert peak(m, method="full", optimizer="adamw_8bit") < peak(m, method="full")
    assert peak(m, method="full", num_gpus=8, parallelism="zero3") < peak(
        m, method="full", num_gpus=8, parallelism="zero2"
    )
    assert peak(m, method="qlora", double_quant=True) < peak(m, method="qlora", double_quant=False)


def test_qlora_keeps_embedding_and_head_unquantized_in_fp32() -> None:
    a = arch("llama-3.1-8b")
    est = estimate_memory(a, TrainingSetup("qlora"))
    # two fp32 128256 x 4096 matrices alone are 3.9 GiB; NF4 of the rest ~3.3 GiB
    assert est.breakdown["weights"] > 2 * a.vocab_size * a.hidden_size * 4


def test_absurd_sequence_answers_at_once_with_a_warning() -> None:
    t0 = time.perf_counter()
    est = estimate_memory(arch("llama-3.1-8b"), TrainingSetup("lora", seq_len=10**15))
    assert time.perf_counter() - t0 < 0.05
    codes = {w.code for w in est.warnings}
    assert "seq_len_beyond_context" in codes and "absurd_size" in codes


def test_half_of_the_fused_gate_up_is_refused_like_peft() -> None:
    """peft 0.21 raises a ValueError when w1 is targeted without w3 (both live in gate_up_proj)."""
    with pytest.raises(CoreInputError) as err:
        estimate_memory(arch("mixtral-8x7b-v0.1"), TrainingSetup("lora", lora_targets=("w1",)))
    assert err.value.field == "lora_targets"
    assert "w3" in str(err.value)


def test_lora_on_experts_saves_a_folded_weight_per_moe_layer_without_checkpointing() -> None:
    """W + BA of both expert tensors (bf16) is kept by every MoE layer until its backward."""
    a = arch("qwen3-30b-a3b")
    folded = 128 * 3 * 2048 * 768 * 2  # gate_up (2 x 768) and down, bf16, per layer
    peaks = {}
    for targets in (("q_proj", "v_proj"), ALL):
        for gc in (True, False):
            s = TrainingSetup("lora", lora_targets=targets, gradient_checkpointing=gc, seq_len=512)
            peaks[targets, gc] = estimate_memory(a, s).peak_bytes
    qv = ("q_proj", "v_proj")
    growth, growth_gc = (peaks[ALL, gc] - peaks[qv, gc] for gc in (False, True))
    # with checkpointing only the layer being recomputed holds them: the other 47 layers' folds go
    # (less the adapters' gradients, which the no-checkpointing peak, at the top of backward, lacks)
    assert 42 * folded < growth - growth_gc < 49 * folded


def test_unknown_lora_target_blames_lora_targets() -> None:
    with pytest.raises(CoreInputError) as err:
        estimate_memory(arch("phi-3-mini-4k-instruct"), TrainingSetup("lora", lora_targets=("q_proj",)))
    assert err.value.field == "lora_targets"
    assert "qkv_proj" in err.value.message


def test_qlora_moe_keeps_experts_in_fp32() -> None:
    a = arch("qwen3-30b-a3b")
    est = estimate_memory(a, TrainingSetup("qlora", batch_size=1, seq_len=512))
    assert "moe_experts_not_quantized" in {w.code for w in est.warnings}
    assert est.breakdown["weights"] > a.expert_params * 4


@pytest.mark.parametrize(
    ("slug", "method", "stored"),
    [
        ("llama-3.2-1b", "qlora", True),  # fp32 stream + GQA: SDPA math kernel
        ("phi-3-mini-4k-instruct", "qlora", False),  # multi-head: memory-efficient kernel
        ("llama-3.2-1b", "lora", False),  # bf16: flash attention
    ],
)
def test_sdpa_math_fallback(slug: str, method: str, stored: bool) -> None:
    setup = TrainingSetup(method, lora_targets=ALL, gradient_checkpointing=False, seq_len=1024)  # type: ignore[arg-type]
    est = estimate_memory(arch(slug), setup)
    assert ("attention_probabilities_stored" in {w.code for w in est.warnings}) is stored


def test_required_bytes_drop_only_releasable_cache() -> None:
    est = estimate_memory(arch("llama-3.2-1b"), TrainingSetup("full", batch_size=4, seq_len=1024))
    assert est.required_bytes == est.peak_bytes - est.breakdown["allocator_fragmentation"]
    assert 0 < est.required_bytes < est.peak_bytes


def test_sliding_window_beyond_window_adds_a_mask() -> None:
    a = arch("gemma-3-4b-it")  # window 1024 on 5 of 6 layers
    assert a.sliding_window == 1024 and a.sliding_layers == 29
    below = estimate_memory(a, TrainingSetup("lora", seq_len=1023, gradient_checkpointing=False))
    above = estimate_memory(a, TrainingSetup("lora", seq_len=1024, gradient_checkpointing=False))
    # one more token, but 29 layers now keep a 1024 x 1024 bf16 bias and full-width k/v
    assert above.breakdown["activations"] - below.breakdown["activations"] > 29 * 1024 * 1024 * 2


def test_qlora_flash_attention_2_runs_attention_in_bf16() -> None:
    """transformers casts QLoRA's fp32 q/k/v to bf16 for flash-attn: no s^2 math fallback, 2-byte q/k/v."""
    from app.core.activations import dtypes_for, layer_activations, lora_target_names

    a = arch("llama-3.1-8b")
    sdpa = TrainingSetup("qlora", batch_size=1, seq_len=4096)
    fa2 = TrainingSetup("qlora", batch_size=1, seq_len=4096, attention="flash_attention_2")
    assert dtypes_for(sdpa).attn == 4 and dtypes_for(fa2).attn == 2
    targets = lora_target_names(a, fa2.lora_targets)
    assert layer_activations(a, fa2, targets).attn_scores_saved == 0
    assert layer_activations(a, sdpa, targets).attn_scores_saved == 4  # SDPA math keeps softmax(QK^T)
    peak_sdpa = estimate_memory(a, sdpa).peak_bytes
    peak_fa2 = estimate_memory(a, fa2).peak_bytes
    # under GC the recomputed layer's fp32 probabilities (32 heads x 4096^2 x 4 bytes = 2 GiB) and its
    # transient scores are what SDPA's math kernel adds at the backward peak
    assert peak_fa2 < peak_sdpa - 2**30


def test_sdpa_math_backward_holds_four_score_tensors() -> None:
    """SDPA math's backward: saved softmax + its gradient + softmax_backward's `grad * output` and result."""
    from app.core.activations import layer_activations, lora_target_names

    a = arch("llama-3.1-8b")
    s = TrainingSetup("qlora", batch_size=2, seq_len=4096, double_quant=False)
    la = layer_activations(a, s, lora_target_names(a, s.lora_targets))
    assert (la.attn_scores_saved, la.attn_scores_transient) == (4, 12)
    scores = 2 * 32 * 4096 * 4096
    est = estimate_memory(a, s)
    # run j-blind-gaps-004: 28.37 GiB allocated at the peak (4 x 4 GiB of scores, traced)
    assert est.breakdown["activations"] > 4 * (4 * scores)  # four fp32 b x heads x s^2 tensors
    assert "Peak phase: backward top" in " ".join(est.assumptions)


def test_paged_states_take_uvm_batches() -> None:
    """NVML shows bitsandbytes' managed states in 128 MiB UVM batches (runs a-013, j-003, j-016)."""
    from app.core.allocator import MIB, managed_bytes, uvm_resident_bytes

    assert managed_bytes(128 * 1024) == 128 * 1024
    assert managed_bytes(768 * 1024) == MIB
    assert managed_bytes(3 * MIB) == 4 * MIB
    assert uvm_resident_bytes(168 * managed_bytes(128 * 1024)) == 128 * MIB  # j-blind-gaps-016
    assert uvm_resident_bytes(0) == 0
    est = estimate_memory(
        arch("llama-3.2-3b"),
        TrainingSetup("qlora", optimizer="paged_adamw_8bit", batch_size=4, seq_len=1024, lora_targets=ALL),
    )
    assert est.breakdown["optimizer_states_paged"] == 128 * MIB
