"""Profile training steps of calibration setups on a CUDA GPU: kernel time by kind and phase, host gaps.

    python3 scripts/profile_step.py --plan data/calibration/profiles/plan-f.json --out prof.jsonl

Each run of the plan (the measurement plan format; `note` names the calibration run it twins) is loaded
exactly as `tunefit measure` loads it (app.measure.model_build), trained for warm-up steps, timed for
`steps` unprofiled steps (host issue time and GPU completion time of forward, backward and optimizer
step), then one step is traced with torch.profiler; the trace is reduced to kernel time per category
and phase, the GPU's busy time (union of kernels) and the number of kernel launches. Needs torch,
transformers, peft (and bitsandbytes for QLoRA), not the web stack. One JSON line per run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("fwd", "bwd", "opt")
# Kernel name -> category, first match wins (cuBLAS/CUTLASS/nvjet GEMMs, SDPA's flash and
# memory-efficient kernels, bitsandbytes, torch's foreach optimizer kernels, reductions, copies).
CATEGORIES = (
    ("nf4", r"kDequantize|kQuantize|dequantize|gemm_4bit|kgemm_4bit|optimizer_8bit|kOptimizer"),
    ("attention", r"flash|fmha|attention|efficient_attention|cutlassF|cutlassB|pytorch_flash"),
    ("gemm_fp32", r"(sgemm|f32f32_f32|gemm.*_tf32|gemm_f32|f32_f32_f32|s1688gemm|sm90_xmma_gemm_f32)"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|Kernel2|splitKreduce|cublas|GroupedMM|grouped"),
    ("optimizer", r"multi_tensor_apply|foreach|fused_adam"),
    ("loss_softmax", r"softmax|cross_entropy|nll_loss|log_softmax|logsumexp"),
    ("embedding", r"embedding|indexSelect|index_select|indexing_backward|scatter|gather|index_"),
    ("reduce", r"reduce_kernel|Reduce|reduction|sum_kernel|norm_kernel|cumsum|sort|topk|histc|radix"),
    ("copy_cast", r"copy|Copy|cat_|CatArray|to_copy|bfloat16_copy|fill|memcpy|memset|Memcpy|Memset"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|launch_kernel|triu|tril|where"),
)
_COMPILED = tuple((name, re.compile(pat, re.IGNORECASE)) for name, pat in CATEGORIES)


def category(kernel: str) -> str:
    """The category of a kernel name (CATEGORIES), 'other' when none matches."""
    for name, pat in _COMPILED:
        if pat.search(kernel):
            return name
    return "other"


def _union_ms(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) spans (µs in, ms out)."""
    total, end = 0.0, -1.0
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total / 1000.0


def summarize_trace(trace: dict[str, Any], top: int = 25) -> dict[str, Any]:
    """Reduce a Kineto chrome trace of one step to kernel time per phase and category (ms)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    phases = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
              if e.get("cat") == "user_annotation" and e.get("name") in PHASES]
    launch_ts: dict[Any, float] = {}
    launches = 0
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launch_ts[corr] = e["ts"]
            if "Launch" in e.get("name", ""):
                launches += 1
    per_phase: dict[str, dict[str, Any]] = {
        p: {"kernels": 0, "kernel_ms": 0.0, "spans": [], "cat": {}} for p in (*PHASES, "none")}
    names: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        ts = launch_ts.get((e.get("args") or {}).get("correlation"))
        phase = next((p for s, t, p in phases if ts is not None and s <= ts <= t), "none")
        d = per_phase[phase]
        dur = float(e["dur"])
        d["kernels"] += 1
        d["kernel_ms"] += dur / 1000.0
        d["spans"].append((float(e["ts"]), float(e["ts"]) + dur))
        cat = category(e.get("name", ""))
        c = d["cat"].setdefault(cat, [0, 0.0])
        c[0] += 1
        c[1] += dur / 1000.0
        n = names.setdefault(e.get("name", "")[:140], [0, 0.0])
        n[0] += 1
        n[1] += dur / 1000.0
    out: dict[str, Any] = {"launches": launches, "phases": {}}
    all_spans: list[tuple[float, float]] = []
    for p, d in per_phase.items():
        if not d["kernels"]:
            continue
        all_spans += d["spans"]
        out["phases"][p] = {
            "kernels": d["kernels"],
            "kernel_ms": round(d["kernel_ms"], 3),
            "busy_ms": round(_union_ms(d["spans"]), 3),
            "span_ms": round((max(t for _, t in d["spans"]) - min(s for s, _ in d["spans"])) / 1000.0, 3),
            "by_category": {k: {"n": v[0], "ms": round(v[1], 3)} for k, v in sorted(d["cat"].items())},
        }
    out["busy_ms"] = round(_union_ms(all_spans), 3)
    cats: dict[str, list[float]] = {}
    for d in per_phase.values():
        for k, v in d["cat"].items():
            c = cats.setdefault(k, [0, 0.0])
            c[0] += v[0]
            c[1] += v[1]
    out["by_category"] = {k: {"n": int(v[0]), "ms": round(v[1], 3)} for k, v in sorted(cats.items())}
    ranked = sorted(names.items(), key=lambda kv: -kv[1][1])[:top]
    out["top_kernels"] = [{"name": k, "n": int(v[0]), "ms": round(v[1], 3)} for k, v in ranked]
    return out


def host_stalls(trace: dict[str, Any], top: int = 12) -> dict[str, Any]:
    """Where the GPU idled (gaps before a kernel, by the op that launched it) and slow runtime calls (ms)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    op_of = {(e.get("args") or {}).get("External id"): e.get("name", "") for e in events
             if e.get("cat") == "cpu_op"}
    launcher: dict[Any, str] = {}
    slow: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") not in ("cuda_runtime", "cuda_driver"):
            continue
        args = e.get("args") or {}
        launcher[args.get("correlation")] = op_of.get(args.get("External id"), e.get("name", ""))
        if float(e.get("dur", 0)) > 100.0:  # µs: a sync, a blocking copy, or a launch into a full queue
            v = slow.setdefault(e.get("name", ""), [0, 0.0])
            v[0] += 1
            v[1] += float(e["dur"]) / 1000.0
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"]), (e.get("args") or {}).get("correlation"))
             for e in gpu]
    kernels = sorted(spans, key=lambda k: (k[0], k[1]))
    gaps: dict[str, list[float]] = {}
    end = kernels[0][1] if kernels else 0.0
    for start, stop, corr in kernels[1:]:
        if start - end > 50.0:
            g = gaps.setdefault(launcher.get(corr, "?")[:80], [0, 0.0])
            g[0] += 1
            g[1] += (start - end) / 1000.0
        end = max(end, stop)
    ranked = sorted(gaps.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "gap_ms": round(sum(v[1] for v in gaps.values()), 3),
        "gaps_by_next_op": [{"op": k, "n": int(v[0]), "ms": round(v[1], 3)} for k, v in ranked],
        "slow_runtime_calls": [{"call": k, "n": int(v[0]), "ms": round(v[1], 3)}
                               for k, v in sorted(slow.items(), key=lambda kv: -kv[1][1])[:top]],
    }


def _step(model: Any, opt: Any, scaler: Any, x: Any, autocast: Any, torch: Any,
          marks: list[Any] | None = None) -> None:
    """One training step as the harness runs it, each phase inside a profiler range."""
    rf = torch.profiler.record_function

    def mark() -> None:
        if marks is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append((time.perf_counter(), ev))

    mark()
    with rf("fwd"), autocast():
        loss = model(input_ids=x, labels=x).loss
    mark()
    with rf("bwd"):
        (scaler.scale(loss) if scaler else loss).backward()
    mark()
    with rf("opt"):
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    mark()
    float(loss.detach())


def profile_one(spec: Any, ckpt: Path, warmup: int, steps: int) -> dict[str, Any]:
    """Load, set up, time and trace one setup; return its summary."""
    import torch

    from app.measure.model_build import apply_training_setup, load_for_training
    from app.measure.worker import _autocast, build_optimizer

    device = torch.device("cuda", 0)
    model, settings = load_for_training(spec, ckpt, "cuda:0")
    model = apply_training_setup(model, spec, settings)
    opt, _ = build_optimizer(spec, [p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cuda") if spec.precision == "amp_fp16" else None
    vocab = int(spec.model_config.get("vocab_size") or model.config.vocab_size)
    x = torch.randint(0, vocab, (spec.batch_size, spec.seq_len), device=device)

    def autocast() -> Any:
        return _autocast(spec, device)

    for _ in range(warmup):
        _step(model, opt, scaler, x, autocast, torch)
    torch.cuda.synchronize()
    times, host, gpu = [], {p: [] for p in PHASES}, {p: [] for p in PHASES}  # type: ignore[var-annotated]
    for _ in range(steps):
        marks: list[Any] = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _step(model, opt, scaler, x, autocast, torch, marks)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
        for i, p in enumerate(PHASES):
            host[p].append((marks[i + 1][0] - marks[i][0]) * 1000.0)
            gpu[p].append(marks[i][1].elapsed_time(marks[i + 1][1]))
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        _step(model, opt, scaler, x, autocast, torch)
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = fh.name
    prof.export_chrome_trace(path)
    trace = json.loads(Path(path).read_text())
    os.unlink(path)
    out = {
        "step_ms": round(statistics.median(times), 2),
        "steps_ms": [round(t, 2) for t in times],
        "tokens_per_s": round(spec.batch_size * spec.seq_len / statistics.median(times) * 1000.0, 1),
        "host_issue_ms": {p: round(statistics.median(v), 2) for p, v in host.items()},
        "gpu_phase_ms": {p: round(statistics.median(v), 2) for p, v in gpu.items()},
        "max_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "profile": summarize_trace(trace),
        "stalls": host_stalls(trace),
    }
    del model, opt, x, prof, trace
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def main(argv: list[str] | None = None) -> int:
    """Profile every run of the plan (grouped by model) and append one JSON line per run to --out."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--deadline-s", type=float, default=None)
    p.add_argument("--nvml-sampler", action="store_true",
                   help="poll NVML every 2 ms in a thread during the run, as the harness does")
    a = p.parse_args(argv)
    from app.measure.model_build import build_checkpoint, checkpoint_ready
    from app.measure.runner import default_workdir  # also sets the harness's offline/quiet environment
    from app.measure.spec import load_plan
    from app.measure.worker import _quiet, versions

    _quiet()
    name, specs, _ = load_plan(a.plan)
    sampler = None
    if a.nvml_sampler:
        from app.measure.nvml import NvmlSampler

        sampler = NvmlSampler(0)
        sampler.start()
    t_start = time.monotonic()
    groups: dict[str, list[tuple[int, Any]]] = {}
    for i, s in enumerate(specs):
        groups.setdefault(s.checkpoint_key(), []).append((i, s))
    for key, group in groups.items():
        ckpt = default_workdir() / key
        for idx, spec in group:
            if a.deadline_s is not None and time.monotonic() - t_start > a.deadline_s:
                print(f"deadline: {name}-{idx + 1:03d} not profiled", flush=True)
                continue
            line: dict[str, Any] = {"profile_id": f"{name}-{idx + 1:03d}", **spec.inputs(),
                                    "nvml_sampler": sampler is not None}
            line.pop("model_config")
            try:
                if not checkpoint_ready(ckpt):
                    line["checkpoint"] = build_checkpoint(spec.model_config, ckpt, "cuda")
                line.update(profile_one(spec, ckpt, a.warmup, a.steps))
                line["status"] = "ok"
            except Exception as exc:  # an OOM or a library error is data, not the end of the plan
                line.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
                import torch

                gc.collect()
                torch.cuda.empty_cache()
            line["versions"] = versions()
            with a.out.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
            print(_describe(line), flush=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    if sampler is not None:
        sampler.stop()
    return 0


def _describe(line: dict[str, Any]) -> str:
    """One printed row: setup, step time, GPU busy time, launches, the three largest categories."""
    head = (f"{line['profile_id']} {line.get('model')} {line['method']} {line['precision']} "
            f"b{line['batch_size']}s{line['seq_len']} gc{int(line['gradient_checkpointing'])} "
            f"[{line['note']}]")
    if line["status"] != "ok":
        return f"{head} ERROR {line.get('error')}"
    prof = line["profile"]
    cats = sorted(prof["by_category"].items(), key=lambda kv: -kv[1]["ms"])[:4]
    return (f"{head} step {line['step_ms']} ms busy {prof['busy_ms']} ms launches {prof['launches']} "
            f"host {line['host_issue_ms']} gpu {line['gpu_phase_ms']} "
            + " ".join(f"{k}={v['ms']:.0f}" for k, v in cats))


if __name__ == "__main__":
    raise SystemExit(main())
