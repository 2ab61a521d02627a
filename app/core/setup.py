"""What the user wants to train: method, precision, optimizer, batch shape, parallelism."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from app.core.errors import CoreInputError
from app.core.keys import cached_hash, state_without_hash

Method = Literal["full", "lora", "qlora"]
Precision = Literal["bf16", "fp16", "fp32", "amp_bf16", "amp_fp16"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor"]
Attention = Literal["sdpa", "eager", "flash_attention_2"]
Parallelism = Literal["ddp", "fsdp", "zero2", "zero3"]

METHODS: tuple[str, ...] = get_args(Method)
PRECISIONS: tuple[str, ...] = get_args(Precision)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
PARALLELISMS: tuple[str, ...] = get_args(Parallelism)

# Sanity bounds: beyond these a request is a typo, not a training run.  Sequences are allowed to be
# absurdly long (the estimate then says it does not fit); counts of GPUs and ranks are not.
MAX_BATCH_SIZE = 1 << 40
MAX_SEQ_LEN = 10**18
MAX_LORA_RANK = 1 << 20
MAX_NUM_GPUS = 1 << 16


@dataclass(frozen=True)
class TrainingSetup:
    """One training configuration (per-GPU micro-batch); validated on construction."""

    __hash__ = cached_hash
    __getstate__ = state_without_hash

    method: Method
    precision: Precision = "bf16"
    optimizer: Optimizer = "adamw"
    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = True
    attention: Attention = "sdpa"
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    double_quant: bool = True
    num_gpus: int = 1
    parallelism: Parallelism = "ddp"
    # FSDP/ZeRO-3 loading. False: ranks load their shards only, as the engine configs tunefit hands out
    # do (accelerate `fsdp_cpu_ram_efficient_loading`, DeepSpeed `zero.Init`). True: every rank first
    # loads the whole model onto its GPU and then shards it (from_pretrained with a GPU device_map, then
    # fully_shard), as `tunefit measure` ran its FSDP batch (data/calibration/h200-d-fsdp-2gpu.jsonl).
    # True also marks that harness's bare `fully_shard` (no MixedPrecisionPolicy: amp_* gathers fp32 layers
    # under autocast); False is accelerate's FSDP2, whose mixed precision all-gathers 16-bit copies.
    full_model_load_per_gpu: bool = False

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("attention", self.attention, ATTENTIONS)
        _choice("parallelism", self.parallelism, PARALLELISMS)
        _int_in("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _int_in("seq_len", self.seq_len, 1, MAX_SEQ_LEN)
        _int_in("num_gpus", self.num_gpus, 1, MAX_NUM_GPUS)
        if self.attention == "flash_attention_2" and self.precision == "fp32":
            # flash-attn kernels take fp16/bf16 only, and transformers casts fp32 q/k/v only to an
            # autocast or pre-quantization dtype: pure fp32 training fails at the first forward.
            raise CoreInputError("attention", "flash_attention_2 runs only in fp16/bf16: use sdpa with fp32")
        if self.method != "full":
            _int_in("lora_rank", self.lora_rank, 1, MAX_LORA_RANK)
            _int_in("lora_alpha", self.lora_alpha, 1, 1 << 30)
            if isinstance(self.lora_targets, str) or not self.lora_targets:
                raise CoreInputError("lora_targets", "give one or more module names, or all-linear")
            for name in self.lora_targets:
                if not isinstance(name, str) or not name.strip():
                    raise CoreInputError("lora_targets", f"not a module name: {name!r}")

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch on one GPU."""
        return self.batch_size * self.seq_len


def _choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CoreInputError(field, f"must be one of {', '.join(allowed)}; got {value!r}")


def _int_in(field: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CoreInputError(field, f"must be an integer; got {value!r}")
    if not low <= value <= high:
        raise CoreInputError(field, f"must be between {low} and {high}; got {value}")
