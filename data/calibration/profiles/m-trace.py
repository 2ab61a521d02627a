"""Every allocation and free of a harness-like run's load and first steps, for comparing the replay's order.

python3 data/calibration/profiles/m-trace.py RUN_ID [RUN_ID ...]   (from the repository root, bnb installed)

Each RUN_ID is a calibration line (data/calibration/h200-*.jsonl); its inputs are run again as the harness
runs them (load, peft, optimizer, `model(input_ids=x, labels=x).loss.backward()`, step, zero_grad), under
torch.cuda.memory._record_memory_history.  Writes $OUT/trace-RUN_ID.jsonl.gz: a header line (peaks per
step, the step boundaries as event indices), then one line per allocator event:
[action, size, address, stream, label], label = the innermost few Python frames that are not torch's own.
"""

import glob
import gzip
import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())
import torch

G = 2**30
OUT = os.environ.get("OUT", "/tmp")
FIELDS = (
    "model",
    "model_config",
    "model_config_source",
    "method",
    "precision",
    "optimizer",
    "batch_size",
    "seq_len",
    "gradient_checkpointing",
    "attention",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "double_quant",
    "num_gpus",
    "parallelism",
    "gc_use_reentrant",
)
SKIP = (
    "torch/nn/modules/module.py",
    "torch/utils/_contextlib.py",
    "torch/_tensor.py",
    "torch/autograd/__init__.py",
    "torch/autograd/graph.py",
    "torch/_compile.py",
    "torch/_dynamo",
    "torch/utils/hooks.py",
    "probe",
)


def label(frames: list[dict]) -> str:
    """The innermost three frames outside torch's dispatch plumbing, as func@file:line."""
    out = []
    for f in frames:
        fn = f.get("filename", "")
        if not fn.endswith(".py") or any(s in fn for s in SKIP):
            continue
        out.append(f"{f.get('name', '')}@{'/'.join(fn.split('/')[-2:])}:{f.get('line', '')}")
        if len(out) == 3:
            break
    return " < ".join(out)


def record(run_id: str) -> None:
    """Trace one calibration run's setup and three steps."""
    from pathlib import Path

    from app.measure.model_build import apply_training_setup, build_checkpoint, load_for_training
    from app.measure.spec import spec_from_fields
    from app.measure.worker import build_optimizer

    line = None
    for path in glob.glob("data/calibration/h200-*.jsonl"):
        with open(path) as f:
            for raw in f:
                rec = json.loads(raw)
                if rec["run_id"] == run_id:
                    line = rec
    assert line is not None, run_id
    spec = spec_from_fields({k: line[k] for k in FIELDS if k in line and line[k] is not None})
    ck = Path(f"/tmp/ck-{spec.checkpoint_key()}")
    if not ck.exists():
        build_checkpoint(spec.model_config, ck, "cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    model, settings = load_for_training(spec, ck, "cuda")
    model = apply_training_setup(model, spec, settings)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _ = build_optimizer(spec, params)
    x = torch.randint(0, spec.model_config["vocab_size"], (spec.batch_size, spec.seq_len), device="cuda")
    torch.cuda.synchronize()
    n_events = lambda: len(torch.cuda.memory._snapshot()["device_traces"][0])  # noqa: E731
    head = {"run_id": run_id, "marks": {"setup": n_events()}, "steps": []}
    for step in range(3):
        torch.cuda.reset_peak_memory_stats()
        loss = model(input_ids=x, labels=x).loss
        head["marks"][f"forward{step + 1}"] = n_events()
        loss.backward()
        head["marks"][f"backward{step + 1}"] = n_events()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        head["marks"][f"step{step + 1}"] = n_events()
        head["steps"].append(
            {
                "peak_allocated": torch.cuda.max_memory_allocated(),
                "reserved": torch.cuda.memory_reserved(),
                "peak_reserved": torch.cuda.max_memory_reserved(),
            }
        )
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    ev = snap["device_traces"][0]
    head["events"] = len(ev)
    head["seconds"] = round(time.time() - t0, 1)
    path = os.path.join(OUT, f"trace-{run_id}.jsonl.gz")
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(head) + "\n")
        for e in ev:
            f.write(
                json.dumps(
                    [e["action"], e["size"], e["addr"], e.get("stream", 0), label(e.get("frames", []))]
                )
                + "\n"
            )
    print(run_id, json.dumps({k: v for k, v in head.items() if k != "marks"}), head["marks"], flush=True)
    peaks = ", ".join("%.3f" % (s["peak_reserved"] / G) for s in head["steps"])
    print(f"   {peaks} GiB peak reserved, {os.path.getsize(path) >> 20} MiB file", flush=True)


if __name__ == "__main__":
    import subprocess

    if len(sys.argv) > 2:  # each run in a fresh process: its own CUDA context and allocator
        for rid in sys.argv[1:]:
            subprocess.run([sys.executable, __file__, rid], check=False)
    else:
        try:
            record(sys.argv[1])
        except Exception:
            import traceback

            traceback.print_exc()
