"""Memory the caching allocator keeps after loading an MoE checkpoint into transformers 5's fused experts."""

from __future__ import annotations

from app.core.architecture import Architecture
from app.core.setup import TrainingSetup

# transformers 5 keeps each MoE layer's experts as two fused 3-D parameters (gate_up_proj, down_proj)
# while hub checkpoints (and its own save_pretrained) store one tensor per expert: on load the weight
# converter (conversion_mapping.py "mixtral"/"qwen2_moe": MergeModulelist(dim=0) then Concatenate(dim=1))
# materializes the per-expert gate and up tensors, stacks each list and concatenates the two stacks, and
# stacks the per-expert down tensors. Every layer repeats the same sizes, so the freed transients of one
# layer (per-expert sources ~g, the two stacks g, the down sources g/2, with g one layer's gate_up bytes)
# are reused by the next and the caching allocator ends the load holding about 2.5 g reserved but free.
# Measured reserved - allocated after load: Mixtral-8x7B (4 layers) 2.50 g (e-gemma3-mixtral-fp16-013,
# -015: 4,699,380,736 B, g = 1,879,048,192), Qwen3-30B-A3B (8 layers) 3.0 g (c-large-007/008, its 3 MB
# per-expert tensors share 20 MB segments); the QLoRA load, whose other Linears are quantized in
# between, 2.0 g for both (e-014: 3,761,354,752 B; c-large-009: 1,621,698,560 B).
# The load replay now plays the converter's tensors layer after layer (loading._convert_experts, from
# trace-c-large-008); the real loader's threads also materialize the next layer's sources into the
# holes the converter frees (16 of 384 per Qwen3-MoE layer in that trace), which the replay leaves out,
# so its load ends with less reserved than measured (Qwen3-MoE 11.58 vs 12.70 GiB, Mixtral 13.93 vs
# 15.68): these measured amounts stay a floor under the peak.
_LOAD_EXCESS_G = 2.5
_LOAD_EXCESS_G_QLORA = 2.0
# QLoRA: prepare_model_for_kbit_training casts each bf16 expert tensor to fp32 (a new tensor twice the
# size, then the bf16 one is freed). A layer's fp32 down_proj (g bytes) fits the block its bf16
# gate_up_proj freed, but the bf16 down_proj's block (g/2) fits nothing later: +g/2 per MoE layer.
# Measured after the cast: e-014 3.72 g for the 4 g this gives, c-large-009 5.56 g for 6 g.
_CAST_EXCESS_G_PER_LAYER = 0.5


def moe_load_excess(arch: Architecture, setup: TrainingSetup) -> int:
    """Bytes reserved but free after loading (and, for QLoRA, fp32-casting) the fused MoE experts."""
    if not arch.is_moe:
        return 0
    elem = 4 if setup.precision in ("fp32", "amp_bf16", "amp_fp16") and setup.method != "qlora" else 2
    g = arch.num_experts * 2 * arch.moe_intermediate_size * arch.hidden_size * elem
    if setup.method != "qlora":
        return int(_LOAD_EXCESS_G * g)
    return int((_LOAD_EXCESS_G_QLORA + _CAST_EXCESS_G_PER_LAYER * arch.num_moe_layers) * g)
