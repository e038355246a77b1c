"""The benchmark_attention step (``scripts/benchmark_attention.py`` says what and on which grid).

Sources: candidates, ``measure.autotune.candidates``; latency (median, IQR, ms),
``autotune.tune_op``; TFLOP/s, ``flops.attention_flops`` (x3.5 with backward, flash-attn's
benchmark count); % of peak, ``timing.matmul_peak``; memory, ``timing.peak_memory_mb``;
accuracy, flash-attn's rule against eager's error; ``autotune_ratio`` = fastest latency /
chosen latency (1.0: the quick pass chose the fastest)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..backends import BACKENDS, SDPA
from ..env import dtype_name, environment, parse_dtype, resolve_device
from ..measure import autotune
from ..measure.timing import (cap_cuda_memory, fits_in_memory, matmul_peak, oom_caught, peak_memory_mb,
                              search_longest)
from ..report import (CannotRun, Check, Sections, StepData, StepResult, Table, default_run_folder, fmt_mb, fmt_ms,
                      one_line, register_view, said, save_figure, subplots, write_run_folder)

STEP = "benchmark_attention"

#: The seed's shapes, [B, H, D] (references/benchmarks.md, "operator grid").
SEED_SHAPES = ((8, 32, 64), (2, 16, 128))
GPU_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
CPU_SEQ_LENS = (512, 1024)


@dataclass
class BenchmarkOptions:
    """What ``benchmark_attention.py`` takes (see its --help)."""

    device: str = "auto"
    dtypes: list[str] | None = None  # None: bfloat16 and float16 on GPU, float32 on CPU
    shapes: list[str] | None = None  # "B,H,D" or "B,H,H_KV,D"; None: SEED_SHAPES
    seq_lens: list[int] | None = None
    causal: str = "both"  # causal | non-causal | both
    direction: str | None = None  # fwd | fwd+bwd | both; None: both on GPU, fwd on CPU
    backends: list[str] | None = None  # restrict to these candidate labels or backend names
    min_run_time: float = 0.2
    tune_time: float = 0.05
    tune_compiled: bool | None = None
    max_seq_len_search: bool = False
    search_cap: int = 262144
    memory_limit: float | None = None
    report_dir: str | None = None
    write_report: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """'8,32,64' -> (B, H, H_kv, D) = (8, 32, 32, 64); '2,32,8,128' -> GQA with 8 KV heads.
    Raises ``CannotRun`` for anything else."""
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 3:
        parts = [parts[0], parts[1], parts[1], parts[2]]
    if len(parts) != 4 or min(parts) < 1 or parts[1] % parts[2]:
        raise CannotRun(f"--shape {text!r}: give B,H,D or B,H,H_KV,D (positive, H a multiple of H_KV)",
                        "e.g. --shape 8,32,64")
    return parts[0], parts[1], parts[2], parts[3]


def _configs(o: BenchmarkOptions, device: str) -> tuple[list, list, list, list, list]:
    env = environment()
    dtypes = [parse_dtype(d, env, device) for d in (o.dtypes or (["bfloat16", "float16"] if device != "cpu"
                                                                  else ["float32"]))]
    shapes = [parse_shape(s) for s in o.shapes] if o.shapes else [(b, h, h, d) for b, h, d in SEED_SHAPES]
    seq_lens = sorted(set(o.seq_lens or (GPU_SEQ_LENS if device != "cpu" else CPU_SEQ_LENS)))
    if min(seq_lens) < 1:
        raise CannotRun(f"--seq-len must be positive, not {min(seq_lens)}", "")
    causals = {"causal": [True], "non-causal": [False], "both": [False, True]}.get(o.causal)
    if causals is None:
        raise CannotRun(f"--causal {o.causal!r}: choose causal, non-causal or both", "")
    direction = o.direction or ("both" if device != "cpu" else "fwd")
    directions = {"fwd": [False], "fwd+bwd": [True], "both": [False, True]}.get(direction)
    if directions is None:
        raise CannotRun(f"--direction {direction!r}: choose fwd, fwd+bwd or both", "")
    return dtypes, shapes, seq_lens, causals, directions


def _inputs(b: int, s: int, h: int, h_kv: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    """q [B, S, H, D], k and v [B, S, H_kv, D], standard normal (seed ``seed``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=gen, device=device, dtype=dtype)
    k = torch.randn(b, s, h_kv, d, generator=gen, device=device, dtype=dtype)
    v = torch.randn(b, s, h_kv, d, generator=gen, device=device, dtype=dtype)
    return q, k, v


@dataclass(kw_only=True)
class BenchmarkData(StepData):
    """``data`` of benchmark_attention (``gpu``: None on CPU). ``grid``: a row per candidate and configuration (its
    keys, ``autotune.Candidate.to_dict``, ``label``, ``pct_of_matmul_peak``, ``peak_memory_mb``
    above the inputs or ``memory_error``); ``autotune_by_config``: a row per configuration,
    quick choice against fastest (ms; ``ratio`` = fastest / chosen); ``matmul_peak_tflops``:
    dtype -> TFLOP/s; ``max_seq_len``: ``_search``'s or None; ``memory_plot``: memory.png."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"memory_plot"})

    device: str = ""
    gpu: str | None = None
    torch: str = ""
    grid: list[dict[str, Any]] = field(default_factory=list)
    autotune_by_config: list[dict[str, Any]] = field(default_factory=list)
    matmul_peak_tflops: dict[str, float] = field(default_factory=dict)
    max_seq_len: dict[str, Any] | None = None
    memory_limit_gb: float | None = None
    min_run_time_s: float = 0.0
    tune_time_s: float = 0.0
    memory_plot: str | None = None


def _wanted(c: autotune.Candidate, backends: list[str] | None) -> bool:
    return not backends or c.backend in backends or c.label in backends


def benchmark_attention(o: BenchmarkOptions, reporter: Any) -> StepResult:
    """Run the grid (see the module docstring). Raises ``CannotRun`` for bad options or a
    device that does not exist here; out-of-memory at a point is a row's ``error``."""
    if not (0 < o.min_run_time < float("inf") and 0 < o.tune_time < float("inf")):  # NaN, inf: no end
        raise CannotRun("--min-run-time and --tune-time must be positive", "")
    env = environment()
    device = resolve_device(o.device, env)
    dtypes, shapes, seq_lens, causals, directions = _configs(o, device)
    if o.memory_limit is not None:
        if not device.startswith("cuda"):
            raise CannotRun("--memory-limit applies to a CUDA device only", "use --device cuda")
        cap_cuda_memory(o.memory_limit, device)
    data = BenchmarkData(device=device, gpu=env.gpus[0].name if env.gpus and device != "cpu" else None,
                         torch=torch.__version__, memory_limit_gb=o.memory_limit, min_run_time_s=o.min_run_time,
                         tune_time_s=o.tune_time)
    interrupted = ""
    try:
        for dtype in dtypes:
            with reporter.stage(f"matmul peak ({dtype_name(dtype)})"):
                data.matmul_peak_tflops[dtype_name(dtype)] = matmul_peak(device, dtype)
            peak = data.matmul_peak_tflops[dtype_name(dtype)]
            for b, h, h_kv, d in shapes:
                for causal in causals:
                    for backward in directions:
                        for s in seq_lens:
                            config = {"dtype": dtype_name(dtype), "batch": b, "heads": h, "kv_heads": h_kv,
                                      "head_dim": d, "seq_len": s, "causal": causal,
                                      "direction": "fwd+bwd" if backward else "fwd",
                                      "shape": f"B{b} H{h}" + (f"/{h_kv}" if h_kv != h else "") + f" D{d}"}
                            with reporter.stage(f"{config['shape']} S{s} {'causal' if causal else 'non-causal'} "
                                                f"{config['direction']} {config['dtype']}"):
                                _one_config(o, env, device, dtype, config, peak, data)
        if o.max_seq_len_search:
            data.max_seq_len = _search(o, env, device, dtypes[0], shapes[-1], reporter)
    except KeyboardInterrupt:
        interrupted = f"interrupted (Ctrl-C) after {len(data.autotune_by_config)} configurations"
    result = _verdict(data, interrupted)
    if o.write_report:
        write_run_folder(result, Path(o.report_dir) if o.report_dir else default_run_folder(STEP, device))
    return result


def _one_config(o: BenchmarkOptions, env, device: str, dtype: torch.dtype, config: dict, peak: float,
                data: BenchmarkData) -> None:
    b, h, h_kv, d, s = config["batch"], config["heads"], config["kv_heads"], config["head_dim"], config["seq_len"]
    backward, causal = config["direction"] == "fwd+bwd", config["causal"]
    with oom_caught(device) as oom:
        q, k, v = _inputs(b, s, h, h_kv, d, dtype, device)
    if oom:
        data.autotune_by_config.append({**config, "chosen": None, "fastest": None, "ratio": None,
                                        "note": f"inputs do not fit: {oom.message}"})
        return

    def fresh() -> list[autotune.Candidate]:
        return [c for c in autotune.candidates(env, device, dtype, compiled=o.tune_compiled, head_dim=d)
                if _wanted(c, o.backends) or c.backend == autotune.BASELINE]

    quick = autotune.tune_op(q, k, v, fresh(), causal=causal, min_run_time=o.tune_time, backward=backward)
    choice = autotune.chosen(quick)
    full = autotune.tune_op(q, k, v, fresh(), causal=causal, min_run_time=o.min_run_time, backward=backward)
    first = {c.label: c.compile_s for c in quick}
    for c in full:  # the quick pass made the first calls: their compile time is the one to report
        if first.get(c.label) is not None:
            c.compile_s = max(first[c.label], c.compile_s or 0.0)
        row = {**config, **c.to_dict(), "label": c.label,
               "pct_of_matmul_peak": 100 * c.tflops / peak if c.tflops and peak else None, "peak_memory_mb": None}
        if c.latency_ms is not None:
            record = BACKENDS[c.backend]
            kw = {"causal": causal, **({"sdpa_kernel": SDPA.kernel(c.kernel)} if c.kernel else {})}
            try:
                row["peak_memory_mb"] = peak_memory_mb(lambda: record.call(q, k, v, **kw), device)
            except Exception as exc:  # measured already; memory is a figure, not a reason to stop
                row["memory_error"] = f"{type(exc).__name__}: {exc}"[:200]
        data.grid.append(row)
    best_full = autotune.chosen(full)
    picked = next((c for c in full if choice is not None and c.label == choice.label), None)
    ratio = (best_full.latency_ms / picked.latency_ms if best_full is not None and picked is not None
             and picked.latency_ms else None)
    data.autotune_by_config.append({**config, "chosen": choice.label if choice else None,
                                    "chosen_latency_ms": picked.latency_ms if picked else None,
                                    "fastest": best_full.label if best_full else None,
                                    "fastest_latency_ms": best_full.latency_ms if best_full else None, "ratio": ratio})
    q = k = v = None  # free the inputs before the next configuration allocates its own
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _search(o: BenchmarkOptions, env, device: str, dtype: torch.dtype, shape, reporter) -> dict:
    """The largest S (a multiple of 1024, up to ``o.search_cap``) each backend's causal forward
    runs at on ``shape`` without OOM (``timing.search_longest`` from 1024); CUDA only."""
    if not device.startswith("cuda"):
        return {"skipped": "the search runs on a CUDA device only: on a CPU each point would take minutes"}
    b, h, h_kv, d = shape
    out = {"shape": f"B{b} H{h} D{d}", "dtype": dtype_name(dtype), "causal": True, "cap": o.search_cap,
           "memory_limit_gb": o.memory_limit, "backends": {}}
    for c in autotune.candidates(env, device, dtype, compiled=False, head_dim=d):
        if c.status not in ("pending", "baseline") or not _wanted(c, o.backends):
            continue
        record = BACKENDS[c.backend]
        kw = {"causal": True, **({"sdpa_kernel": SDPA.kernel(c.kernel)} if c.kernel else {})}

        def fits(s: int) -> bool:
            def run() -> None:
                q, k, v = _inputs(b, s, h, h_kv, d, dtype, device)
                with torch.no_grad():
                    record.call(q, k, v, **kw)

            return fits_in_memory(run, device)

        with reporter.stage(f"largest S for {c.label}"):
            try:
                got = search_longest(fits, o.search_cap, start=1024, unit=1024, name="seq_len")
                out["backends"][c.label] = {"fits": got["max_context"] or None, "oom_at": got["first_failure"]}
            except Exception as exc:
                out["backends"][c.label] = {"error": f"{said(exc, 200)}"}
    return out


def _verdict(data: BenchmarkData, interrupted: str) -> StepResult:
    configs = data.autotune_by_config
    ran = [a for a in configs if a.get("fastest")]
    if interrupted or not configs:
        return StepResult(STEP, "error", interrupted or "nothing was measured", [], data, "rerun to finish")
    checks = [Check("ran", len(ran) == len(configs),
                    f"{len(ran)} of {len(configs)} configurations had a candidate within tolerance")]
    ratios = [a["ratio"] for a in configs if a.get("ratio") is not None]
    worst = min(ratios) if ratios else None
    checks.append(Check("autotune", worst is not None and worst >= 0.95,
                        f"the quick pass chose the fastest (or one within 5 %) in "
                        f"{sum(r >= 0.95 for r in ratios)} of {len(ratios)} configurations; worst "
                        + (f"{worst:.2f}x of the fastest" if worst is not None else "n/a")))
    best = {}
    for row in data.grid:
        if row["status"] == "passed" and row.get("tflops"):
            key = row["label"]
            best[key] = max(best.get(key, 0.0), row["tflops"])
    top = sorted(best.items(), key=lambda kv: -kv[1])[:3]
    summary = (f"{len(configs)} configurations on {data.device}"
               + (f" ({data.gpu})" if data.gpu else "") + "; best TFLOP/s: "
               + ", ".join(f"{k} {v:.3g}" for k, v in top) + f"; {checks[-1].evidence}")
    ok = all(c.passed for c in checks)
    return StepResult(STEP, "pass" if ok else "fail", summary, checks, data,
                      "read data.grid for every figure and report.png for TFLOP/s against S" if ok else
                      "a configuration had no passing candidate, or the quick pass chose a slow one: read "
                      "data.autotune_by_config and rerun with a longer --tune-time")


def _grid_tables(d: dict[str, Any]) -> list[Table]:
    """Every candidate per configuration, and the quick pass's choice against the fastest."""
    def config(r: dict) -> str:
        return f"{r['shape']} S{r['seq_len']} {'causal' if r['causal'] else 'non-causal'} {r['direction']} {r['dtype']}"

    out: list[Table] = []
    if d.get("grid"):
        out.append(("grid: every candidate per configuration", ["configuration", "candidate", "status", "median",
                                                                 "TFLOP/s", "% matmul peak", "peak memory", "note"],
                    [[config(r), r["label"], r["status"], fmt_ms(r.get("latency_ms")),
                      "n/a" if r.get("tflops") is None else f"{r['tflops']:.3g}",
                      "n/a" if r.get("pct_of_matmul_peak") is None else f"{r['pct_of_matmul_peak']:.0f} %",
                      fmt_mb(r.get("peak_memory_mb")), one_line(r.get("reason") or "", 80)]
                     for r in d["grid"] if r["status"] != "skipped"]))
    if d.get("autotune_by_config"):
        out.append(("autotune: the quick pass's choice against the fastest of the full pass",
                    ["configuration", "chosen", "fastest", "chosen / fastest"],
                    [[config(a), str(a.get("chosen")), str(a.get("fastest")),
                      "n/a" if a.get("ratio") is None else f"{a['ratio']:.2f}x"] for a in d["autotune_by_config"]]))
    return out


def _grid_figure(d: dict[str, Any], folder: Path) -> Path | None:
    """report.png (TFLOP/s against S) and memory.png (peak memory against S), a panel per configuration."""
    if not d.get("grid"):
        return None
    where = f"{d.get('gpu') or d.get('device', '')}, torch {d.get('torch', '')}"
    png = plot_grid(d["grid"], folder / "report.png", "tflops", "TFLOP/s", f"attention TFLOP/s, {where}")
    mem = plot_grid(d["grid"], folder / "memory.png", "peak_memory_mb", "peak memory (MB)",
                    f"attention peak memory, {where}")
    if mem:
        d["memory_plot"] = str(mem)  # write_run_folder keeps it in the data (BenchmarkData.memory_plot)
    return png


def plot_grid(rows: list[dict], path: Path, metric: str, unit: str, title: str) -> Path | None:
    """``metric`` (a key of the benchmark's ``data.grid`` rows, e.g. tflops) against S, a
    line per candidate, one panel per (shape, causal, direction, dtype); log-log axes."""
    ok = [r for r in rows if r.get(metric) is not None and r.get("status") in ("passed", "baseline")]
    panels = list(dict.fromkeys((r["shape"], r["causal"], r["direction"], r["dtype"]) for r in ok))
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    from matplotlib.ticker import ScalarFormatter

    for ax, key in zip(axes.flat, panels):
        sub = [r for r in ok if (r["shape"], r["causal"], r["direction"], r["dtype"]) == key]
        for label in dict.fromkeys(r["label"] for r in sub):
            pts = sorted((r["seq_len"], r[metric]) for r in sub if r["label"] == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label,
                    color="#9e9e9e" if label == "eager" else None)
        seq = sorted({r["seq_len"] for r in sub})
        ax.set_xscale("log", base=2)
        ax.set_xticks(seq, [str(s) for s in seq], fontsize=7)
        if metric != "tflops":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_title(f"{key[0]}, {'causal' if key[1] else 'non-causal'}, {key[2]}, {key[3]}", fontsize=8)
        ax.set_xlabel("sequence length S", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save_figure(fig, path, title, dpi=110)


#: How a result of this step is drawn (report.View): the grid and the autotuner's misses, two plots.
VIEW = register_view(STEP, Sections((_grid_tables,), _grid_figure))
