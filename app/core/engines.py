"""Ready-to-use multi-GPU engine configs (accelerate FSDP YAML, DeepSpeed ZeRO JSON) and PEFT/TRL settings.

Keys follow accelerate 1.x `accelerate config` (FSDP2), DeepSpeed's JSON schema with the Hugging Face
integration's "auto" values, peft `LoraConfig`, transformers `BitsAndBytesConfig` and TRL `SFTConfig`.
All values are plain dicts and strings: the API returns them as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.core.architecture import Architecture
from app.core.setup import TrainingSetup

# transformers' decoder-layer class per model family: FSDP wraps (shards) one of these per unit.
_LAYER_CLASS = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "mixtral": "MixtralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "qwen3": "Qwen3DecoderLayer",
    "qwen2_moe": "Qwen2MoeDecoderLayer",
    "qwen3_moe": "Qwen3MoeDecoderLayer",
    "gemma": "GemmaDecoderLayer",
    "gemma2": "Gemma2DecoderLayer",
    "gemma3_text": "Gemma3DecoderLayer",
    "phi3": "Phi3DecoderLayer",
}

_TRAINER_OPTIM = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "sgd": "sgd",
    "adafactor": "adafactor",
}


@dataclass(frozen=True)
class EngineConfig:
    """How to launch the run: engine name, config file(s), launch command, and library settings."""

    engine: str  # "single_gpu" | "ddp" | "fsdp" | "deepspeed_zero2" | "deepspeed_zero3"
    summary: str
    launch_command: str
    accelerate_config_yaml: str | None
    deepspeed_config: dict[str, Any] | None
    lora_config: dict[str, Any] | None
    bnb_config: dict[str, Any] | None
    sft_config: dict[str, Any]

    @property
    def deepspeed_config_json(self) -> str | None:
        """The DeepSpeed config as the JSON file to save next to the training script."""
        return json.dumps(self.deepspeed_config, indent=2) if self.deepspeed_config else None


def layer_class(arch: Architecture) -> str:
    """The decoder-layer class name FSDP should wrap for this model."""
    return _LAYER_CLASS.get(arch.family, "LlamaDecoderLayer")


def _yaml(data: dict[str, Any], indent: int = 0) -> str:
    """A minimal YAML writer for flat/nested dicts of scalars (all accelerate configs need)."""
    lines: list[str] = []
    pad = "  " * indent
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(_yaml(value, indent + 1))
        elif isinstance(value, bool):
            lines.append(f"{pad}{key}: {'true' if value else 'false'}")
        else:
            lines.append(f"{pad}{key}: {value}")
    return "\n".join(lines)


def _mixed_precision(setup: TrainingSetup) -> str:
    if setup.precision in ("fp16", "amp_fp16"):
        return "fp16"
    if setup.precision == "fp32":
        return "no"
    return "bf16"


def _fsdp_mixed_precision(setup: TrainingSetup) -> str:
    """accelerate's mixed_precision for FSDP: "no" for pure 16-bit training, the model dtype then rules.

    With mixed_precision bf16/fp16, accelerate upcasts every trainable parameter to fp32 before
    `fully_shard` (utils/fsdp_utils.py `fsdp2_prepare_model`: "Upcast to fp32 master weights"), which
    doubles sharded weights, gradients and optimizer states: right for amp_*, not for pure bf16/fp16.
    """
    return "no" if setup.precision in ("bf16", "fp16") else _mixed_precision(setup)


def accelerate_fsdp_yaml(arch: Architecture, setup: TrainingSetup) -> str:
    """accelerate FSDP2 config: full sharding per decoder layer, activation checkpointing by FSDP."""
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "mixed_precision": _fsdp_mixed_precision(setup),
        "num_machines": 1,
        "num_processes": setup.num_gpus,
        "machine_rank": 0,
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": layer_class(arch),
            "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            # FSDP2 checkpoints activations itself; the SFTConfig then leaves gradient_checkpointing off.
            "fsdp_activation_checkpointing": setup.gradient_checkpointing,
        },
    }
    return _yaml(cfg) + "\n"


def accelerate_ddp_yaml(setup: TrainingSetup) -> str:
    """accelerate multi-GPU (DDP) config: every GPU holds the whole model."""
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "mixed_precision": _mixed_precision(setup),
        "num_machines": 1,
        "num_processes": setup.num_gpus,
        "machine_rank": 0,
        "main_training_function": "main",
        "gpu_ids": "all",
        "use_cpu": False,
    }
    return _yaml(cfg) + "\n"


def deepspeed_config(setup: TrainingSetup, stage: int) -> dict[str, Any]:
    """DeepSpeed ZeRO-2/3 JSON with the HF integration's "auto" values (filled from SFTConfig)."""
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=200_000_000, reduce_scatter=True)
    else:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_max_live_parameters=1_000_000_000,
            stage3_max_reuse_distance=1_000_000_000,
            sub_group_size=1_000_000_000,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    mp = _mixed_precision(setup)
    return {
        "bf16": {"enabled": mp == "bf16"},
        "fp16": {"enabled": mp == "fp16"},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
    }


def resolve_deepspeed_auto(
    config: dict[str, Any], hidden_size: int, micro_batch: int, num_gpus: int, grad_accum: int = 1,
    max_grad_norm: float = 1.0,
) -> dict[str, Any]:
    """The DeepSpeed config with its "auto" values filled as HF Trainer fills them (a new dict).

    transformers integrations/deepspeed.py: `trainer_config_process` (batch sizes, accumulation,
    gradient_clipping = TrainingArguments.max_grad_norm, default 1.0), `trainer_config_finalize`
    (reduce_bucket_size = hidden^2; ZeRO-3: stage3_prefetch_bucket_size = int(0.9 hidden^2),
    stage3_param_persistence_threshold = 10 hidden), and `deepspeed_optim_sched`, which sets
    zero_allow_untested_optimizer when the Trainer's own optimizer (torch AdamW) is handed over.
    """
    filled: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * num_gpus,
        "gradient_clipping": max_grad_norm,
    }
    zero_auto = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    out = {k: (filled[k] if v == "auto" and k in filled else v) for k, v in config.items()}
    zero = dict(out.get("zero_optimization") or {})
    out["zero_optimization"] = {
        k: (zero_auto[k] if v == "auto" and k in zero_auto else v) for k, v in zero.items()
    }
    out["zero_allow_untested_optimizer"] = True
    return out


def lora_config(setup: TrainingSetup) -> dict[str, Any] | None:
    """peft LoraConfig keyword arguments for the request's rank, alpha and targets."""
    if setup.method == "full":
        return None
    targets: str | list[str] = (
        "all-linear"
        if any(t.lower() in ("all-linear", "all_linear") for t in setup.lora_targets)
        else list(setup.lora_targets)
    )
    return {
        "r": setup.lora_rank,
        "lora_alpha": setup.lora_alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def bnb_config(setup: TrainingSetup) -> dict[str, Any] | None:
    """transformers BitsAndBytesConfig keyword arguments for QLoRA (NF4, 16-bit compute)."""
    if setup.method != "qlora":
        return None
    compute = "float16" if setup.precision in ("fp16", "amp_fp16") else "bfloat16"
    cfg: dict[str, Any] = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": compute,
        "bnb_4bit_use_double_quant": setup.double_quant,
    }
    if setup.num_gpus > 1 and setup.parallelism in ("fsdp", "zero3"):
        # FSDP/ZeRO-3 can only shard the packed NF4 weights when they are stored in a float dtype.
        cfg["bnb_4bit_quant_storage"] = compute
    return cfg


def sft_config(setup: TrainingSetup, grad_accum: int, epochs: int, engine: str) -> dict[str, Any]:
    """TRL SFTConfig keyword arguments matching the estimate (micro-batch, accumulation, precision)."""
    # The Trainer's bf16/fp16 flags become accelerate's mixed_precision (they override the YAML's).
    mp = _fsdp_mixed_precision(setup) if engine == "fsdp" else _mixed_precision(setup)
    # amp_* loads fp32 weights (autocast computes in 16 bits); DeepSpeed casts the module to its bf16/fp16
    # dtype anyway (engine.py `_cast_module_mixed_precision`), so it loads 16-bit weights directly.
    amp = setup.precision in ("amp_bf16", "amp_fp16") and not engine.startswith("deepspeed")
    if setup.precision == "fp32" or amp:
        load_dtype = "float32"
    else:
        load_dtype = "float16" if setup.precision in ("fp16", "amp_fp16") else "bfloat16"
    fsdp_checkpoints = engine == "fsdp"
    cfg: dict[str, Any] = {
        "output_dir": "out",
        "per_device_train_batch_size": setup.batch_size,
        "gradient_accumulation_steps": grad_accum,
        "num_train_epochs": epochs,
        "max_length": setup.seq_len,
        "packing": False,
        "bf16": mp == "bf16",
        "fp16": mp == "fp16",
        "optim": _TRAINER_OPTIM.get(setup.optimizer, "adamw_torch"),
        "learning_rate": 1e-5 if setup.method == "full" else 2e-4,
        "gradient_checkpointing": setup.gradient_checkpointing and not fsdp_checkpoints,
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 500,
        "model_init_kwargs": {
            "dtype": load_dtype,
            "attn_implementation": setup.attention,
        },
    }
    if setup.gradient_checkpointing and not fsdp_checkpoints:
        cfg["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if engine.startswith("deepspeed"):
        cfg["deepspeed"] = f"ds_zero{engine[-1]}.json"
    return cfg


def engine_config(
    arch: Architecture, setup: TrainingSetup, grad_accum: int = 1, epochs: int = 1
) -> EngineConfig:
    """The launch recipe for a setup: which engine, its config, and the matching PEFT/TRL settings."""
    n = setup.num_gpus
    yaml: str | None = None
    ds: dict[str, Any] | None = None
    if n == 1:
        engine = "single_gpu"
        summary = "One GPU: no distributed engine needed."
        launch = "python train.py"
    elif setup.parallelism == "ddp":
        engine = "ddp"
        summary = f"DDP over {n} GPUs: each holds the whole model and gradients are all-reduced."
        yaml = accelerate_ddp_yaml(setup)
        launch = "accelerate launch --config_file accelerate_ddp.yaml train.py"
    elif setup.parallelism == "fsdp":
        engine = "fsdp"
        summary = (
            f"PyTorch FSDP2 via accelerate over {n} GPUs: weights, gradients and optimizer states are "
            f"sharded per {layer_class(arch)}"
            + (
                "; mixed precision keeps them in fp32 and all-gathers 16-bit copies."
                if _fsdp_mixed_precision(setup) in ("bf16", "fp16")
                else "."
            )
        )
        yaml = accelerate_fsdp_yaml(arch, setup)
        launch = "accelerate launch --config_file accelerate_fsdp.yaml train.py"
    else:
        stage = 3 if setup.parallelism == "zero3" else 2
        engine = f"deepspeed_zero{stage}"
        shards = "weights, gradients and optimizer states" if stage == 3 else "gradients and optimizer states"
        summary = f"DeepSpeed ZeRO-{stage} over {n} GPUs: {shards} are partitioned across GPUs" + (
            "; the optimizer keeps an fp32 master partition." if setup.precision != "fp32" else "."
        )
        ds = deepspeed_config(setup, stage)
        # HF Trainer/TRL reads the JSON from SFTConfig(deepspeed=...); torchrun starts one process per GPU.
        launch = f"torchrun --nproc_per_node {n} train.py  # SFTConfig(deepspeed='ds_zero{stage}.json')"
    return EngineConfig(
        engine=engine,
        summary=summary,
        launch_command=launch,
        accelerate_config_yaml=yaml,
        deepspeed_config=ds,
        lora_config=lora_config(setup),
        bnb_config=bnb_config(setup),
        sft_config=sft_config(setup, grad_accum, epochs, engine),
    )
