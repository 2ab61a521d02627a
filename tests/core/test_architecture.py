"""Parameter counts and module shapes parsed from config.json, against official counts."""

from __future__ import annotations

import pytest

from app.core.architecture import linear_modules, llama_reading, parse_config
from app.core.errors import CoreInputError
from tests.core.helpers import arch, config

# Official / model-card counts (catalog-facts.md Part B; every one also equals the count of a
# transformers 5 model built on the meta device from the same config).
OFFICIAL = [
    ("llama-3.1-8b", 8_030_261_248),
    ("llama-3.1-70b", 70_553_706_496),
    ("llama-3.2-1b", 1_235_814_400),
    ("llama-3.2-3b", 3_212_749_824),
    ("mistral-7b-v0.3", 7_248_023_552),
    ("qwen2.5-7b", 7_615_616_512),
    ("qwen2.5-0.5b", 494_032_768),
    ("phi-3-mini-4k-instruct", 3_821_079_552),
    ("gemma-2-2b", 2_614_341_888),
    ("gemma-2-9b", 9_241_705_984),
    ("qwen3-8b", 8_190_735_360),
    ("qwen3-0.6b", 596_049_920),
    ("mixtral-8x7b-v0.1", 46_702_792_704),
    ("qwen3-30b-a3b", 30_532_122_624),
    ("tinyllama-1.1b-chat-v1.0", 1_100_048_384),
]


@pytest.mark.parametrize(("slug", "expected"), OFFICIAL)
def test_params_total_matches_official(slug: str, expected: int) -> None:
    assert arch(slug).params_total == expected


@pytest.mark.parametrize(
    ("slug", "active"),
    [
        ("mixtral-8x7b-v0.1", 12_879_925_248),
        ("qwen3-30b-a3b", 3_353_032_704),
        ("llama-3.1-8b", 8_030_261_248),
    ],
)
def test_active_params_per_token(slug: str, active: int) -> None:
    assert arch(slug).params_active_per_token == active


@pytest.mark.parametrize(
    ("slug", "q_width", "kv_width", "tied"),
    [
        ("llama-3.1-8b", 4096, 1024, False),
        ("qwen2.5-7b", 3584, 512, False),
        ("gemma-2-9b", 4096, 2048, True),  # head_dim 256: q width 4096 != hidden 3584
        ("gemma-3-4b-it", 2048, 1024, True),
        ("qwen3-8b", 4096, 1024, False),
        ("llama-3.2-1b", 2048, 512, True),
    ],
)
def test_attention_widths_and_tying(slug: str, q_width: int, kv_width: int, tied: bool) -> None:
    a = arch(slug)
    assert (a.q_width, a.kv_width, a.tie_embeddings) == (q_width, kv_width, tied)


def test_linear_modules_per_family() -> None:
    assert [m.name for m in linear_modules(arch("llama-3.1-8b"))] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert [m.name for m in linear_modules(arch("phi-3-mini-4k-instruct"))] == [
        "qkv_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
    ]
    # transformers 5 stores MoE experts as fused 3D parameters and the router as a parameter:
    # only the attention projections are nn.Linear (LoRA targets, bitsandbytes-quantized).
    assert [m.name for m in linear_modules(arch("mixtral-8x7b-v0.1"))] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]
    qkv = {m.name: m for m in linear_modules(arch("qwen2.5-7b"))}
    assert qkv["q_proj"].bias and not qkv["o_proj"].bias
    assert (qkv["k_proj"].in_features, qkv["k_proj"].out_features) == (3584, 512)


def test_multimodal_config_reads_text_model() -> None:
    nested = {"model_type": "gemma3", "text_config": dict(config("gemma-3-4b-it")), "vision_config": {}}
    assert parse_config(nested).params_total == arch("gemma-3-4b-it").params_total


@pytest.mark.parametrize(
    "bad",
    [
        "not a dict",
        {},
        {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32},  # no intermediate_size
        {"hidden_size": 0, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 8},
        {"hidden_size": 4096, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 8},
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "num_key_value_heads": 3,
            "intermediate_size": 8,
        },
        {"hidden_size": 64, "num_hidden_layers": 10**9, "num_attention_heads": 8, "intermediate_size": 8},
        {"hidden_size": "big", "num_hidden_layers": 2, "num_attention_heads": 8, "intermediate_size": 8},
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "intermediate_size": 8,
            "vocab_size": -5,
        },
    ],
)
def test_bad_configs_blame_model_config(bad: object) -> None:
    with pytest.raises(CoreInputError) as err:
        parse_config(bad)  # type: ignore[arg-type]
    assert err.value.field == "model_config"


def test_unknown_family_is_read_as_llama_shaped() -> None:
    cfg = dict(config("llama-3.1-8b"), model_type="some_new_llm")
    assert parse_config(cfg).params_total == 8_030_261_248


def _llama_like(**extra: object) -> dict[str, object]:
    return dict(config("llama-3.1-8b"), **extra)


@pytest.mark.parametrize(
    ("cfg", "named"),
    [
        # DeepSeek-V3's config.json fields: a Llama reading of it gave 7 B dense parameters for 671 B
        (
            _llama_like(model_type="deepseek_v3", kv_lora_rank=512, q_lora_rank=1536, n_routed_experts=256),
            "lora_rank",
        ),
        (_llama_like(model_type="deepseek_v2", kv_lora_rank=512, q_lora_rank=None), "kv_lora_rank"),
        (_llama_like(model_type="jamba", mamba_d_state=16), "mamba_d_state"),
        (
            _llama_like(model_type="qwen3_next", layer_types=["linear_attention", "full_attention"]),
            "linear_attention",
        ),
        (_llama_like(model_type="gpt_neox"), "gpt_neox"),
        (_llama_like(model_type="phi"), "phi"),
    ],
    ids=["deepseek_v3", "deepseek_v2_lite", "jamba", "qwen3_next", "gpt_neox", "phi"],
)
def test_unmodelled_layers_are_refused_not_misread(cfg: dict[str, object], named: str) -> None:
    with pytest.raises(CoreInputError) as err:
        parse_config(cfg)
    assert err.value.field == "model_config"
    assert named in str(err.value)


def test_attention_layer_types_are_read() -> None:
    cfg = dict(config("gemma-3-1b-it"))
    cfg["layer_types"] = ["sliding_attention"] * 5 + ["full_attention"]
    assert parse_config(cfg).params_total == parse_config(config("gemma-3-1b-it")).params_total


def test_only_unknown_model_types_say_they_are_read_as_llama() -> None:
    assert llama_reading(parse_config(config("qwen2.5-0.5b"))) is None
    assert llama_reading(parse_config(config("gemma-3-1b-it"))) is None
    note = llama_reading(parse_config(_llama_like(model_type="olmo2")))
    assert note is not None and "'olmo2'" in note and "8.03 B parameters" in note
