"""What one measured run is: the API's input fields, resolved model config, and batch plans (stdlib only)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The core's field values and defaults (app/core/setup.py is stdlib-only, like this harness).
from app.core.setup import ATTENTIONS, METHODS, OPTIMIZERS, PARALLELISMS, PRECISIONS, TrainingSetup

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where a model slug is looked up: the catalog's configs, then reduced configs used only for calibration.
# When tunefit is installed as a package, the repository's data/ is looked for in the working directory.
_SUBDIRS = (Path("data/models"), Path("data/calibration/configs"))
CONFIG_DIRS = tuple(dict.fromkeys(base / sub for base in (REPO_ROOT, Path.cwd()) for sub in _SUBDIRS))


class SpecError(ValueError):
    """A run's inputs are invalid; `field` names the API field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class RunSpec:
    """One run's inputs, with the API's field names (plus harness-only knobs: steps, seed, reentrant GC)."""

    model: str | None
    model_config: dict[str, Any]
    model_config_source: str
    method: str
    precision: str = TrainingSetup.precision
    optimizer: str = TrainingSetup.optimizer
    batch_size: int = TrainingSetup.batch_size
    seq_len: int = TrainingSetup.seq_len
    gradient_checkpointing: bool = TrainingSetup.gradient_checkpointing
    attention: str = TrainingSetup.attention
    lora_rank: int = TrainingSetup.lora_rank
    lora_alpha: int | None = None
    lora_targets: tuple[str, ...] = TrainingSetup.lora_targets
    double_quant: bool = TrainingSetup.double_quant
    num_gpus: int = TrainingSetup.num_gpus
    parallelism: str = TrainingSetup.parallelism
    steps: int = 6
    gc_use_reentrant: bool = False
    seed: int = 0
    note: str = ""

    @property
    def is_zero(self) -> bool:
        """Whether this run trains under DeepSpeed ZeRO (several GPUs, zero2 or zero3)."""
        return self.num_gpus > 1 and self.parallelism in ("zero2", "zero3")

    @property
    def alpha(self) -> int:
        """LoRA alpha, defaulting to twice the rank as the API does."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    def checkpoint_key(self) -> str:
        """A file-system-safe name for this model's random-weights checkpoint."""
        digest = hashlib.sha256(json.dumps(self.model_config, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.model or 'config'}-{digest}"

    def inputs(self) -> dict[str, Any]:
        """The input fields as they appear in a JSON line."""
        d = dataclasses.asdict(self)
        d["lora_alpha"] = self.alpha
        d["lora_targets"] = list(self.lora_targets)
        return d


def _check(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise SpecError(field_name, message)


def validate(spec: RunSpec) -> RunSpec:
    """Raise SpecError if any field is out of range; return the spec unchanged."""
    _check(spec.method in METHODS, "method", f"must be one of {METHODS}")
    _check(spec.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
    _check(spec.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
    _check(spec.attention in ATTENTIONS, "attention", f"must be one of {ATTENTIONS}")
    _check(spec.parallelism in PARALLELISMS, "parallelism", f"must be one of {PARALLELISMS}")
    _check(spec.batch_size >= 1, "batch_size", "must be >= 1")
    _check(spec.seq_len >= 2, "seq_len", "must be >= 2")
    _check(spec.steps >= 2, "steps", "must be >= 2 (the first step is the warm-up)")
    _check(spec.lora_rank >= 1, "lora_rank", "must be >= 1")
    _check(len(spec.lora_targets) >= 1, "lora_targets", "must name at least one module or all-linear")
    _check(spec.num_gpus >= 1, "num_gpus", "must be >= 1")
    _check(
        spec.num_gpus == 1 or spec.parallelism in ("fsdp", "ddp", "zero2", "zero3"),
        "parallelism",
        "this harness runs one GPU, or several with fsdp, ddp, zero2 or zero3 (torchrun)",
    )
    # engines.py hands out bnb_4bit_quant_storage for ZeRO-3 QLoRA; the harness's loader does not set it.
    _check(not (spec.is_zero and spec.parallelism == "zero3" and spec.method == "qlora"), "method",
           "qlora under zero3 is not built in this harness (it needs bnb_4bit_quant_storage)")
    _check(spec.method != "qlora" or spec.precision in ("bf16", "amp_bf16", "fp16", "amp_fp16"),
           "precision", "qlora needs a 16-bit compute dtype")
    _check(isinstance(spec.model_config.get("model_type"), str), "model_config", "needs model_type")
    return spec


def find_model_config(slug: str, dirs: tuple[Path, ...] = CONFIG_DIRS) -> Path:
    """The config.json file for a slug, from data/models/ or data/calibration/configs/."""
    for d in dirs:
        path = d / f"{slug}.json"
        if path.is_file():
            return path
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.json")})
    raise SpecError("model", f"unknown slug {slug!r}; known: {', '.join(known) or 'none'}")


def _targets(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(t.strip() for t in value.split(",") if t.strip())
    return tuple(str(t) for t in value)


_SPEC_FIELDS = {f.name for f in dataclasses.fields(RunSpec)}


def spec_from_fields(fields: dict[str, Any], base_dir: Path | None = None) -> RunSpec:
    """A RunSpec from API-named fields: `model` (slug) or `model_config` (dict, or a JSON file's path)."""
    f = dict(fields)
    unknown = set(f) - _SPEC_FIELDS
    if unknown:
        raise SpecError(sorted(unknown)[0], "unknown field")
    model = f.pop("model", None)
    cfg = f.pop("model_config", None)
    given_source = f.pop("model_config_source", None)
    if cfg is None and model is None:
        raise SpecError("model", "give model (a slug) or model_config")
    if isinstance(cfg, str):
        path = Path(cfg)
        if base_dir is not None and not path.is_absolute() and not path.exists():
            path = base_dir / path
        source = str(path)
        cfg = json.loads(path.read_text())
    elif isinstance(cfg, dict):
        source = str(given_source or "inline")
    else:
        path = find_model_config(str(model))
        source = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
        cfg = json.loads(path.read_text())
    if "lora_targets" in f:
        f["lora_targets"] = _targets(f["lora_targets"])
    spec = RunSpec(model=model, model_config=cfg, model_config_source=source, **f)
    return validate(spec)


def load_plan(path: Path) -> tuple[str, list[RunSpec], dict[str, Any]]:
    """Read a batch plan (JSON, or YAML with PyYAML): its name, runs (defaults applied), raw dict."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml  # only for YAML plans

        raw = yaml.safe_load(text)
    else:
        raw = json.loads(text)
    if not isinstance(raw, dict) or not isinstance(raw.get("runs"), list):
        raise SpecError("plan", "a plan is an object with a 'runs' list")
    defaults = raw.get("defaults", {})
    name = str(raw.get("batch") or path.stem)
    specs = [spec_from_fields({**defaults, **run}, base_dir=path.parent) for run in raw["runs"]]
    return name, specs, raw
