"""Result objects of a checklist step, and every way they are shown.

The step contract (ARCHITECTURE.md): a script prints exactly one JSON object on stdout with
``--json`` (logs and progress go to stderr), or a rich rendering for people without it,
and exits ``0`` pass/skip, ``1`` a check failed, ``2`` the step could not run.

This module is the only place in the library that writes to the terminal or renders a
report: ``StepResult`` (the object), ``Reporter`` (progress on stderr, the result on
stdout), ``to_markdown`` / ``write_run_folder`` (report.json, report.md, report.png).

Units used in every rendering: latency in ms, memory in MB (2**20 bytes, as
``torch.cuda.memory_summary`` counts), throughput in TFLOP/s (10**12 FLOP per second).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.markup import escape

STATUSES = ("pass", "fail", "skip", "error")
EXIT_CODES = {"pass": 0, "skip": 0, "fail": 1, "error": 2}


class CannotRun(Exception):
    """The step cannot run: bad argument, model not found, missing dependency (exit 2).

    ``message`` is one line for the user; ``hint`` says what to do and becomes the JSON
    object's ``next``; ``data`` carries whatever was measured before the step stopped.
    """

    def __init__(self, message: str, hint: str = "", data: dict | None = None):
        super().__init__(message)
        self.message = " ".join(str(message).split())  # always one line
        self.hint = hint
        self.data = data or {}


@dataclass
class Check:
    """One verdict of a step: ``passed`` and the one-line ``evidence`` it rests on."""

    name: str
    passed: bool
    evidence: str


@dataclass
class StepResult:
    """The one JSON object a step prints (ARCHITECTURE.md, "The step contract")."""

    step: str
    status: str
    summary: str
    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    next: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "status": self.status,
            "summary": self.summary,
            "checks": [asdict(c) for c in self.checks],
            "data": _jsonable(self.data),
            "next": self.next,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def error(cls, step: str, exc: CannotRun) -> "StepResult":
        return cls(step, "error", exc.message, [], exc.data, exc.hint)


def _jsonable(value: Any) -> Any:
    """Make ``value`` JSON-safe: NaN/inf become None, paths and dtypes become strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    return str(value)


# ----------------------------------------------------------------------------- formatting

def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms" if value < 100 else f"{value:.1f} ms"


def fmt_mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"


def fmt_iqr(m: Any) -> str:
    """The IQR of a measurement (object or dict) in ms, or 'n/a' with too few timed blocks."""
    iqr = m.get("latency_iqr_ms") if isinstance(m, dict) else getattr(m, "latency_iqr_ms", None)
    return "n/a" if iqr is None else f"{iqr:.2f} ms"


def fmt_err(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def fmt_kernels(counts: dict[str, int] | None) -> str:
    if not counts:
        return "none seen"
    return ", ".join(f"{name} x{n}" for name, n in counts.items())


# ----------------------------------------------------------------------------- terminal

class Reporter:
    """Progress on stderr while a step works; the result on stdout when it is done.

    With ``json_mode`` stdout receives exactly one JSON object; progress lines still go
    to stderr (plain lines when stderr is not a terminal, a rich spinner when it is).
    """

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        from rich.console import Console

        self.json_mode = json_mode
        self.quiet = quiet
        self.err = Console(stderr=True, highlight=False)
        self.out = Console(highlight=False, soft_wrap=False)
        self._t0 = time.perf_counter()

    @contextmanager
    def stage(self, text: str) -> Iterator[None]:
        """Show ``text`` while the block runs (a spinner on a terminal, a line otherwise)."""
        if self.quiet:
            yield
            return
        if self.err.is_terminal:
            with self.err.status(f"[bold]{escape(text)}[/]…"):
                yield
            self.err.print(f"[green]✓[/] {escape(text)} [dim]({time.perf_counter() - self._t0:.1f} s)[/]")
        else:
            self.err.print(f"{time.perf_counter() - self._t0:6.1f} s  {escape(text)}")
            yield

    def note(self, text: str) -> None:
        """A one-line remark for people (stderr), e.g. a capped sequence length."""
        if not self.quiet:
            self.err.print(f"[yellow]note:[/] {escape(text)}")

    def emit(self, result: StepResult) -> int:
        """Print ``result`` (JSON or rich) and return the exit code."""
        if self.json_mode:
            sys.stdout.write(result.to_json() + "\n")
            sys.stdout.flush()
        else:
            render_rich(result, self.out)
        return result.exit_code


_STATUS_STYLE = {"pass": "bold green", "fail": "bold red", "skip": "bold yellow", "error": "bold red"}


def render_rich(result: StepResult, console) -> None:
    """Render a step result for people: header, the step's figures, checks, next step."""
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    style = _STATUS_STYLE[result.status]
    console.print(Panel(f"[{style}]{result.status.upper()}[/]  {escape(result.summary)}",
                        title=f"[bold]{result.step}[/]", expand=False))
    for title, header, rows in tables(result):
        table = Table(title=title, title_justify="left", show_lines=False)
        for col in header:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*[escape(str(c)) for c in row])
        console.print(table)
    if result.checks:
        table = Table(title="checks", title_justify="left")
        table.add_column("")
        table.add_column("check")
        table.add_column("evidence", overflow="fold")
        for c in result.checks:
            table.add_row("[green]✓[/]" if c.passed else "[red]✗[/]", escape(c.name), escape(c.evidence))
        console.print(table)
    if result.next:
        console.print(f"[bold]next:[/] {escape(result.next)}")
    report_dir = result.data.get("report_dir")
    if report_dir:
        console.print(f"[dim]report: {escape(str(report_dir))}[/]")


def measurement_rows(runs: list[dict], with_seq_len: bool = False) -> list[list[str]]:
    """Table rows for a list of measurements (dicts of ``measure.timing.Measurement``); with
    ``with_seq_len`` the first column is the sequence length."""
    rows = []
    for m in runs:
        if with_seq_len:
            rows.append([str(m.get("seq_len"))] + measurement_rows([m])[0])
            continue
        if m.get("error"):
            rows.append([m.get("label") or m["backend"], "error", "", "", "", m["error"]])
            continue
        lat = fmt_ms(m.get("latency_ms"))
        lat += f" (IQR {fmt_iqr(m)}, {m.get('runs', '?')} runs)"
        tflops = m.get("tflops")
        rows.append([m.get("label") or m["backend"], lat, fmt_mb(m.get("peak_memory_mb")),
                     "n/a" if tflops is None else f"{tflops:.3f}",
                     m.get("sdpa_kernel") or "-", fmt_kernels(m.get("kernel_counts"))])
    return rows


MEASUREMENT_HEADER = ["backend", "median latency", "peak memory", "TFLOP/s", "SDPA kernel", "attention kernels seen"]


def tables(result: StepResult) -> list[tuple[str, list[str], list[list[str]]]]:
    """The figures of a step as (title, header, rows) tables, shared by rich and markdown."""
    d = result.data
    out: list[tuple[str, list[str], list[list[str]]]] = []
    runs = [d[k] for k in ("baseline", "candidate") if isinstance(d.get(k), dict)]
    runs += [m for m in d.get("measurements", []) if isinstance(m, dict)]
    if runs:
        shape = d.get("shape") or {}
        title = "measured"
        if shape:
            title += f" on {d.get('device', '?')} {d.get('dtype', '')}, batch {shape.get('batch_size')}, seq_len {shape.get('seq_len')}"
        if any(m.get("mode") == "forward+backward" for m in runs):
            title += " (forward + backward)"
        sweep = len({m.get("seq_len") for m in runs}) > 1
        out.append((title if not sweep else title.rsplit(", seq_len", 1)[0], (["seq_len"] if sweep else []) +
                    MEASUREMENT_HEADER, measurement_rows(runs, with_seq_len=sweep)))
    out += generation_tables(d)
    acc = d.get("accuracy")
    if isinstance(acc, dict) and acc.get("max_abs_err") is not None:
        rows = [["max_abs_err (vs float64 reference)", fmt_err(acc.get("max_abs_err"))],
                ["baseline's own max_abs_err", fmt_err(acc.get("baseline_max_abs_err"))],
                ["tolerance", f"{fmt_err(acc.get('tolerance'))}  ({acc.get('rule', '')})"],
                ["max_rel_err", fmt_err(acc.get("max_rel_err"))],
                ["candidate vs baseline max_abs_err", fmt_err(acc.get("candidate_vs_baseline_max_abs_err"))]]
        if acc.get("top1_agreement") is not None:
            rows.append(["top-1 token agreement with baseline", f"{100 * acc['top1_agreement']:.2f} %"])
        rows.append(["positions compared / padding left out",
                     f"{acc.get('compared_positions')} / {acc.get('padding_positions')}"])
        if acc.get("padding_positions"):
            rows.append(["max_abs_err at padding (not judged)", fmt_err(acc.get("padding_max_abs_err"))])
        out.append(("accuracy", ["figure", "value"], rows))
    if isinstance(acc, dict) and acc.get("precision") == "fp8_e4m3" and acc.get("rel_rms_err") is not None:
        rows = [["rule", acc.get("rule", "")],
                ["rel RMS err vs " + str(acc.get("reference")), f"{acc['rel_rms_err']:.2e}"],
                ["baseline's own rel RMS err", f"{acc['baseline_rel_rms_err']:.2e}"],
                ["tolerance (eps(e4m3) / eps(dtype) x baseline's)", f"{acc['rel_rms_tolerance']:.2e}"],
                ["rel RMS err vs the baseline", f"{acc['rel_rms_vs_baseline']:.2e}"]]
        if acc.get("top1_agreement") is not None:
            rows.append(["top-1 agreement with the baseline (minimum)",
                         f"{100 * acc['top1_agreement']:.2f} % (>= {100 * acc['min_top1_agreement']:.2f} %)"])
        for a in acc.get("attention") or []:
            rows.append([f"attention, layer {a['layer']}: rel RMS vs fp32 on its own q, k, v",
                         f"{a['rel_rms']:.3f} (<= {acc['attention_tolerance']:.3f})"])
        out.append(("FP8 accuracy rule", ["figure", "value"], rows))
    grid = d.get("grid_table")
    if isinstance(grid, dict) and grid.get("rows"):
        out.append((grid["title"], grid["header"], grid["rows"]))
    if isinstance(d.get("grid"), list) and d["grid"] and "label" in d["grid"][0]:  # benchmark_attention's rows
        out.append(("grid: every candidate per configuration", ["configuration", "candidate", "status", "median",
                                                                 "TFLOP/s", "% matmul peak", "peak memory", "note"],
                    [[f"{r['shape']} S{r['seq_len']} {'causal' if r['causal'] else 'non-causal'} {r['direction']} "
                      f"{r['dtype']}", r["label"], r["status"], fmt_ms(r.get("latency_ms")),
                      "n/a" if r.get("tflops") is None else f"{r['tflops']:.3g}",
                      "n/a" if r.get("pct_of_matmul_peak") is None else f"{r['pct_of_matmul_peak']:.0f} %",
                      fmt_mb(r.get("peak_memory_mb")), " ".join(str(r.get("reason") or "").split())[:80]]
                     for r in d["grid"] if r["status"] != "skipped"]))
    if isinstance(d.get("autotune"), list) and d["autotune"]:
        out.append(("autotune: the quick pass's choice against the fastest of the full pass",
                    ["configuration", "chosen", "fastest", "chosen / fastest"],
                    [[f"{a['shape']} S{a['seq_len']} {'causal' if a['causal'] else 'non-causal'} {a['direction']} "
                      f"{a['dtype']}", str(a.get("chosen")), str(a.get("fastest")),
                      "n/a" if a.get("ratio") is None else f"{a['ratio']:.2f}x"] for a in d["autotune"]]))
    tune = d.get("autotune")
    if isinstance(tune, dict) and tune.get("candidates"):
        rows = []
        for i, c in enumerate(tune["candidates"], 1):
            label = f"{c['backend']}[{c['kernel']}]" if c.get("kernel") else c["backend"]
            mark = " (chosen)" if label == tune.get("chosen_label") else ""
            acc = "" if c.get("accuracy_passed") is None else ("within tol" if c["accuracy_passed"] else "OUTSIDE tol")
            rows.append([str(i) if c.get("latency_ms") is not None else "-", label + mark, c["status"],
                         fmt_ms(c.get("latency_ms")), "n/a" if c.get("compile_s") is None else f"{c['compile_s']:.2f} s",
                         acc, " ".join(str(c.get("reason") or "").split())[:160]])
        out.append((f"autotune ({tune.get('mode', '')}, fastest first; compile = first call minus one run)",
                    ["#", "candidate", "status", "median", "compile", "accuracy", "reason"], rows))
    if isinstance(d.get("rejected"), list) and d["rejected"]:
        out.append(("backends not chosen", ["backend", "reason"],
                    [[r["backend"], r["reason"]] for r in d["rejected"]]))
    if isinstance(d.get("steps"), list) and d["steps"] and "mark" in d["steps"][0]:
        out.append((d.get("title", "checklist"), ["", "step", "result"],
                    [[f"[{r['mark']}]", r["title"], r["summary"] + (f" (rule: {r['evidence']})" if r["mark"] == "!"
                                                                    and r["evidence"] else "")]
                     for r in d["steps"]]))
    if isinstance(d.get("workflows"), list):
        out.append(("workflows", ["workflow", "step", "command"],
                    [[f"{w['number']} {w['workflow']}" if i == 0 else "", s["title"], s["run"]]
                     for w in d["workflows"] for i, s in enumerate(w["steps"])]))
    if isinstance(d.get("features"), list):
        out.append((f"features ({d.get('backend', '')})", ["feature", "model uses it", "backend provides it", "how",
                                                           "source"],
                    [[f["feature"], f["detail"] or "no", "yes" if f["supported"] else "NO", f["how"], f["source"]]
                     for f in d["features"]]))
    if isinstance(d.get("facts"), list):
        out.append(("environment", ["fact", "value"], [[f["name"], f["value"]] for f in d["facts"]]))
    return out


def generation_backends(d: dict) -> list[dict]:
    """The per-backend entries of a generation step's data (``data.backends``), else []."""
    rows = d.get("backends")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) and "decode_ms_per_token" in r for r in rows):
        return rows
    return []


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def generation_tables(d: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """profile_generation's tables: every timed run, then per backend agreement and longest context."""
    entries = generation_backends(d)
    if not entries:
        return []
    runs = []
    for e in entries:
        for r in e.get("runs", []):
            if r.get("error"):
                runs.append([e["backend"], str(r["prompt_len"]), str(r["batch_size"]), r["cache"], "error", "", "",
                             "", "", r["error"]])
                continue
            kv = fmt_mb(r.get("kv_cache_mb"))
            if r.get("kv_cache_matches_formula") is False:
                kv += f" (object: {fmt_mb(r.get('kv_cache_measured_mb'))})"
            runs.append([e["backend"], str(r["prompt_len"]), str(r["batch_size"]), r["cache"], fmt_ms(r["prefill_ms"]),
                         fmt_ms(r.get("decode_ms_per_token")), _rate(r.get("decode_tokens_per_s")),
                         fmt_mb(r.get("peak_memory_mb")), kv, ", ".join(sorted(r.get("kernels") or {})) or "-"])
    out = []
    if runs:
        out.append((f"generation on {d.get('device', '?')} {d.get('dtype', '')}, {d.get('new_tokens')} new tokens "
                    f"(greedy)", ["backend", "prompt", "batch", "cache", "prefill", "decode / token", "tokens/s",
                                  "peak memory", "KV cache", "attention kernels seen"], runs))
    rows = []
    for e in entries:
        if not e.get("available", True):
            rows.append([e["backend"], "not run", "", e.get("reason", "").split("; ")[0]])
            continue
        agree = "; ".join(f"{a['cache']}: " + ("error: " + str(a.get("error")) if a.get("agreement") is None else
                                              f"{a['agreement']:.3f}" + (f" ({a['rows_differing']} rows differ)"
                                                                          if a.get("rows_differing") else ""))
                          for a in e.get("agreement", []))
        lc = e.get("longest_context") or {}
        if lc.get("error"):
            ctx = "error: " + lc["error"]
        elif lc:
            ctx = f"{lc['max_context']}" + (" (the model's limit)" if lc.get("capped") else
                                            f" (fails at {lc.get('first_failure')})")
            ctx += f"; limit {lc.get('memory_limit_gb', 0):.2f} GB, {lc.get('enforced_by', '')}"
        else:
            ctx = "not searched (--max-context)"
        rows.append([e["backend"], agree or "n/a", ctx, ""])
    batch = d.get("agreement_batch") or {}
    title = "greedy agreement with eager and longest prompt that fits"
    if batch:
        title += f" (agreement: left-padded batch of prompts of {batch.get('prompt_lens')} tokens)"
    out.append((title, ["backend", "greedy agreement", "longest prompt", "note"], rows))
    if d.get("not_available"):
        out.append(("backends not available here (not run)", ["backend", "reason"],
                    [[r["backend"], r["reason"].split("; ")[0]] for r in d["not_available"]]))
    return out


def plot_generation(d: dict, path: Path) -> Path | None:
    """Prefill (ms) and decode (ms per token) per backend, a bar per (prompt, batch, cache), as PNG."""
    entries = generation_backends(d)
    configs = list(dict.fromkeys((r["prompt_len"], r["batch_size"], r["cache"]) for e in entries
                                 for r in e.get("runs", []) if not r.get("error")))
    if not configs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["backend"] for e in entries if e.get("runs")]
    width = 0.8 / len(configs)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(names) * 2), 3.6))
    for ax, key, unit in ((axes[0], "prefill_ms", "prefill (ms)"), (axes[1], "decode_ms_per_token",
                                                                     "decode (ms per token)")):
        shown = []
        for i, cfg in enumerate(configs):
            values = []
            for name in names:
                run = next((r for e in entries if e["backend"] == name for r in e["runs"]
                            if (r["prompt_len"], r["batch_size"], r["cache"]) == cfg), None)
                values.append(run.get(key) if run and run.get(key) else 0.0)
            xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(names))]
            bars = ax.bar(xs, values, width, label=f"P{cfg[0]} B{cfg[1]} {cfg[2]}")
            if len(configs) * len(names) <= 12:
                ax.bar_label(bars, labels=[f"{v:.3g}" if v else "" for v in values], fontsize=7)
            shown += [v for v in values if v]
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(unit)
        if shown and max(shown) / min(shown) > 30:  # prompts of 512 and 32768 tokens on one axis
            ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{d.get('model', '')} on {d.get('device', '')} {d.get('dtype', '')}, {d.get('new_tokens')} new "
                 "tokens, greedy; a missing bar: out of memory or not run", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- files

def _md_cell(value: object) -> str:
    """A table cell: pipes escaped, newlines folded, so every row keeps its cell count."""
    return " ".join(str(value).split()).replace("|", "\\|")


def to_markdown(result: StepResult) -> str:
    """The result as a markdown report (report.md): summary, figures, checks, next."""
    lines = [f"# {result.step}: {result.status}", "", result.summary, ""]
    for title, header, rows in tables(result):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        lines.append("")
    if result.checks:
        lines += ["## checks", "", "| | check | evidence |", "|---|---|---|"]
        lines += [f"| {'pass' if c.passed else 'FAIL'} | {c.name} | {_md_cell(c.evidence)} |"
                  for c in result.checks]
        lines.append("")
    if result.next:
        lines += ["## next", "", result.next, ""]
    versions = result.data.get("versions")
    if versions:
        lines += ["## versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)


def plot_measurements(runs: list[dict], path: Path, title: str) -> Path | None:
    """Bar charts of median latency (ms) and peak memory (MB) per backend, saved as PNG.

    Returns the path, or None when there is nothing measured to plot.
    """
    ok = [m for m in runs if m.get("latency_ms") is not None]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m["backend"] for m in ok]
    colors = ["#9e9e9e" if m["backend"] == "eager" else "#1f77b4" for m in ok]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, unit in ((axes[0], "latency_ms", "median latency (ms)"),
                          (axes[1], "peak_memory_mb", "peak memory (MB)")):
        values = [m.get(key) or 0.0 for m in ok]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt="%.1f")
        ax.set_ylabel(unit)
        ax.set_ylim(0, max(values + [1e-9]) * 1.2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(runs: list[dict], path: Path, title: str) -> Path | None:
    """Median latency (ms) and peak memory (MB) against sequence length, a line per backend."""
    ok = [m for m in runs if m.get("latency_ms") is not None and m.get("seq_len")]
    if len({m["seq_len"] for m in ok}) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for name in dict.fromkeys(m.get("label") or m["backend"] for m in ok):
        pts = sorted((m["seq_len"], m["latency_ms"], m.get("peak_memory_mb")) for m in ok
                     if (m.get("label") or m["backend"]) == name)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        axes[1].plot([p[0] for p in pts], [p[2] or 0.0 for p in pts], marker="o", label=name)
    from matplotlib.ticker import ScalarFormatter

    seq_lens = sorted({m["seq_len"] for m in ok})
    for ax, unit in ((axes[0], "median latency (ms)"), (axes[1], "peak memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(seq_lens, [str(s) for s in seq_lens])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("sequence length S")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_grid(rows: list[dict], path: Path, metric: str, unit: str, title: str) -> Path | None:
    """``metric`` (a key of the benchmark's ``data.grid`` rows, e.g. tflops) against S, a
    line per candidate, one panel per (shape, causal, direction, dtype); log-log axes."""
    ok = [r for r in rows if r.get(metric) is not None and r.get("status") in ("passed", "baseline")]
    panels = list(dict.fromkeys((r["shape"], r["causal"], r["direction"], r["dtype"]) for r in ok))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fp8(rows: list[dict], path: Path, title: str) -> Path | None:
    """TFLOP/s against sequence length, one panel per (head_dim, causal), a line each for
    the FP8 kernel, FP8 with quantisation and the bf16 kernels (``fp8_attention`` rows)."""
    ok = [r for r in rows if not r.get("error") and r.get("fp8")]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["head_dim"], r["causal"]) for r in ok})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def default_run_folder(step: str, model: str, root: Path = Path("attention-reports")) -> Path:
    """./attention-reports/<step>-<YYYYmmdd-HHMMSS>-<model>: where a run's report goes by default."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-")[-60:] or "model"
    return root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{name}"


def refuse_to_overwrite(path: str | None, flag: str) -> None:
    """Raise ``CannotRun`` before any work when ``path`` (the value of ``flag``) exists."""
    if path and Path(path).expanduser().exists():
        raise CannotRun(f"{flag} {path} already exists; nothing was written",
                        "pass a new file name: the job never overwrites your files")


def write_patch(result: StepResult, patch: str, path: str | None) -> None:
    """Write ``patch`` to the new file ``path`` (when both are given) and record it as
    ``data["patch_file"]``."""
    if path and patch:
        target = Path(path).expanduser()
        target.write_text(patch)
        result.data["patch_file"] = str(target.resolve())


def write_run_folder(result: StepResult, folder: Path, extra: dict[str, str] | None = None) -> Path:
    """Write report.json, report.md, (when latencies were measured) report.png, and each
    non-empty ``extra`` file (name -> text, e.g. swap.patch).

    ``folder`` is created; files already in it with these names are replaced, nothing
    else is touched. Its absolute path is stored in ``result.data["report_dir"]``.
    """
    folder = folder.expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    result.data["report_dir"] = str(folder)
    runs = [result.data[k] for k in ("baseline", "candidate") if isinstance(result.data.get(k), dict)]
    runs += [m for m in result.data.get("measurements", []) if isinstance(m, dict)]
    shape = result.data.get("shape") or {}
    seq = shape.get("seq_lens") or [shape.get("seq_len")]
    seq_text = f"seq_len {seq[0]}" if len(seq) == 1 else f"seq_len {min(seq)}-{max(seq)}"
    title = (f"{result.data.get('model', '')} on {result.data.get('device', '')} {result.data.get('dtype', '')}, "
             f"batch {shape.get('batch_size')}, {seq_text}")
    try:
        if isinstance(result.data.get("grid"), list) and result.data["grid"] and "label" in result.data["grid"][0]:
            where = f"{result.data.get('gpu') or result.data.get('device', '')}, torch {result.data.get('torch', '')}"
            png = plot_grid(result.data["grid"], folder / "report.png", "tflops", "TFLOP/s", f"attention TFLOP/s, {where}")
            mem = plot_grid(result.data["grid"], folder / "memory.png", "peak_memory_mb", "peak memory (MB)",
                            f"attention peak memory, {where}")
            if mem:
                result.data["memory_plot"] = str(mem)
        elif isinstance(result.data.get("grid_table"), dict):
            png = plot_fp8(result.data.get("shapes") or [], folder / "report.png",
                           result.data["grid_table"]["title"] + " (TFLOP/s)")
        elif generation_backends(result.data):
            png = plot_generation(result.data, folder / "report.png")
        else:
            png = (plot_sweep(runs, folder / "report.png", title) or
                   plot_measurements(runs, folder / "report.png", title))
    except Exception as exc:  # a missing plotting backend must not lose the report
        png = None
        result.data["plot_error"] = f"{type(exc).__name__}: {exc}"
    if png:
        result.data["plot"] = str(png)
    (folder / "report.json").write_text(result.to_json() + "\n")
    (folder / "report.md").write_text(to_markdown(result))
    for name, text in (extra or {}).items():
        if text:
            (folder / name).write_text(text)
    return folder
