"""Random-weights checkpoints from a config, and loading them the way users load a model for fine-tuning.

Memory and FLOPs do not depend on weight values, so a checkpoint with the model's own random init stands in
for the hub's weights; it is saved once per model per batch and every run loads it with from_pretrained.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from app.measure.spec import RunSpec

DONE_MARKER = "tunefit-checkpoint-complete"
LORA_DROPOUT = 0.0
CHECKPOINT_DTYPE = torch.bfloat16  # what hub checkpoints of these models mostly ship in

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "amp_bf16": torch.float32, "amp_fp16": torch.float32}


def build_checkpoint(config: dict[str, Any], out_dir: Path, device: str) -> dict[str, Any]:
    """Create the model from `config` with random weights on `device`, save_pretrained it, return facts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(config))
    cfg = AutoConfig.from_pretrained(out_dir)
    torch.manual_seed(0)
    # Built straight on the GPU in the checkpoint dtype: initialising a 14B model on the CPU takes minutes.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=CHECKPOINT_DTYPE)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    (out_dir / DONE_MARKER).write_text("ok")
    return {"params": n_params, "bytes_on_disk": size, "seconds": round(time.perf_counter() - t0, 2)}


def checkpoint_ready(path: Path) -> bool:
    """Whether a complete checkpoint exists at `path`."""
    return (path / DONE_MARKER).is_file()


def load_for_training(spec: RunSpec, ckpt: Path, device: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """from_pretrained the checkpoint as users do (BitsAndBytesConfig for QLoRA); return model, settings."""
    from transformers import AutoModelForCausalLM

    settings: dict[str, Any] = {}
    dtype = DTYPES[spec.precision]
    if spec.is_zero and spec.precision in ("amp_bf16", "amp_fp16"):
        # DeepSpeed casts the module to its 16-bit dtype anyway, so engines.sft_config loads 16 bits.
        dtype = torch.bfloat16 if spec.precision == "amp_bf16" else torch.float16
    kwargs: dict[str, Any] = {"attn_implementation": spec.attention, "dtype": dtype}
    if device.startswith("cuda"):
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    if spec.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if spec.precision.endswith("bf16") else torch.float16
        # Pure 16-bit precision: the unquantized parts load in the compute dtype (as users pass dtype=bf16).
        kwargs["dtype"] = compute if spec.precision in ("bf16", "fp16") else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=spec.double_quant,
        )
        settings.update(bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=str(compute).removeprefix("torch."),
                        bnb_4bit_use_double_quant=spec.double_quant)
    settings["load_dtype"] = str(kwargs["dtype"]).removeprefix("torch.")
    settings["device_map"] = str(kwargs.get("device_map"))
    model: Any = AutoModelForCausalLM.from_pretrained(str(ckpt), **kwargs)
    if not device.startswith("cuda"):
        model.to(device)
    # Training scripts switch the KV cache off; it is useless when every step is one full forward.
    model.config.use_cache = False
    settings["use_cache"] = False
    return model, settings


def apply_training_setup(model: Any, spec: RunSpec, settings: dict[str, Any]) -> Any:
    """Gradient checkpointing, peft's kbit preparation and LoRA adapters, as users apply them."""
    gc_kwargs = {"use_reentrant": spec.gc_use_reentrant}
    settings["gradient_checkpointing_kwargs"] = gc_kwargs if spec.gradient_checkpointing else None
    settings["enable_input_require_grads"] = False
    if spec.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs)
        settings["prepare_model_for_kbit_training"] = True
        settings["enable_input_require_grads"] = spec.gradient_checkpointing and spec.gc_use_reentrant
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        if spec.method == "lora" and spec.gc_use_reentrant:
            # Reentrant checkpointing needs an input that requires grad, and a frozen embedding gives none.
            model.enable_input_require_grads()
            settings["enable_input_require_grads"] = True
    if spec.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        all_linear = spec.lora_targets == ("all-linear",)
        targets: str | list[str] = "all-linear" if all_linear else list(spec.lora_targets)
        lcfg = LoraConfig(r=spec.lora_rank, lora_alpha=spec.alpha, target_modules=targets,
                          lora_dropout=LORA_DROPOUT, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        settings["lora_dropout"] = LORA_DROPOUT
        settings["lora_bias"] = "none"
        settings["lora_modules"] = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                          if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0})
    model.train()
    return model


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable); total counts the base model, 4-bit weights unpacked, adapters left out."""
    total = trainable = 0
    for name, p in model.named_parameters():
        n = p.numel()
        qs = getattr(p, "quant_state", None)
        if qs is not None and getattr(qs, "shape", None) is not None:
            n = int(torch.Size(qs.shape).numel())
        elif p.__class__.__name__ == "Params4bit":
            n = 2 * n  # packed two 4-bit values per byte, before quantization state exists
        if p.requires_grad:
            trainable += n
        if "lora_" not in name:
            total += n
    return total, trainable
