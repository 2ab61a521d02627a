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
        # Mixtral in transformers 5: only attention is nn.Linear; all-linear = q,k,v,o
        ("mixtral-8x7b-v0.1", 16, ALL, 32 * 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2)),
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


def test_unknown_lora_target_blames_lora_targets() -> None:
    with pytest.raises(CoreInputError) as err:
        estimate_memory(arch("phi-3-mini-4k-instruct"), TrainingSetup("lora", lora_targets=("q_proj",)))
    assert err.value.field == "lora_targets"
    assert "qkv_proj" in err.value.message
