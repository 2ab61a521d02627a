"""TrainingSetup validation names the API field at fault."""

from __future__ import annotations

from typing import Any

import pytest

from app.core.errors import CoreInputError
from app.core.setup import TrainingSetup


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "dora"}, "method"),
        ({"method": "full", "precision": "int8"}, "precision"),
        ({"method": "full", "optimizer": "lion"}, "optimizer"),
        ({"method": "full", "attention": "flex"}, "attention"),
        ({"method": "full", "precision": "fp32", "attention": "flash_attention_2"}, "attention"),
        ({"method": "full", "parallelism": "tp"}, "parallelism"),
        ({"method": "full", "batch_size": 0}, "batch_size"),
        ({"method": "full", "batch_size": 2.5}, "batch_size"),
        ({"method": "full", "seq_len": 0}, "seq_len"),
        ({"method": "full", "num_gpus": 0}, "num_gpus"),
        ({"method": "lora", "lora_rank": 0}, "lora_rank"),
        ({"method": "lora", "lora_targets": ()}, "lora_targets"),
        ({"method": "lora", "lora_targets": "q_proj"}, "lora_targets"),
        ({"method": "lora", "lora_targets": ("",)}, "lora_targets"),
    ],
)
def test_invalid_setup(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(CoreInputError) as err:
        TrainingSetup(**kwargs)
    assert err.value.field == field
    assert err.value.message


def test_defaults_follow_the_contract() -> None:
    s = TrainingSetup("lora")
    assert (s.precision, s.optimizer, s.batch_size, s.seq_len, s.gradient_checkpointing, s.attention) == (
        "bf16",
        "adamw",
        1,
        2048,
        True,
        "sdpa",
    )
    assert (s.lora_rank, s.lora_alpha, s.lora_targets, s.double_quant, s.num_gpus, s.parallelism) == (
        16,
        32,
        ("q_proj", "v_proj"),
        True,
        1,
        "ddp",
    )
