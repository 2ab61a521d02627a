"""Which requests made the caching allocator's segments (cudaMalloc) in a harness-like run: j-001/j-002/j-012."""
import os, re, sys, time
sys.path.insert(0, os.getcwd())
import torch

G, M = 2**30, 2**20
OUT = os.environ.get("OUT", "/tmp")


def short(frames):
    out = []
    for f in frames:
        name, fn, line = f.get("name", ""), os.path.basename(f.get("filename", "")), f.get("line", "")
        if "wrap_kernel_functor" in name or "TypeError_to_NotImplemented" in name or "probe" in fn:
            continue
        if fn.endswith(".py"):
            if fn in ("module.py",) or name in ("_call_impl", "_wrapped_call_impl"):
                continue
            out.append(f"{name}@{fn}:{line}")
        elif "at::native::" in name or "autograd::generated::" in name:
            n = re.sub(r"\(.*", "", name).replace("at::native::", "").replace("torch::autograd::generated::", "")
            if n not in out:
                out.append(n)
    return " <- ".join(out[:5])


def main(run_id, fields):
    from pathlib import Path
    from app.measure.spec import spec_from_fields
    from app.measure.model_build import build_checkpoint, load_for_training, apply_training_setup
    from app.measure.worker import build_optimizer
    f = open(os.path.join(OUT, f"seg-{run_id}.txt"), "w")
    def out(s):
        print(s, flush=True); f.write(s + "\n"); f.flush()
    spec = spec_from_fields(fields)
    ck = Path(f"/tmp/ck-{spec.checkpoint_key()}")
    if not ck.exists():
        build_checkpoint(spec.model_config, ck, "cuda")
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="all")
    model, settings = load_for_training(spec, ck, "cuda")
    model = apply_training_setup(model, spec, settings)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _ = build_optimizer(spec, params)
    x = torch.randint(0, spec.model_config["vocab_size"], (spec.batch_size, spec.seq_len), device="cuda")
    marks = {"setup": len(torch.cuda.memory._snapshot()["device_traces"][0])}
    for step in range(3):
        torch.cuda.reset_peak_memory_stats()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        marks[f"step{step+1}"] = len(torch.cuda.memory._snapshot()["device_traces"][0])
        out(f"{run_id} step {step+1}: peak alloc {torch.cuda.max_memory_allocated()/G:.3f} reserved {torch.cuda.memory_reserved()/G:.3f} GiB")
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    ev = snap["device_traces"][0]
    out(f"events {len(ev)} marks {marks} ({time.time()-t0:.0f} s)")
    bounds = sorted(marks.items(), key=lambda kv: kv[1])
    start = 0
    for name, end in bounds:
        segs = [e for e in ev[start:end] if e["action"] == "segment_alloc"]
        frees = [e for e in ev[start:end] if e["action"] == "segment_free"]
        out(f"== {name}: {len(segs)} segment_alloc ({sum(e['size'] for e in segs)/G:.3f} GiB), {len(frees)} segment_free")
        big = [e for e in segs if e["size"] >= 20 * M]
        for e in big:
            out(f"   +{e['size']/M:9.1f} MiB  {short(e.get('frames', []))}")
        small = len(segs) - len(big)
        if small:
            out(f"   ({small} segments < 20 MiB, {sum(e['size'] for e in segs if e['size'] < 20*M)/M:.0f} MiB)")
        start = end
    # final segments: size and live blocks
    segs = snap["segments"]
    tot = sum(s["total_size"] for s in segs); act = sum(s["allocated_size"] for s in segs)
    out(f"final: {len(segs)} segments, {tot/G:.3f} GiB reserved, {act/G:.3f} GiB allocated")
    for s in sorted(segs, key=lambda s: -s["total_size"])[:40]:
        blocks = [b for b in s["blocks"]]
        desc = ", ".join(f"{b['size']/M:.0f}{'a' if b['state']=='active_allocated' else 'f'}" for b in blocks[:8])
        out(f"   seg {s['total_size']/M:9.1f} MiB alloc {s['allocated_size']/M:9.1f}  blocks[{len(blocks)}]: {desc}")


if __name__ == "__main__":
    which = sys.argv[1]
    runs = {
        "j001": {"model": "qwen3-8b", "method": "qlora", "seq_len": 4096, "batch_size": 1, "gradient_checkpointing": True},
        "j002": {"model": "qwen3-8b", "method": "lora", "lora_rank": 64, "lora_targets": "all-linear", "seq_len": 2048,
                 "batch_size": 1, "gradient_checkpointing": True},
        "j012": {"model": "qwen3-1.7b", "method": "qlora", "lora_targets": "all-linear", "batch_size": 4, "seq_len": 1024,
                 "optimizer": "sgd", "gradient_checkpointing": True},
    }
    try:
        main(which, runs[which])
    except Exception:
        import traceback
        traceback.print_exc()
