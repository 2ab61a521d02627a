"""Measure what autograd saves per decoder layer for tiny models on the CPU, and compare with the core.

Uses the real transformers/peft modeling code (the same `apply_training_setup` as the measurement
harness) and `torch.autograd.graph.saved_tensors_hooks`: every tensor autograd keeps for backward is
recorded once per storage, parameters excluded.  The per-layer figure is the difference between a
2-layer and a 1-layer model, divided by the tokens.  Usage:

    .venv/bin/python scripts/inspect_saved.py [family ...]
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.activations import layer_activations, lora_target_names
from app.core.architecture import parse_config
from app.core.setup import TrainingSetup


def _tiny(model_type: str, **extra: Any) -> dict[str, Any]:
    """A 256-wide config of one family (the layer count is set per measurement)."""
    return dict(
        model_type=model_type,
        hidden_size=256,
        intermediate_size=704,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,
        **extra,
    )


TINY: dict[str, dict[str, Any]] = {
    "llama": _tiny("llama", tie_word_embeddings=False),
    "qwen2": _tiny("qwen2", tie_word_embeddings=False),
    "qwen3": _tiny("qwen3", head_dim=48, tie_word_embeddings=False),
    "gemma2": _tiny("gemma2", head_dim=48),
    "gemma3_text": _tiny("gemma3_text", head_dim=48),
    "phi3": _tiny("phi3", pad_token_id=0),
    "mistral": _tiny("mistral"),
}

SETUPS: list[dict[str, Any]] = [
    dict(method="full", precision="bf16"),
    dict(method="full", precision="fp32"),
    dict(method="full", precision="amp_bf16"),
    dict(method="lora", precision="bf16"),
    dict(method="lora", precision="bf16", lora_targets=("all-linear",)),
    dict(method="lora", precision="amp_bf16", lora_targets=("all-linear",)),
    dict(method="full", precision="bf16", attention="eager"),
]


def saved_bytes(cfg: dict[str, Any], layers: int, setup: dict[str, Any], batch: int, seq: int) -> int:
    """Bytes of distinct non-parameter storages autograd saves in one forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from app.measure.model_build import DTYPES, apply_training_setup
    from app.measure.spec import RunSpec

    conf = AutoConfig.for_model(**{**cfg, "num_hidden_layers": layers})
    conf._attn_implementation = setup.get("attention", "sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf, dtype=DTYPES[setup["precision"]])
    model.config.use_cache = False
    spec = RunSpec(
        model=None,
        model_config=cfg,
        model_config_source="inline",
        gradient_checkpointing=False,
        **setup,
    )
    model = apply_training_setup(model, spec, {})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.nbytes() > 0:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randint(0, cfg["vocab_size"], (batch, seq))
    amp = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if setup["precision"] == "amp_bf16"
        else contextlib.nullcontext()
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(input_ids=x, labels=x)
    return sum(seen.values())


def main(families: list[str]) -> None:
    """Print measured vs predicted saved bytes per token per layer."""
    batch, seq = 2, 64
    tokens = batch * seq
    print(f"{'family':12} {'setup':44} {'measured':>9} {'core':>9} {'diff':>7}")
    for fam in families or list(TINY):
        cfg = TINY[fam]
        arch = parse_config({**cfg, "num_hidden_layers": 2})
        for s in SETUPS:
            try:
                measured = (saved_bytes(cfg, 2, s, batch, seq) - saved_bytes(cfg, 1, s, batch, seq)) / tokens
            except ValueError as exc:  # e.g. an attention implementation this transformers refuses
                print(f"{fam:12} {s!s:44} n/a: {str(exc)[:60]}")
                continue
            setup = TrainingSetup(**s)
            targets = lora_target_names(arch, setup.lora_targets) if setup.method != "full" else frozenset()
            la = layer_activations(arch, setup, targets)
            core: float = la.saved + (
                la.attn_scores_saved * arch.num_heads * seq if setup.attention == "eager" else 0
            )
            if setup.precision.startswith("amp"):
                # autocast's 16-bit weight copies are saved by each linear (weight-sized, not per token)
                copies = sum(lin.weight_numel for lin in arch.linears)
                copies += sum(
                    setup.lora_rank * (lin.in_features + lin.out_features)
                    for lin in arch.linears
                    if lin.name in targets
                )
                core += 2 * copies / tokens
            label = ",".join(f"{v if not isinstance(v, tuple) else '+'.join(v)}" for v in s.values())
            print(f"{fam:12} {label:44} {measured:9.0f} {core:9.0f} {core / measured - 1:+7.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
