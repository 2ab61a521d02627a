"""LoRA on MoE experts and routers: peft's `target_parameters` path under transformers 5.

transformers 5 stores a MoE layer's experts as fused 3D parameters (`experts.gate_up_proj`
(E, 2 x mi, h), `experts.down_proj` (E, h, mi)) and its router weight as a parameter of a custom
module, so none is an `nn.Linear`. peft 0.21 (utils/transformers_weight_conversion.py,
`_convert_peft_config_moe`) maps the v4 names for mixtral (w1, w3 -> gate_up_proj; w2 -> down_proj;
gate -> gate.weight) and the qwen2_moe family, qwen3_moe included (gate_proj, up_proj ->
gate_up_proj; down_proj -> down_proj; gate -> gate.weight) to `target_parameters`, and
`all-linear` adds all of them. The fused gate_up gets rank 2r (and alpha 2 x alpha); naming only
one of its two halves is peft's ValueError.

Each targeted parameter gets a `ParamWrapper` (tuners/lora/layer.py): lora_A (r x E, in) and
lora_B (out, r x E), in the parameter's dtype (`_move_adapter_to_device_of_base_layer`; fp32 after
`cast_adapter_dtype`). At every forward `_LoraFactorsProxy` folds them into the weight with one
`baddbmm(W, lhs, rhs)`: a new tensor as large as the whole expert stack, W' = W + BA, alive through
the experts' forward and saved by grouped_mm for its backward, whose weight gradient (also
W-sized) feeds the adapters' gradients. Run m-blind-wide-014 (Qwen3-30B-A3B 8 layers, QLoRA
all-linear) counted 166,084,608 trainable parameters, exactly the shapes below.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.core.architecture import Architecture
from app.core.errors import CoreInputError

GATE_UP = "experts.gate_up_proj"
DOWN = "experts.down_proj"
ROUTER = "gate.weight"
PARAMS = frozenset({GATE_UP, DOWN, ROUTER})

# v4 module name -> the transformers 5 parameter it now lives in (peft _MOE_TARGET_MODULE_MAPPING)
_MAPPING = {
    "mixtral": {"gate": ROUTER, "w1": GATE_UP, "w3": GATE_UP, "w2": DOWN},
    "qwen2_moe": {"gate": ROUTER, "gate_proj": GATE_UP, "up_proj": GATE_UP, "down_proj": DOWN},
}
_FAMILY = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen2_moe"}


def mapping(arch: Architecture) -> dict[str, str]:
    """The v4 names peft converts to parameter targets on this architecture ({} when none)."""
    if not arch.is_moe:
        return {}
    return _MAPPING.get(_FAMILY.get(arch.family, ""), {})


def param_targets(arch: Architecture, targets: tuple[str, ...], all_linear: bool) -> frozenset[str]:
    """The parameters (GATE_UP, DOWN, ROUTER) peft wraps for these targets; raises on half of gate_up."""
    names = mapping(arch)
    if not names:
        return frozenset()
    chosen = set(names) if all_linear else {t for t in targets if t in names}
    halves = sorted(n for n, p in names.items() if p == GATE_UP)
    picked = [n for n in halves if n in chosen]
    if picked and len(picked) < len(halves):
        missing = ", ".join(n for n in halves if n not in chosen)
        raise CoreInputError(
            "lora_targets",
            f"{', '.join(picked)} without {missing}: transformers 5 fuses them into "
            f"experts.gate_up_proj, and peft refuses to target half of it",
        )
    return frozenset(names[n] for n in chosen)


@dataclass(frozen=True)
class ExpertParam:
    """One targeted MoE parameter: its LoRA shapes and the size of its materialized W + BA."""

    name: str
    a: tuple[int, int]  # lora_A weight (rows, cols)
    b: tuple[int, int]  # lora_B weight
    numel: int  # elements of the base parameter, per layer (W' and its gradient have as many)
    rank: int  # per expert (the fused gate_up: 2r)


def expert_params(arch: Architecture, wrapped: frozenset[str], rank: int) -> tuple[ExpertParam, ...]:
    """Per MoE layer, the wrapped parameters in model order (router, then the experts' two)."""
    e, h, mi = arch.num_experts, arch.hidden_size, arch.moe_intermediate_size
    out: list[ExpertParam] = []
    if ROUTER in wrapped:  # a 2D parameter (E, h): in = h, out = E, one "expert"
        out.append(ExpertParam(ROUTER, (rank, h), (e, rank), e * h, rank))
    if GATE_UP in wrapped:  # (E, 2mi, h), in/out swapped for the non-transposed layout: in = h
        r2 = 2 * rank * e  # fused w1 + w3: rank_pattern 2r
        out.append(ExpertParam(GATE_UP, (r2, h), (2 * mi, r2), e * 2 * mi * h, 2 * rank))
    if DOWN in wrapped:  # (E, h, mi): in = mi, out = h
        out.append(ExpertParam(DOWN, (rank * e, mi), (h, rank * e), e * h * mi, rank))
    return tuple(out)


def weight_bytes(method: str, param_elem: int) -> int:
    """Bytes per element of the expert parameters, hence of W + BA and its gradient."""
    # prepare_model_for_kbit_training casts the unquantized 3D experts to fp32 (params.weight_tensors).
    return 4 if method == "qlora" else param_elem


def folded(arch: Architecture, wrapped: frozenset[str], elem: int) -> tuple[int, int]:
    """Bytes of one layer's W + BA for gate_up and for down (0 where not wrapped)."""
    e, h, mi = arch.num_experts, arch.hidden_size, arch.moe_intermediate_size
    gate_up = e * 2 * mi * h * elem if GATE_UP in wrapped else 0
    down = e * h * mi * elem if DOWN in wrapped else 0
    return gate_up, down


def saved_per_token(arch: Architecture, wrapped: frozenset[str], elem: int, out: int) -> tuple[int, ...]:
    """Bytes per token the experts keep for backward because their folded weights need a gradient.

    grouped_mm saves its input when its weight requires grad: the k gathered copies of the hidden
    state (gate_up) and the gated activation (down), cast to the weight's dtype (`_grouped_mm`'s
    `input.to(weight.dtype)`); a trained router makes the weighting keep the experts' output.
    """
    k, h, mi = arch.experts_per_token, arch.hidden_size, arch.moe_intermediate_size
    kept: list[int] = []
    if GATE_UP in wrapped:
        kept.append(k * h * elem)
    if DOWN in wrapped:
        kept.append(k * mi * elem)
    if ROUTER in wrapped:
        kept.append(k * h * out)
    return tuple(kept)
