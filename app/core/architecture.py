"""Decoder-only transformer architectures parsed from a Hugging Face config.json.

The module shapes mirror transformers 5.17's modeling files (`models/<family>/modeling_<family>.py`):
what is an `nn.Linear` there is what peft can put a LoRA adapter on and what bitsandbytes quantizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.core.errors import CoreInputError
from app.core.keys import cached_hash, state_without_hash

FIELD = "model_config"

# Upper bounds that no real checkpoint approaches; beyond them the config is a typo or an attack.
_MAX_DIM = 1 << 20  # hidden / intermediate / head sizes
_MAX_LAYERS = 10_000
_MAX_VOCAB = 1 << 24
_MAX_HEADS = 1 << 14
_MAX_EXPERTS = 1 << 14

# Families whose transformers 5 modeling code we follow; others are read as Llama-shaped.
KNOWN_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)

# Model types whose decoder is not Llama-shaped in ways that change its size: a two-matrix MLP
# (fc1/fc2 or c_fc/c_proj, no gate), fused or parallel attention blocks, other module names for LoRA.
# Reading them as Llama would add a gate projection (+50% MLP weights) and miss their layout, so they
# answer 422 instead of a wrong number (transformers 5.17 `modeling_<type>.py`).
NOT_LLAMA_SHAPED = frozenset(
    {
        "bloom",
        "codegen",
        "falcon",
        "gpt2",
        "gpt_bigcode",
        "gpt_neo",
        "gpt_neox",
        "gptj",
        "mpt",
        "opt",
        "phi",
        "starcoder2",
    }
)

# Config fields of layers tunefit does not model, whose weights and activations a Llama-shaped reading
# would get wrong by a wide margin (DeepSeek-V3: 671 B parameters, read as 7 B dense without them).
_UNMODELLED_FIELDS = {
    "kv_lora_rank": "multi-head latent attention (DeepSeek-V2/V3 style)",
    "q_lora_rank": "multi-head latent attention (DeepSeek-V2/V3 style)",
    "n_routed_experts": "DeepSeek-style routed experts",
    "mamba_d_state": "state-space (Mamba) layers",
    "mamba_d_ssm": "state-space (Mamba) layers",
    "mamba_num_heads": "state-space (Mamba) layers",
    "ssm_state_size": "state-space (Mamba) layers",
    "linear_num_value_heads": "linear-attention layers",
}
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "attention", "global", "local")

# transformers 5.17 `configuration_<family>.py` class defaults, for fields a config.json may omit.
_DEFAULT_TIE = {"gemma": True, "gemma2": True, "gemma3_text": True}
_DEFAULT_HEAD_DIM = {"gemma": 256, "gemma2": 256, "gemma3_text": 256, "qwen3": 128, "qwen3_moe": 128}
_DEFAULT_VOCAB = {
    "llama": 32000,
    "mistral": 32000,
    "mixtral": 32000,
    "qwen2": 151936,
    "qwen3": 151936,
    "qwen2_moe": 151936,
    "qwen3_moe": 151936,
    "gemma": 256000,
    "gemma2": 256000,
    "gemma3_text": 262208,
    "phi3": 32064,
}


@dataclass(frozen=True)
class Linear:
    """One `nn.Linear` per decoder layer (in `layers` of them): a LoRA target and a bnb-quantized weight."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    layers: int

    @property
    def weight_numel(self) -> int:
        """Elements of the weight matrix of one instance."""
        return self.in_features * self.out_features


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only LM that memory and time depend on (sizes in elements)."""

    __hash__ = cached_hash
    __getstate__ = state_without_hash

    model_type: str
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    norms_per_layer: int
    fused_qkv: bool
    fused_gate_up: bool
    num_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    num_moe_layers: int
    shared_expert_intermediate_size: int
    final_logit_softcapping: float | None
    attn_logit_softcapping: float | None
    sliding_window: int | None
    sliding_layers: int  # layers whose attention is windowed (a materialized mask beyond the window)
    max_position_embeddings: int
    linears: tuple[Linear, ...]
    params_total: int
    params_active_per_token: int

    @property
    def q_width(self) -> int:
        """Width of the query projection (heads x head_dim); differs from hidden for Gemma."""
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of each of the key and value projections (GQA)."""
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        """True when some layers route tokens to experts."""
        return self.num_experts > 0 and self.num_moe_layers > 0

    @property
    def embedding_params(self) -> int:
        """Input embedding elements."""
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Output projection elements that are not shared with the input embedding."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def expert_params(self) -> int:
        """Elements of the fused 3D expert tensors (`experts.gate_up_proj`, `experts.down_proj`)."""
        return self.num_moe_layers * self.num_experts * 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def router_params(self) -> int:
        """Router weights: an `nn.Parameter` (not `nn.Linear`) in transformers 5 MoE routers."""
        return self.num_moe_layers * self.num_experts * self.hidden_size

    @property
    def linear_params(self) -> int:
        """Elements of all decoder-layer `nn.Linear` weights and biases."""
        return sum(
            lin.layers * (lin.weight_numel + (lin.out_features if lin.bias else 0)) for lin in self.linears
        )

    @property
    def norm_params(self) -> int:
        """RMSNorm weights (per-layer norms, q/k norms, the final norm)."""
        per_layer = self.norms_per_layer * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return self.num_layers * per_layer + self.hidden_size


def linear_modules(arch: Architecture) -> tuple[Linear, ...]:
    """The per-layer `nn.Linear` modules (names as peft matches them), with their shapes."""
    return arch.linears


def _int(
    cfg: Mapping[str, Any], key: str, default: int | None = None, low: int = 1, high: int = _MAX_DIM
) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise CoreInputError(FIELD, f"config.json lacks {key!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise CoreInputError(FIELD, f"{key!r} must be an integer; got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise CoreInputError(FIELD, f"{key!r} must be between {low} and {high}; got {value}")
    return value


def _opt_float(cfg: Mapping[str, Any], key: str, default: float | None) -> float | None:
    value = cfg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CoreInputError(FIELD, f"{key!r} must be a number or null; got {value!r}")
    return float(value)


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Multimodal configs (Gemma 3, Llava-style) nest the language model under `text_config`."""
    text = config.get("text_config")
    if isinstance(text, Mapping) and "hidden_size" not in config:
        merged = dict(text)
        if "model_type" not in merged:
            merged["model_type"] = f"{config.get('model_type', '')}_text"
        if "tie_word_embeddings" not in merged and "tie_word_embeddings" in config:
            merged["tie_word_embeddings"] = config["tie_word_embeddings"]
        return merged
    return config


def _refuse_unmodelled(cfg: Mapping[str, Any], model_type: str) -> None:
    """422 for configs whose layers tunefit does not model (rather than a silently wrong estimate)."""
    supported = ", ".join(KNOWN_FAMILIES)
    if model_type in NOT_LLAMA_SHAPED:
        raise CoreInputError(
            FIELD,
            f"model_type {model_type!r} is not modelled: its decoder is not Llama-shaped (no gated MLP or "
            f"other module names); tunefit models {supported} and Llama-shaped decoders",
        )
    for key, what in _UNMODELLED_FIELDS.items():
        if cfg.get(key) is not None:
            raise CoreInputError(
                FIELD,
                f"{key!r} means {what}, which tunefit does not model; it models {supported} "
                "and Llama-shaped decoders",
            )
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list):
        other = sorted({str(t) for t in layer_types if str(t) not in _ATTENTION_LAYER_TYPES})
        if other:
            raise CoreInputError(
                FIELD, f"'layer_types' has {', '.join(other)} layers, which are not modelled (attention only)"
            )


def llama_reading(arch: Architecture) -> str | None:
    """The sentence to show when a config's model_type is not one tunefit follows (read as Llama)."""
    if arch.model_type in KNOWN_FAMILIES or arch.model_type in ("gemma3", "gemma3_text"):
        return None
    return (
        f"model_type {arch.model_type!r} is not one tunefit follows ({', '.join(KNOWN_FAMILIES)}): it is "
        "read as a Llama-shaped decoder (q/k/v/o and gate/up/down projections, RMSNorm) from its sizes, "
        f"{arch.params_total / 1e9:,.2f} B parameters; check that count against the model card."
    )


def _family(model_type: str) -> str:
    if model_type in ("gemma3", "gemma3_text"):
        return "gemma3_text"
    if model_type in KNOWN_FAMILIES:
        return model_type
    return "llama"


def parse_config(config: Mapping[str, Any]) -> Architecture:
    """Read a Hugging Face config.json (dict) into an Architecture; CoreInputError(field='model_config')."""
    if not isinstance(config, Mapping):
        raise CoreInputError(FIELD, "must be a JSON object (a Hugging Face config.json)")
    cfg = _text_config(config)
    model_type = str(cfg.get("model_type") or "llama")
    _refuse_unmodelled(cfg, model_type)
    family = _family(model_type)
    hidden = _int(cfg, "hidden_size")
    layers = _int(cfg, "num_hidden_layers", high=_MAX_LAYERS)
    heads = _int(cfg, "num_attention_heads", high=_MAX_HEADS)
    kv_heads = _int(cfg, "num_key_value_heads", heads, high=_MAX_HEADS)
    if heads % kv_heads:
        raise CoreInputError(
            FIELD, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    head_dim_default = _DEFAULT_HEAD_DIM.get(family)
    if cfg.get("head_dim") is None and head_dim_default is None and hidden % heads:
        raise CoreInputError(FIELD, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_dim = _int(cfg, "head_dim", head_dim_default or hidden // heads)
    vocab = _int(cfg, "vocab_size", _DEFAULT_VOCAB.get(family), high=_MAX_VOCAB)
    tie = bool(cfg.get("tie_word_embeddings", _DEFAULT_TIE.get(family, False)))

    num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    if num_experts < 0 or num_experts > _MAX_EXPERTS:
        raise CoreInputError(
            FIELD, f"number of experts must be between 0 and {_MAX_EXPERTS}; got {num_experts}"
        )
    moe_inter = 0
    top_k = 0
    moe_layers = 0
    shared_inter = 0
    if num_experts:
        top_k = _int(cfg, "num_experts_per_tok", 2, high=num_experts)
        dense_default = cfg.get("intermediate_size")
        moe_inter = _int(cfg, "moe_intermediate_size", dense_default)
        step = _int(cfg, "decoder_sparse_step", 1, high=_MAX_LAYERS)
        dense_only = {int(i) for i in cfg.get("mlp_only_layers") or () if isinstance(i, int)}
        moe_layers = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
        shared_inter = _int(cfg, "shared_expert_intermediate_size", 0, low=0)
    inter_default = None if not num_experts or moe_layers < layers else moe_inter
    intermediate = _int(cfg, "intermediate_size", inter_default)

    qkv_bias = family in ("qwen2", "qwen2_moe") or bool(cfg.get("attention_bias", False))
    # Qwen3 applies attention_bias to o_proj too; Llama-style models use it for all four projections.
    o_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    qk_norm = family in ("qwen3", "qwen3_moe", "gemma3_text")
    norms_per_layer = 4 if family in ("gemma2", "gemma3_text") else 2
    fused = family == "phi3"

    dense_layers = layers - moe_layers
    lins: list[Linear] = []
    q_w, kv_w = heads * head_dim, kv_heads * head_dim
    if fused:
        lins.append(Linear("qkv_proj", hidden, q_w + 2 * kv_w, qkv_bias, layers))
    else:
        lins.append(Linear("q_proj", hidden, q_w, qkv_bias, layers))
        lins.append(Linear("k_proj", hidden, kv_w, qkv_bias, layers))
        lins.append(Linear("v_proj", hidden, kv_w, qkv_bias, layers))
    lins.append(Linear("o_proj", q_w, hidden, o_bias, layers))
    if dense_layers:
        if fused:
            lins.append(Linear("gate_up_proj", hidden, 2 * intermediate, mlp_bias, dense_layers))
        else:
            lins.append(Linear("gate_proj", hidden, intermediate, mlp_bias, dense_layers))
            lins.append(Linear("up_proj", hidden, intermediate, mlp_bias, dense_layers))
        lins.append(Linear("down_proj", intermediate, hidden, mlp_bias, dense_layers))
    if shared_inter:
        # Qwen2-MoE's shared expert is a plain MLP of nn.Linear (same names as a dense MLP) plus a gate.
        lins.append(Linear("gate_proj", hidden, shared_inter, False, moe_layers))
        lins.append(Linear("up_proj", hidden, shared_inter, False, moe_layers))
        lins.append(Linear("down_proj", shared_inter, hidden, False, moe_layers))
        lins.append(Linear("shared_expert_gate", hidden, 1, False, moe_layers))

    arch = Architecture(
        model_type=model_type,
        family=family,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=vocab,
        tie_embeddings=tie,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=qk_norm,
        norms_per_layer=norms_per_layer,
        fused_qkv=fused,
        fused_gate_up=fused,
        num_experts=num_experts,
        experts_per_token=top_k,
        moe_intermediate_size=moe_inter,
        num_moe_layers=moe_layers,
        shared_expert_intermediate_size=shared_inter,
        final_logit_softcapping=_opt_float(
            cfg, "final_logit_softcapping", 30.0 if family == "gemma2" else None
        ),
        attn_logit_softcapping=_opt_float(
            cfg, "attn_logit_softcapping", 50.0 if family == "gemma2" else None
        ),
        sliding_window=_opt_sliding(cfg, family),
        sliding_layers=_sliding_layers(cfg, family, layers),
        max_position_embeddings=_int(cfg, "max_position_embeddings", 4096, high=1 << 40),
        linears=tuple(lins),
        params_total=0,
        params_active_per_token=0,
    )
    total = (
        arch.embedding_params
        + arch.lm_head_params
        + arch.linear_params
        + arch.norm_params
        + arch.expert_params
        + arch.router_params
    )
    inactive = arch.num_moe_layers * (num_experts - top_k) * 3 * hidden * moe_inter
    return _replace_counts(arch, total, total - inactive)


def _opt_sliding(cfg: Mapping[str, Any], family: str) -> int | None:
    # Qwen configs carry a sliding_window that only applies with use_sliding_window
    # (configuration_qwen2.py / qwen3: `sliding_window if use_sliding_window else None`).
    if family.startswith("qwen") and not cfg.get("use_sliding_window", False):
        return None
    value = cfg.get("sliding_window")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _sliding_layers(cfg: Mapping[str, Any], family: str, layers: int) -> int:
    """How many layers attend within the window (transformers 5.17 `layer_types` defaults)."""
    if _opt_sliding(cfg, family) is None:
        return 0
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return sum(1 for t in types if t == "sliding_attention")
    if family == "gemma2":  # configuration_gemma2: sliding when (i + 1) % 2
        return (layers + 1) // 2
    if family == "gemma3_text":  # configuration_gemma3: sliding unless (i + 1) % pattern == 0
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        return layers - layers // max(pattern, 1)
    if family.startswith("qwen"):  # layers from max_window_layers on use the window
        return max(0, layers - int(cfg.get("max_window_layers") or layers))
    return layers


def _replace_counts(arch: Architecture, total: int, active: int) -> Architecture:
    from dataclasses import replace

    return replace(arch, params_total=total, params_active_per_token=active)
