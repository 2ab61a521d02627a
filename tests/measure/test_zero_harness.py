"""The harness's DeepSpeed ZeRO path on the CPU: spec checks, the config for deepspeed, the groups."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the measure extra (torch) is not installed")
pytest.importorskip("transformers", reason="the measure extra (transformers) is not installed")

from app.core.engines import deepspeed_config  # noqa: E402
from app.core.setup import TrainingSetup  # noqa: E402
from app.measure.distributed import trainer_param_groups, zero_run_config  # noqa: E402
from app.measure.spec import SpecError, spec_from_fields  # noqa: E402

TINY = Path(__file__).parent / "tiny-llama.json"
ROOT = Path(__file__).parents[2]


def _spec(**fields: object):  # type: ignore[no-untyped-def]
    return spec_from_fields({"model_config": json.loads(TINY.read_text()), "method": "full", **fields})


def test_zero_runs_are_valid_on_several_gpus_only_as_built() -> None:
    for par in ("zero2", "zero3"):
        s = _spec(num_gpus=2, parallelism=par)
        assert s.is_zero
    assert not _spec(num_gpus=1, parallelism="zero2").is_zero  # one GPU: parallelism plays no part
    assert _spec(num_gpus=2, parallelism="zero2", method="qlora").is_zero
    with pytest.raises(SpecError) as e:
        _spec(num_gpus=2, parallelism="zero3", method="qlora")
    assert e.value.field == "method" and "bnb_4bit_quant_storage" in e.value.message


def test_the_run_config_is_the_handed_out_one_with_autos_filled_as_hf_trainer_does() -> None:
    spec = _spec(num_gpus=2, parallelism="zero3", batch_size=4, precision="amp_bf16")
    cfg = zero_run_config(spec)
    handed = deepspeed_config(TrainingSetup("full", precision="amp_bf16", num_gpus=2, parallelism="zero3"), 3)
    h = 64  # tiny-llama's hidden size
    assert cfg["bf16"] == handed["bf16"] == {"enabled": True}
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["train_batch_size"] == 8 and cfg["gradient_clipping"] == 1.0
    z = cfg["zero_optimization"]
    assert z["reduce_bucket_size"] == h * h
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * h * h)
    assert z["stage3_param_persistence_threshold"] == 10 * h
    assert {k: v for k, v in z.items() if handed["zero_optimization"][k] != "auto"} == {
        k: v for k, v in handed["zero_optimization"].items() if v != "auto"
    }
    assert cfg["zero_allow_untested_optimizer"] is True
    assert "auto" not in json.dumps(cfg)
    assert zero_run_config(_spec(num_gpus=2, parallelism="zero2"))["zero_optimization"]["stage"] == 2


def test_trainer_groups_leave_norms_and_biases_out_of_weight_decay() -> None:
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(4, 4))
    model.add_module("input_layernorm", torch.nn.LayerNorm(4))
    model.add_module("frozen", torch.nn.Linear(4, 4))
    model.frozen.requires_grad_(False)
    decay, other = trainer_param_groups(model)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(other["params"]) == 3 and other["weight_decay"] == 0.0  # proj.bias, the norm's weight and bias


def test_the_harness_imports_without_deepspeed() -> None:
    code = ("import sys; sys.modules['deepspeed'] = None; import app.measure.distributed, app.measure.cli; "
            "print('deepspeed' in sys.modules and sys.modules['deepspeed'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
