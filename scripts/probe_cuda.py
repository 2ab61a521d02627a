"""On a CUDA machine: what autograd saves per decoder layer (bytes/token), measured vs the core.

Like scripts/inspect_saved.py but on the GPU, through the measurement harness's own loading path
(`build_checkpoint` -> `load_for_training` -> `apply_training_setup`), so QLoRA (bitsandbytes NF4 +
prepare_model_for_kbit_training) and CUDA's SDPA backends are what is inspected.  Prints one JSON
line per case.  Usage on the device:  python3 scripts/probe_cuda.py [--quick]
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.activations import layer_activations, lora_target_names
from app.core.architecture import parse_config
from app.core.setup import TrainingSetup
from app.measure.model_build import apply_training_setup, build_checkpoint, load_for_training
from app.measure.spec import RunSpec

BASE = dict(
    model_type="llama",
    hidden_size=512,
    intermediate_size=1408,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=2000,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": BASE,
    "qwen3": dict(BASE, model_type="qwen3", head_dim=96),
    "gemma3_text": dict(BASE, model_type="gemma3_text", head_dim=96, sliding_window=4096),
    "phi3": dict(BASE, model_type="phi3", pad_token_id=0),
}
CASES: list[dict[str, Any]] = [
    dict(method="full", precision="bf16"),
    dict(method="full", precision="amp_bf16"),
    dict(method="lora", precision="bf16"),
    dict(method="lora", precision="bf16", lora_targets=("all-linear",)),
    dict(method="qlora", precision="bf16"),
    dict(method="qlora", precision="bf16", lora_targets=("all-linear",)),
    dict(method="full", precision="bf16", attention="eager"),
    dict(method="qlora", precision="bf16", attention="eager"),
]


def saved(cfg: dict[str, Any], layers: int, case: dict[str, Any], batch: int, seq: int, tmp: Path) -> int:
    """Distinct non-parameter storages (bytes) autograd saves in one CUDA forward."""
    conf = {**cfg, "num_hidden_layers": layers}
    spec = RunSpec(
        model=None, model_config=conf, model_config_source="inline", gradient_checkpointing=False, **case
    )
    ckpt = tmp / f"{cfg['model_type']}-{layers}"
    if not ckpt.exists():
        build_checkpoint(conf, ckpt, "cuda")
    model, settings = load_for_training(spec, ckpt, "cuda")
    model = apply_training_setup(model, spec, settings)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.nbytes() > 0:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randint(0, cfg["vocab_size"], (batch, seq), device="cuda")
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if case["precision"] == "amp_bf16"
        else contextlib.nullcontext()
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        loss = model(input_ids=x, labels=x).loss
    del loss, model
    torch.cuda.empty_cache()
    return sum(seen.values())


def main(quick: bool) -> None:
    """One JSON line per (family, case): measured and predicted saved bytes per token per layer."""
    batch, seq = 2, 256
    tokens = batch * seq
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for fam, cfg in FAMILIES.items():
            if quick and fam != "llama":
                continue
            arch = parse_config({**cfg, "num_hidden_layers": 2})
            for case in CASES:
                if fam == "phi3" and case.get("lora_targets") is None and case["method"] != "full":
                    case = dict(case, lora_targets=("qkv_proj",))
                try:
                    m = (saved(cfg, 2, case, batch, seq, tmp) - saved(cfg, 1, case, batch, seq, tmp)) / tokens
                except Exception as exc:  # report and go on: one family's failure must not end the probe
                    print(json.dumps({"family": fam, **case, "error": repr(exc)[:300]}), flush=True)
                    continue
                setup = TrainingSetup(**case)
                targets = (
                    lora_target_names(arch, setup.lora_targets) if setup.method != "full" else frozenset()
                )
                la = layer_activations(arch, setup, targets)
                core: float = la.saved + (
                    la.attn_scores_saved * arch.num_heads * seq if setup.attention == "eager" else 0
                )
                if setup.precision.startswith("amp"):
                    # autocast's 16-bit weight copies, saved by each linear (weight-sized)
                    copies = sum(lin.weight_numel for lin in arch.linears)
                    core += 2 * copies / tokens
                print(
                    json.dumps(
                        {
                            "family": fam,
                            **case,
                            "measured": round(m, 1),
                            "core": core,
                            "diff": round(core / m - 1, 4),
                        }
                    ),
                    flush=True,
                )


def sdpa_backends() -> None:
    """Which SDPA backends accept fp32/bf16 GQA causal inputs, and what the default call saves."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 8, 256, 64, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(2, 2, 256, 64, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(2, 2, 256, 64, device="cuda", dtype=dtype, requires_grad=True)
        ok: dict[str, str] = {}
        for b in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.MATH,
        ):
            try:
                with sdpa_kernel([b]):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                ok[b.name] = "ok"
            except Exception as exc:
                ok[b.name] = repr(exc)[:80]
        sizes: list[tuple[str, int, tuple[int, ...]]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append((str(t.dtype), t.untyped_storage().nbytes(), tuple(t.shape)))  # noqa: B023
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        print(
            json.dumps(
                {
                    "sdpa_dtype": str(dtype),
                    "backends": ok,
                    "saved": sizes,
                    "out_stride": out.stride(),
                    "out_t_contig": out.transpose(1, 2).is_contiguous(),
                }
            )
        )


if __name__ == "__main__":
    sdpa_backends()
    main("--quick" in sys.argv)
