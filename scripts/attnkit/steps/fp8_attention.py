"""The fp8_attention step (``scripts/fp8_attention.py`` says what it measures and its rule).

FP8 is the ``fp8`` backend (``backends/fp8_cudnn.py``), the one PyPI-only FP8 path that runs
on Hopper. Inputs: random bf16 q [B, S, H, D], k and v [B, S, H_kv, D] (seed 0). TFLOP/s
from ``measure.flops.attention_flops``. The float64 reference is SDPA math on batch 0 and the
first ``ref_heads`` query heads (whole float64 attention of the largest shapes would not
fit); the kernel is also compared with float64 on its de-quantised inputs, isolating its
rounding from the quantisation.

The rule is flash-attn's in relative RMS with eps(e4m3) = 2**-3 as the floor; not in max abs
error, which a few elements set (references/advanced-features.md, "Judging FP8")."""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..backends import BACKENDS, SDPA, availability, calls, fp8_availability, fp8_cudnn, probe
from ..backends.catalogue import FLASH_ATTENTION_4
from ..env import environment
from ..measure.flops import attention_flops
from ..measure.kernels import library_kernels, profiled
from ..measure.timing import free_memory, is_oom, oom_caught, synchronize, time_it
from ..report import (CannotRun, Check, Sections, StepData, StepResult, Table, default_run_folder, register_view,
                      said, save_figure, subplots, write_run_folder)

STEP = "fp8_attention"
E4M3_EPS = float(torch.finfo(fp8_cudnn.E4M3).eps)  # 0.125
RULE = "rel_rms_err(fp8) <= 2 x rel_rms_err(bf16 cuDNN) + eps(e4m3), eps(e4m3) = 0.125, against float64"
#: The seed's grid (original SKILL.md, workflow 3 benchmark): B8 H32, D 64 and 128, S 1024..16384.
GRID_SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
GRID_HEAD_DIMS = (64, 128)
#: Words of attention kernel names: cuDNN's runtime-compiled FP8 engine has no known name, so
#: every kernel seen is recorded and these say which match.
KERNEL_WORDS = re.compile(r"cudnn|sm90|sm100|fp8|e4m3|fmha|sdpa|flash|attention|fprop", re.IGNORECASE)


@dataclass
class Fp8Options:
    """What ``fp8_attention.py`` takes (see its --help). None means the seed's grid value."""

    batch_size: int = 8
    heads: int = 32
    kv_heads: int | None = None  # None: as many as heads
    head_dims: list[int] | None = None  # None: 64 and 128
    seq_lens: list[int] | None = None  # None: 1024 ... 16384
    causal: str = "both"  # both | yes | no
    min_run_time: float = 0.25
    ref_heads: int = 4
    report_dir: str | None = None
    write_report: bool = True


def shapes(o: Fp8Options) -> list[dict[str, Any]]:
    """The shapes to run, in order: head_dim, then causal, then seq_len."""
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[o.causal]
    return [{"batch_size": o.batch_size, "seq_len": s, "heads": o.heads, "kv_heads": o.kv_heads or o.heads,
             "head_dim": d, "causal": c}
            for d in (o.head_dims or GRID_HEAD_DIMS) for c in causal for s in (o.seq_lens or GRID_SEQ_LENS)]


def validate(o: Fp8Options) -> None:
    """Reject shapes the kernel cannot take before any work. Raises ``CannotRun``."""
    kv = o.heads if o.kv_heads is None else o.kv_heads  # --kv-heads 0 is refused, not taken for the default
    if o.batch_size < 1 or o.heads < 1 or kv < 1 or o.heads % kv:
        raise CannotRun(f"--heads {o.heads} must be a positive multiple of --kv-heads {kv}, --batch-size positive", "")
    for d in o.head_dims or GRID_HEAD_DIMS:
        if d % fp8_cudnn.HEAD_DIM_MULTIPLE or not 0 < d <= fp8_cudnn.MAX_HEAD_DIM:
            raise CannotRun(f"--head-dim {d}: cuDNN's FP8 attention on sm90 needs a multiple of 16, at most 256", "")
    for s in o.seq_lens or GRID_SEQ_LENS:
        if s < 2:
            raise CannotRun(f"--seq-len {s} must be at least 2", "")
    if o.causal not in ("both", "yes", "no"):
        raise CannotRun(f"--causal {o.causal!r}: choose both, yes or no", "")
    if not 0 < o.min_run_time < float("inf") or o.ref_heads < 1:
        raise CannotRun("--min-run-time and --ref-heads must be positive", "")


# --- accuracy

def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max abs error, relative RMS error ||out - ref|| / ||ref|| and cosine similarity, in float64."""
    a, b = out.double().flatten(), ref.double().flatten()
    diff = a - b
    norm = float(b.norm())
    return {"max_abs_err": float(diff.abs().max()), "rel_rms_err": float(diff.norm()) / norm if norm else math.inf,
            "cosine": float(a @ b) / (float(a.norm()) * norm) if norm and float(a.norm()) else 0.0,
            "max_abs_ref": float(b.abs().max())}


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention in float64 by SDPA's math kernel, one query head at a time; [B, S, H, D] in
    and out (k and v [B, S, H_kv, D], repeated to the query heads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rep = q.shape[2] // k.shape[2]
    outs = []
    with sdpa_kernel(SDPBackend.MATH):
        for h in range(q.shape[2]):
            qh = q[:, :, h:h + 1].double().transpose(1, 2)  # [B, 1, S, D]
            kh = k[:, :, h // rep:h // rep + 1].double().transpose(1, 2)
            vh = v[:, :, h // rep:h // rep + 1].double().transpose(1, 2)
            outs.append(torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=causal))
    return torch.cat(outs, dim=1).transpose(1, 2)


# --- evidence

def fp8_kernels(run: Any, device: str = "cuda") -> dict[str, Any]:
    """GPU kernels of one ``run`` (the FP8 kernel on pre-quantised inputs) under torch.profiler:
    names with count and time (us), the longest, and those that look like attention."""
    with profiled(device) as prof:
        run()
        synchronize(device)
    events = list(prof.events())
    seen: Counter = Counter()
    time_us: Counter = Counter()
    for e in events:
        if not str(getattr(e, "device_type", "")).endswith("CUDA") or getattr(e, "is_user_annotation", False):
            continue
        if e.name.startswith(("Memcpy", "Memset")):
            continue
        seen[e.name] += 1
        time_us[e.name] += e.time_range.end - e.time_range.start
    main = max(time_us, key=time_us.get) if time_us else None
    return {"kernels": [{"name": n, "count": seen[n], "time_us": round(time_us[n], 1)} for n in seen],
            "main": main, "matched": sorted(n for n in seen if KERNEL_WORDS.search(n)),
            "in_range": sorted(library_kernels(events))}


# --- one shape

def _timed(fn: Any, min_run_time: float, label: str, flops: float, device: str) -> dict[str, Any]:
    fn()
    synchronize(device)
    median, iqr, n = time_it(fn, min_run_time, label)
    return {"latency_ms": median, "latency_iqr_ms": iqr, "runs": n, "tflops": flops / (median * 1e-3) / 1e12}


def run_shape(shape: dict[str, Any], o: Fp8Options, fa4: str, device: str = "cuda") -> dict[str, Any]:
    """Measure one shape; ``fa4``: '' when FlashAttention-4 runs, else why not. OOM goes to
    ``row["error"]``."""
    b, s, h, kv, d, causal = (shape[k] for k in ("batch_size", "seq_len", "heads", "kv_heads", "head_dim", "causal"))
    row: dict[str, Any] = dict(shape, flops=attention_flops(b, s, h, d, 1, causal), error=None)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(heads: int) -> torch.Tensor:
        return torch.randn(b, s, heads, d, device=device, dtype=torch.bfloat16, generator=gen)  # [B, S, H, D]

    with oom_caught(device) as oom:
        q, k, v = randn(h), randn(kv), randn(kv)
        # pre-quantised inputs: what the kernel alone is timed on ([B, H, S, D] views of [B, S, H, D] buffers)
        q8, dq = fp8_cudnn.quantize(q.transpose(1, 2))
        k8, dk = fp8_cudnn.quantize(k.transpose(1, 2))
        v8, dv = fp8_cudnn.quantize(v.transpose(1, 2))
        scale_o = fp8_cudnn.output_scale(dv)

        def kernel() -> torch.Tensor:
            return fp8_cudnn.sdpa_fp8(q8, k8, v8, dq, dk, dv, scale_o, causal=causal)[0]

        start = time.perf_counter()
        kernel()
        synchronize(device)
        row["fp8_first_call_s"] = time.perf_counter() - start  # builds the graph (NVRTC) on a new shape
        row["fp8_kernels"] = fp8_kernels(kernel, device)
        flops = row["flops"]
        row["fp8"] = _timed(kernel, o.min_run_time, "fp8 kernel", flops, device)
        row["fp8_with_quantize"] = _timed(lambda: fp8_cudnn.call(q, k, v, causal=causal), o.min_run_time,
                                          "fp8 with quantisation", flops, device)
        bf16 = {"cudnn": lambda: calls.sdpa(q, k, v, causal=causal, sdpa_kernel=SDPA.kernel("cudnn"))}
        if not fa4:
            bf16["flash_attention_4"] = lambda: calls.flash_attn_4(q, k, v, causal=causal)
        row["bf16"] = {}
        for name, fn in bf16.items():
            try:
                row["bf16"][name] = _timed(fn, o.min_run_time, f"bf16 {name}", flops, device)
            except Exception as exc:  # a bf16 kernel refusing this shape is a fact, not a failure of FP8
                if is_oom(exc):
                    raise
                row["bf16"][name] = {"error": said(exc, 300)}
        if fa4:
            row["bf16"]["flash_attention_4"] = {"error": fa4}
        timed = {n: m["latency_ms"] for n, m in row["bf16"].items() if m.get("latency_ms")}
        if timed:
            best = min(timed, key=timed.get)
            row["best_bf16"], row["speedup_vs_bf16"] = best, timed[best] / row["fp8"]["latency_ms"]
            row["speedup_with_quantize"] = timed[best] / row["fp8_with_quantize"]["latency_ms"]
        # accuracy on batch 0 and the first query heads (whole key/value groups)
        rep = h // kv
        nh = max(rep, min(h, o.ref_heads) // rep * rep)
        sl = (slice(0, 1), slice(None), slice(0, nh))
        kvs = (slice(0, 1), slice(None), slice(0, nh // rep))
        ref = reference(q[sl], k[kvs], v[kvs], causal)
        outs = {"fp8": fp8_cudnn.call(q, k, v, causal=causal)[sl]}
        for name, fn in bf16.items():
            if row["bf16"][name].get("latency_ms"):
                outs[f"bf16_{name}"] = fn()[sl]
        row["accuracy"] = {name: errors(out, ref) for name, out in outs.items()}
        row["accuracy"]["fp8"]["finite"] = bool(torch.isfinite(outs["fp8"]).all())
        # the kernel alone: float64 on its own de-quantised inputs, the same slice ([B, H, S, D] -> [B, S, H, D])
        deq = [fp8_cudnn.dequantize(x8[:1, :n], ds).transpose(1, 2)
               for x8, ds, n in ((q8, dq, nh), (k8, dk, nh // rep), (v8, dv, nh // rep))]
        o_kernel = fp8_cudnn.dequantize(kernel()[:1, :nh], dv * fp8_cudnn.OUTPUT_MARGIN).transpose(1, 2)
        row["accuracy"]["fp8_kernel_vs_dequantised"] = errors(o_kernel, reference(*deq, causal))
        row["reference"] = f"float64 SDPA math on batch 0, query heads 0-{nh - 1}"
        base = row["accuracy"].get("bf16_cudnn")
        if base:
            row["tolerance"] = 2 * base["rel_rms_err"] + E4M3_EPS
            fp8 = row["accuracy"]["fp8"]
            row["passed"] = fp8["finite"] and fp8["rel_rms_err"] <= row["tolerance"]
    if oom:
        row["error"] = oom.message
    free_memory(device)
    return row


# --- the step

def _label(r: dict[str, Any]) -> str:
    return f"D{r['head_dim']} S{r['seq_len']} {'causal' if r['causal'] else 'full'}"


def table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """One line per shape: TFLOP/s of FP8 and of bf16, speedup, FP8's and bf16's errors."""
    out = []
    for r in rows:
        if r.get("error"):
            out.append([_label(r), "error", "", "", "", "", "", r["error"]])
            continue
        bf = r.get("bf16", {})
        acc = r.get("accuracy", {})

        def tf(m: dict | None) -> str:
            return f"{m['tflops']:.0f}" if m and m.get("tflops") else "-"

        out.append([_label(r), tf(r.get("fp8")), tf(r.get("fp8_with_quantize")), tf(bf.get("cudnn")),
                    tf(bf.get("flash_attention_4")),
                    f"{r['speedup_vs_bf16']:.2f}x" if r.get("speedup_vs_bf16") else "-",
                    f"{acc['fp8']['rel_rms_err']:.3f} / {acc['fp8']['cosine']:.4f}" if "fp8" in acc else "-",
                    f"{acc['bf16_cudnn']['rel_rms_err']:.4f}" if "bf16_cudnn" in acc else "-"])
    return out


TABLE_HEADER = ["shape", "FP8 TFLOP/s", "FP8 + quantise", "bf16 cuDNN", "bf16 FA4", "speedup vs best bf16",
                "FP8 rel RMS / cosine", "bf16 rel RMS"]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table(rows)])


def not_here(env: Any) -> list[str]:
    """Why cuDNN's FP8 attention cannot run here, the GPU first (empty when it can)."""
    device = "cuda" if env.cuda_available else "cpu"
    verdict = availability("fp8", env=env, device=device, dtype=torch.bfloat16)
    if verdict.available:
        return []
    reasons = verdict.reason.replace("needs a CUDA GPU; the device", "needs a CUDA GPU, the device").split("; ")
    if not env.cuda_available:
        reasons = ["no CUDA GPU is visible (cuDNN's FP8 attention needs an sm90 or sm100 GPU)"] + \
                  [r for r in reasons if "needs a CUDA GPU" not in r]
    return sorted(reasons, key=lambda r: "GPU" not in r)


@dataclass(kw_only=True)
class Fp8AttentionData(StepData):
    """``data`` of fp8_attention. ``grid``: the shapes asked; ``fp8``: each FP8 path, usable here
    or not (``backends.fp8_availability``); ``capability``: GPU 0's ("9.0"). Not on ``skip``:
    ``versions``, ``flash_attention_4`` ('available' or why not), ``shapes`` (``run_shape``
    rows: ms, TFLOP/s, errors against float64, kernels, ``error`` on OOM), ``graph_builds``
    (build time in s), the summary as ``table`` (markdown) and ``grid_table``."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset(
        {"versions", "flash_attention_4", "shapes", "graph_builds", "table", "grid_table"})

    path: str = "cudnn sdpa_fp8 (nvidia-cudnn-frontend)"
    device: str = ""
    gpu: str | None = None
    capability: str | None = None
    grid: list[dict[str, Any]] = field(default_factory=list)
    rule: str = RULE
    fp8: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, Any] | None = None
    flash_attention_4: str | None = None
    shapes: list[dict[str, Any]] | None = None
    graph_builds: list[dict[str, Any]] | None = None
    table: str | None = None
    grid_table: dict[str, Any] | None = None


def fp8_attention(o: Fp8Options, reporter: Any) -> StepResult:
    """Run the grid; ``skip`` when FP8 cannot run here; pass when the kernel ran and was seen on
    every shape and each met the rule. Raises ``CannotRun`` for shapes it does not take."""
    validate(o)
    env = environment()
    grid = shapes(o)
    data = Fp8AttentionData(device="cuda" if env.cuda_available else "cpu",
                            gpu=env.gpus[0].name if env.gpus else None,
                            capability=env.gpus[0].capability if env.gpus else None,
                            grid=grid, fp8=[p.to_dict() for p in fp8_availability(env)])
    missing = not_here(env)
    if missing:
        return StepResult(STEP, "skip", "FP8 attention not run: " + "; ".join(missing), [], data,
                          "FP8 attention needs an sm90 (Hopper) or sm100 GPU and pip install nvidia-cudnn-frontend; "
                          "use bf16 (enable_flash.py) here")
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "nvidia-cudnn-frontend": probe.installed(BACKENDS["fp8"])[1],
                "cudnn_backend": fp8_cudnn.backend_version()}
    fa4 = availability(FLASH_ATTENTION_4.name, env=env, device="cuda", dtype=torch.bfloat16).reason
    fa4 = "" if fa4 == "available" else fa4
    data.versions, data.flash_attention_4, data.shapes = versions, fa4 or "available", []
    for i, shape in enumerate(grid, 1):
        with reporter.stage(f"[{i}/{len(grid)}] B{shape['batch_size']} H{shape['heads']}/{shape['kv_heads']} "
                            f"{_label(shape)}"):
            data.shapes.append(run_shape(shape, o, fa4))
    data.graph_builds = fp8_cudnn.graph_builds()
    rows = data.shapes
    done = [r for r in rows if not r.get("error")]
    kernels = sorted({r["fp8_kernels"]["main"] for r in done if r["fp8_kernels"]["main"]})
    ran = Check("fp8_runs", len(done) == len(rows) and all(r["accuracy"]["fp8"]["finite"] for r in done),
                f"{len(done)} of {len(rows)} shapes ran FP8" + "".join(f"; {_label(r)}: {r['error']}" for r in rows
                                                                      if r.get("error")))
    seen = Check("fp8_kernel", bool(done) and all(r["fp8_kernels"]["main"] for r in done),
                 "GPU kernels of one FP8 call (torch.profiler): " + ("; ".join(kernels) or "none seen"))
    judged = [r for r in done if "passed" in r]
    worst = max(judged, key=lambda r: r["accuracy"]["fp8"]["rel_rms_err"] / r["tolerance"], default=None)
    acc = Check("accuracy", bool(judged) and all(r["passed"] for r in judged),
                (f"{sum(r['passed'] for r in judged)} of {len(judged)} shapes within {RULE}; worst {_label(worst)}: "
                 f"{worst['accuracy']['fp8']['rel_rms_err']:.3f} vs tol {worst['tolerance']:.3f}; FP8 rel RMS err "
                 f"{min(r['accuracy']['fp8']['rel_rms_err'] for r in judged):.3f}-"
                 f"{max(r['accuracy']['fp8']['rel_rms_err'] for r in judged):.3f} against bf16's "
                 f"{max(r['accuracy']['bf16_cudnn']['rel_rms_err'] for r in judged):.4f} (float64 reference)")
                if worst else "no shape could be judged (bf16 cuDNN did not run)")
    checks = [ran, seen, acc]
    data.table = markdown_table(rows)
    data.grid_table = {"title": f"FP8 vs bf16 on {data.gpu}, B{o.batch_size} H{o.heads}/{o.kv_heads or o.heads}",
                       "header": TABLE_HEADER, "rows": table(rows)}
    speedups = [r["speedup_vs_bf16"] for r in done if r.get("speedup_vs_bf16")]
    gpu = data.gpu
    if speedups:
        best = max(done, key=lambda r: r.get("speedup_vs_bf16") or 0)
        summary = (f"FP8 (cuDNN sdpa_fp8) on {gpu}: {min(speedups):.2f}x-{max(speedups):.2f}x the best bf16 kernel "
                   f"over {len(done)} shapes (largest at {_label(best)}: {best['fp8']['tflops']:.0f} vs "
                   f"{best['bf16'][best['best_bf16']]['tflops']:.0f} TFLOP/s); {acc.evidence.split('; ', 2)[-1]}")
    else:
        summary = f"FP8 (cuDNN sdpa_fp8) on {gpu}: no shape measured"
    ok = all(c.passed for c in checks)
    faster = [r for r in done if (r.get("speedup_vs_bf16") or 0) > 1.05]
    nxt = ("FP8 pays (more than 5 % faster than bf16) at " + (", ".join(_label(r) for r in faster) or "no shape here") +
           "; it is forward only. Check a model with enable_flash.py --backend fp8 --dtype bfloat16. Table: "
           "data.table" if ok else "keep bf16: read checks[].evidence and data.shapes")
    result = StepResult(STEP, "pass" if ok else "fail", summary, checks, data, nxt)
    if o.write_report:
        write_run_folder(result, Path(o.report_dir) if o.report_dir else default_run_folder(STEP, gpu or "gpu"))
    return result


def _grid_table(d: dict[str, Any]) -> list[Table]:
    grid = d.get("grid_table")
    return [(grid["title"], grid["header"], grid["rows"])] if grid and grid.get("rows") else []


def _fp8_figure(d: dict[str, Any], folder: Path) -> Path | None:
    if not d.get("grid_table"):
        return None
    return plot_fp8(d.get("shapes") or [], folder / "report.png", d["grid_table"]["title"] + " (TFLOP/s)")


def plot_fp8(rows: list[dict], path: Path, title: str) -> Path | None:
    """TFLOP/s against S, a panel per (head_dim, causal), a line per FP8 / bf16 variant."""
    ok = [r for r in rows if not r.get("error") and r.get("fp8")]
    if not ok:
        return None
    panels = sorted({(r["head_dim"], r["causal"]) for r in ok})
    fig, axes = subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (d, causal) in zip(axes[0], panels):
        mine = sorted((r for r in ok if (r["head_dim"], r["causal"]) == (d, causal)), key=lambda r: r["seq_len"])
        lines = {"FP8 (cuDNN)": [r["fp8"] for r in mine], "FP8 + quantise": [r["fp8_with_quantize"] for r in mine]}
        for name in dict.fromkeys(n for r in mine for n in r.get("bf16", {})):
            lines[f"bf16 {name}"] = [r["bf16"].get(name, {}) for r in mine]
        for name, ms in lines.items():
            pts = [(r["seq_len"], m["tflops"]) for r, m in zip(mine, ms) if m.get("tflops")]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                        linestyle="--" if "quantise" in name else "-")
        ax.set_xscale("log", base=2)
        seq = [r["seq_len"] for r in mine]
        ax.set_xticks(seq, [str(x) for x in seq], fontsize=7)
        ax.set_xlabel("sequence length S")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"head_dim {d}, {'causal' if causal else 'full'}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title)


#: How a result of this step is drawn (report.View): FP8 against bf16 per shape, TFLOP/s against S.
VIEW = register_view(STEP, Sections((_grid_table,), _fp8_figure))
