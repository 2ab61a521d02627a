"""Parameter tensors of a model as loaded for training: shapes, dtypes, what trains."""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from app.core import moe_lora
from app.core.architecture import Architecture
from app.core.quant import nf4_tensors
from app.core.setup import TrainingSetup

# (bytes of one tensor, how many such tensors)
Group = tuple[int, int]


class ParamGroup(NamedTuple):
    """`n` parameter tensors of one kind and shape (rows x cols; cols = 1 for vectors)."""

    kind: str  # embed | lm_head | linear | bias | norm | experts | router
    rows: int
    cols: int
    n: int  # how many such tensors


def param_bytes(setup: TrainingSetup) -> int:
    """Element size of the (base) model's parameters as loaded (the harness's `dtype`)."""
    if setup.precision in ("fp32", "amp_bf16", "amp_fp16"):
        return 4
    return 2


@lru_cache(maxsize=256)
def param_groups(arch: Architecture) -> tuple[ParamGroup, ...]:
    """Every parameter tensor of the model, in model.parameters() order by kind."""
    h = arch.hidden_size
    groups = [ParamGroup("embed", arch.vocab_size, h, 1)]
    for lin in arch.linears:
        groups.append(ParamGroup("linear", lin.out_features, lin.in_features, lin.layers))
        if lin.bias:
            groups.append(ParamGroup("bias", lin.out_features, 1, lin.layers))
    groups.append(ParamGroup("norm", h, 1, arch.num_layers * arch.norms_per_layer))
    if arch.qk_norm:
        groups.append(ParamGroup("norm", arch.head_dim, 1, 2 * arch.num_layers))
    if arch.is_moe:
        e, mi = arch.num_experts, arch.moe_intermediate_size
        groups.append(ParamGroup("experts", e * 2 * mi, h, arch.num_moe_layers))
        groups.append(ParamGroup("experts", e * h, mi, arch.num_moe_layers))
        groups.append(ParamGroup("router", e, h, arch.num_moe_layers))
    groups.append(ParamGroup("norm", h, 1, 1))
    if not arch.tie_embeddings:
        groups.append(ParamGroup("lm_head", arch.vocab_size, h, 1))
    return tuple(groups)


def lora_groups(arch: Architecture, targets: frozenset[str], rank: int) -> list[ParamGroup]:
    """The LoRA A (rank x in) and B (out x rank) matrices of every wrapped Linear."""
    groups: list[ParamGroup] = []
    for lin in arch.linears:
        if lin.name in targets:
            groups.append(ParamGroup("lora_A", rank, lin.in_features, lin.layers))
            groups.append(ParamGroup("lora_B", lin.out_features, rank, lin.layers))
    for p in moe_lora.expert_params(arch, targets, rank):  # peft ParamWrapper on MoE parameters
        groups.append(ParamGroup("lora_A", *p.a, arch.num_moe_layers))
        groups.append(ParamGroup("lora_B", *p.b, arch.num_moe_layers))
    return groups


def weight_tensors(arch: Architecture, setup: TrainingSetup) -> tuple[list[Group], int]:
    """Resident base-model weight tensors (bytes, count) and the largest dequantized weight (QLoRA)."""
    if setup.method != "qlora":
        size = param_bytes(setup)
        return [(g.rows * g.cols * size, g.n) for g in param_groups(arch)], 0
    groups: list[Group] = []
    largest = 0
    for g in param_groups(arch):
        if g.kind == "linear":
            # transformers `replace_with_bnb_linear` swaps every `type(module) is nn.Linear` except the
            # lm_head / tied embedding (`get_keys_to_not_convert`) for a bnb Linear4bit.
            for nbytes in nf4_tensors(g.rows * g.cols, setup.double_quant):
                groups.append((nbytes, g.n))
            # bnb MatMul4Bit dequantizes the whole weight to the 16-bit compute dtype for the matmul.
            largest = max(largest, g.rows * g.cols * 2)
        elif g.kind == "bias":
            # Linear4bit.forward casts its bias to the compute dtype in place (`bias.data = ...`).
            groups.append((g.rows * 2, g.n))
        else:
            # prepare_model_for_kbit_training casts every non-Params4bit fp16/bf16 parameter to fp32:
            # embedding, lm_head, norms -- and MoE experts, which transformers 5 stores as 3D
            # nn.Parameter tensors that bitsandbytes does not quantize.
            groups.append((g.rows * g.cols * 4, g.n))
    return groups, largest


def trainable_groups(arch: Architecture, setup: TrainingSetup, targets: frozenset[str]) -> list[ParamGroup]:
    """The tensors the optimizer updates."""
    if setup.method == "full":
        return list(param_groups(arch))
    return lora_groups(arch, targets, setup.lora_rank)


def grad_size(setup: TrainingSetup) -> int:
    """Bytes per element of gradients and torch optimizer states (= the trainable params' dtype)."""
    # peft get_peft_model(autocast_adapter_dtype=True) creates bf16/fp16 adapters as fp32.
    return param_bytes(setup) if setup.method == "full" else 4
