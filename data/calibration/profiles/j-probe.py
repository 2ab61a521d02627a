"""Device probe for batch j's misses: math-SDPA fp32 GQA memory, bnb paged-state residency, a 2-layer QLoRA step."""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

G = 2**30
M = 2**20
OUT = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda", 0)


def nvml_used():
    import pynvml
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    return pynvml.nvmlDeviceGetMemoryInfo(h).used


def live_at_peak(snap, phase_from=0, min_size=32 * M, top=30):
    ev = snap["device_traces"][0]
    live = {}
    cur = 0
    best = (-1, None, None)
    for i, e in enumerate(ev):
        a = e["action"]
        if a == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
        elif a == "free_completed":
            x = live.pop(e["addr"], None)
            if x is not None:
                cur -= x["size"]
        if i >= phase_from and cur > best[0]:
            best = (cur, i, dict(live))
    cur, idx, lv = best
    rows = []
    for e in sorted(lv.values(), key=lambda e: -e["size"]):
        if e["size"] < min_size:
            continue
        fr = [f.get("name", "") + "@" + os.path.basename(f.get("filename", "")) + ":" + str(f.get("line", "")) for f in e.get("frames", [])]
        keep = [f for f in fr if any(s in f for s in ("at::native::", "autograd::generated", "torch::autograd::", ".py"))
                and not any(s in f for s in ("_call_impl", "_wrapped_call_impl", "probe.py"))]
        rows.append((e["size"], keep[:8]))
    return cur, idx, len(ev), rows


def sdpa_probe(out):
    for ckpt in (False, True):
        torch.cuda.empty_cache()
        q = torch.randn(2, 32, 4096, 128, device=dev, requires_grad=True)
        k = torch.randn(2, 8, 4096, 128, device=dev, requires_grad=True)
        v = torch.randn(2, 8, 4096, 128, device=dev, requires_grad=True)
        scores = 2 * 32 * 4096 * 4096 * 4
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
        if ckpt:
            torch.cuda.memory._record_memory_history(max_entries=200000, stacks="all")
            o = checkpoint(fn, q, k, v, use_reentrant=False)
        else:
            torch.cuda.memory._record_memory_history(max_entries=200000, stacks="all")
            o = fn(q, k, v)
        torch.cuda.synchronize()
        fpk = torch.cuda.max_memory_allocated() - base; after = torch.cuda.memory_allocated() - base
        g = torch.randn_like(o)
        torch.cuda.synchronize(); base2 = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
        n_fwd = len(torch.cuda.memory._snapshot()["device_traces"][0])
        o.backward(g)
        torch.cuda.synchronize()
        bpk = torch.cuda.max_memory_allocated() - base2
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        out(f"SDPA fp32 GQA b2 H32/8 s4096 ckpt={ckpt}: fwd peak {fpk/scores:.3f} scores, saved after fwd {after/scores:.3f}, bwd peak over start {bpk/scores:.3f} scores (scores={scores/G:.2f} GiB)")
        cur, idx, n, rows = live_at_peak(snap, phase_from=n_fwd)
        out(f"  backward live-at-peak (from trace): {cur/G:.2f} GiB at event {idx}/{n}")
        for size, fr in rows:
            out(f"    {size/M:10.1f} MiB  " + " <- ".join(fr))
        cur, idx, n, rows = live_at_peak({"device_traces": [snap["device_traces"][0][:n_fwd]]})
        out(f"  forward live-at-peak: {cur/G:.2f} GiB at event {idx}/{n}")
        for size, fr in rows:
            out(f"    {size/M:10.1f} MiB  " + " <- ".join(fr))
        del q, k, v, o, g, snap


def paged_probe(out):
    import bitsandbytes as bnb
    shapes = [((16, 8192), 168), ((64, 4096), 300), ((64, 12288), 100), ((512, 2048), 64), ((2048, 2048), 32), ((16, 3072 * 3), 100)]
    for shape, n in shapes:
        torch.cuda.synchronize()
        ps = [torch.nn.Parameter(torch.zeros(shape, device=dev)) for _ in range(n)]
        for p in ps:
            p.grad = torch.ones_like(p)
        torch.cuda.synchronize()
        u0, r0 = nvml_used(), torch.cuda.memory_reserved()
        opt = bnb.optim.PagedAdamW8bit(ps, lr=1e-5)
        opt.step()
        torch.cuda.synchronize()
        time.sleep(0.2)
        u1, r1 = nvml_used(), torch.cuda.memory_reserved()
        numel = shape[0] * shape[1]
        raw = 2 * numel * n
        managed = (u1 - u0) - (r1 - r0)
        out(f"paged {shape} numel {numel} x{n}: raw states {raw/M:.1f} MiB, NVML-reserved delta {managed/M:.1f} MiB = {managed/(2*n)/1024:.1f} KiB per state (raw {numel/1024:.1f} KiB); reserved delta {(r1-r0)/M:.1f}")
        opt.step(); torch.cuda.synchronize(); time.sleep(0.2)
        u2 = nvml_used()
        out(f"   after a second step: +{(u2-u1)/M:.1f} MiB")


def model_probe(out, slug, batch, seq, dq, history):
    from pathlib import Path
    from app.measure.spec import spec_from_fields, find_model_config
    from app.measure.model_build import build_checkpoint, load_for_training, apply_training_setup
    cfg = json.loads(find_model_config(slug).read_text())
    cfg["num_hidden_layers"] = 2
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = 2
    spec = spec_from_fields({"model_config": cfg, "method": "qlora", "batch_size": batch, "seq_len": seq,
                             "double_quant": dq, "gradient_checkpointing": True})
    ck = Path(f"/tmp/probe-ckpt-{slug}")
    build_checkpoint(cfg, ck, "cuda")
    torch.cuda.empty_cache()
    model, settings = load_for_training(spec, ck, "cuda")
    model = apply_training_setup(model, spec, settings)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    x = torch.randint(0, cfg["vocab_size"], (batch, seq), device=dev)
    scores = batch * cfg["num_attention_heads"] * seq * seq * 4
    for step in range(2):
        torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
        rec = history and step == 1
        if rec:
            torch.cuda.memory._record_memory_history(max_entries=400000, stacks="all")
        loss = model(input_ids=x, labels=x).loss
        torch.cuda.synchronize(); fpk = torch.cuda.max_memory_allocated() - base; fend = torch.cuda.memory_allocated() - base
        n_fwd = len(torch.cuda.memory._snapshot()["device_traces"][0]) if rec else 0
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize(); bpk = torch.cuda.max_memory_allocated() - base
        if rec:
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
        opt.step(); opt.zero_grad(set_to_none=True)
        out(f"{slug} 2 layers qlora b{batch} s{seq} dq={dq} step {step}: base {base/G:.2f} GiB, fwd peak +{fpk/G:.2f}, fwd end +{fend/G:.2f}, bwd peak +{bpk/G:.2f} GiB (scores {scores/G:.2f} GiB)")
        if rec:
            cur, idx, n, rows = live_at_peak(snap, phase_from=n_fwd, min_size=16 * M, top=40)
            out(f"  backward live-at-peak: {cur/G:.2f} GiB at event {idx}/{n}")
            for size, fr in rows:
                out(f"    {size/M:10.1f} MiB  " + " <- ".join(fr))
            cur, idx, n, rows = live_at_peak({"device_traces": [snap["device_traces"][0][:n_fwd]]}, min_size=16 * M)
            out(f"  forward live-at-peak: {cur/G:.2f} GiB at event {idx}/{n}")
            for size, fr in rows:
                out(f"    {size/M:10.1f} MiB  " + " <- ".join(fr))
    import shutil
    shutil.rmtree(ck, ignore_errors=True)


if __name__ == "__main__":
    part = sys.argv[1]
    f = open(os.path.join(OUT, f"probe-{part}.txt"), "w")
    def out(s):
        print(s, flush=True); f.write(s + "\n"); f.flush()
    t0 = time.time()
    try:
        if part == "sdpa":
            sdpa_probe(out)
        elif part == "paged":
            paged_probe(out)
        elif part == "llama":
            model_probe(out, "llama-3.1-8b", 2, 4096, False, True)
        elif part == "qwen3":
            model_probe(out, "qwen3-8b", 1, 4096, True, False)
    except Exception as exc:
        import traceback
        out("ERROR " + traceback.format_exc())
    out(f"[{part}] {time.time()-t0:.1f} s")
