"""Result objects of a checklist step, and every way they are shown.

The step contract (ARCHITECTURE.md): one JSON object on stdout with ``--json`` (progress on
stderr), else a rich rendering; exit ``0`` pass/skip, ``1`` a check failed, ``2`` could not
run. The only module that writes to the terminal or renders a report.

Units: latency in ms, memory in MB (2**20 bytes, as ``torch.cuda.memory_summary``
counts), throughput in TFLOP/s (10**12 FLOP per second).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Protocol

from rich.markup import escape

STATUSES = ("pass", "fail", "skip", "error")
EXIT_CODES = {"pass": 0, "skip": 0, "fail": 1, "error": 2}


class CannotRun(Exception):
    """The step cannot run (exit 2). ``message``: one line; ``hint``: what to do (the JSON's
    ``next``); ``data``: whatever was measured before the step stopped."""

    def __init__(self, message: str, hint: str = "", data: "StepData | None" = None):
        super().__init__(message)
        self.message = " ".join(str(message).split())  # always one line
        self.hint = hint
        self.data = data


class OptionError(CannotRun):
    """A value of the caller's option ``option`` (a parameter name: ``dtype``) that cannot be
    used. ``text`` and ``advice`` are templates: a placeholder in ``values`` (``{value!r}``)
    is data; any other (``{dtype}``) names an option, as a parameter until ``render`` names it
    otherwise (the command line's ``--dtype``, ``steps.flag``)."""

    def __init__(self, option: str, text: str, advice: str = "", **values: object):
        self.option, self.text, self.advice, self.values = option, text, advice, values
        super().__init__("")
        self.render(str)

    def render(self, name: Callable[[str], str]) -> "OptionError":
        """Write ``message`` and ``hint`` naming options by ``name`` (parameter -> spelling); returns self."""
        names = _OptionNames(self.values, name)
        self.message = one_line(self.text.format_map(names))
        self.hint = self.advice.format_map(names)
        self.args = (self.message,)
        return self


class _OptionNames(dict):
    """The values of an ``OptionError``'s templates: its data, and any other key as an option's name."""

    def __init__(self, values: dict[str, object], name: Callable[[str], str]):
        super().__init__(values)
        self.name = name

    def __missing__(self, key: str) -> str:
        return self.name(key)


class Unsupported(CannotRun):
    """A ``construct`` a backend cannot take, met at ``where``: raised by code users call
    directly (the attention functions registered with transformers), so its advice speaks of
    the API, not of flags."""

    def __init__(self, construct: str, where: str = "", hint: str = ""):
        super().__init__(f"{where}: {construct}" if where else construct, hint)
        self.construct, self.where = construct, where


class OutOfMemory(CannotRun):
    """A run that must finish ran out of memory (``where``: what, at what shape; ``detail``:
    ``measure.timing.oom_message``). Raised without advice; ``cli.ADVICE`` adds it."""

    def __init__(self, where: str, detail: str):
        super().__init__(f"{where}: {detail}" if where else detail)
        self.where, self.detail = where, detail


class NotSwitched(CannotRun):
    """Attention could not be put on ``backend``; ``reason``: ``no_switch`` (neither transformers
    nor swappable hand-written attention), ``refused`` (by transformers for this class),
    ``already_fused`` (every site runs SDPA) or ``no_site`` (no site swappable; each site says
    why). ``cli.ADVICE`` adds what to run."""

    def __init__(self, message: str, reason: str, backend: str = ""):
        super().__init__(message)
        self.reason, self.backend = reason, backend


class NoKernel(CannotRun):
    """No SDPA kernel that the caller allowed can take these inputs (``reasons``: torch's)."""

    def __init__(self, where: str, reasons: str):
        super().__init__(f"{where}: no allowed SDPA kernel can take these inputs: {reasons}")
        self.where, self.reasons = where, reasons


class NeedsTrust(CannotRun):
    """A model (``ref``) whose own modelling code would run, which the caller did not allow."""

    def __init__(self, ref: str):
        super().__init__(f"model {ref} ships its own modelling code, which runs only when that code is trusted")
        self.ref = ref


class NoMemoryBound(CannotRun):
    """A search that needs a memory bound found none on this machine (``why``)."""

    def __init__(self, why: str):
        super().__init__(why)


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` on one line (whitespace folded), cut to ``limit`` characters when given."""
    folded = " ".join(str(text).split())
    return folded if limit is None or len(folded) <= limit else folded[:limit]


def said(exc: BaseException, limit: int = 200) -> str:
    """'TypeName: its text' (``one_line``, ``limit`` characters); a ``CannotRun``'s own message."""
    if isinstance(exc, CannotRun):
        return one_line(exc.message, limit)
    return f"{type(exc).__name__}: {one_line(exc, limit)}"


@dataclass
class Check:
    """One verdict of a step: ``passed`` and the one-line ``evidence`` it rests on."""

    name: str
    passed: bool
    evidence: str


@dataclass(kw_only=True)
class StepData:
    """What a step measured: the base of each step's typed ``data`` (e.g.
    ``steps.enable_flash.EnableFlashData``); its JSON form is ``to_dict``.

    Fields are the JSON keys, in order; one in ``OMIT_IF_NONE`` is left out while None
    (``gradients`` without ``--train``). Typed values (``Measurement``, ``Accuracy``) give
    their ``to_dict``. ``data["key"]`` / ``data.get`` read the JSON form, as report.json
    would. The fields here are the generic writers' (``write_run_folder``, ``write_patch``).
    """

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()
    _BASE_OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"report_dir_note", "plot", "plot_error", "patch_file"})

    notes: list[str] = field(default_factory=list)
    report_dir: str | None = None
    report_dir_note: str | None = None
    plot: str | None = None
    plot_error: str | None = None
    patch_file: str | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.__dataclass_fields__:  # a step cannot grow an undocumented key
            raise AttributeError(f"{type(self).__name__} has no field {name!r}: declare it in the class")
        object.__setattr__(self, name, value)

    def _omitted(self, name: str) -> bool:
        return getattr(self, name) is None and (name in self.OMIT_IF_NONE or name in self._BASE_OPTIONAL)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of every field not omitted (``_jsonable``: NaN and inf become None)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self) if not self._omitted(f.name)}

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return _jsonable(getattr(self, key))

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in {f.name for f in fields(self)} and not self._omitted(key)


@dataclass
class StepResult:
    """The one JSON object a step prints (ARCHITECTURE.md, "The step contract"): the verdict
    (``status``, ``summary``, ``checks``, ``next``) and the step's own typed ``data``."""

    step: str
    status: str
    summary: str
    checks: list[Check] = field(default_factory=list)
    data: StepData | None = None  # None: nothing was measured (an error before the step ran); JSON {}
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
            "data": self.data.to_dict() if self.data is not None else {},
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


# --- formatting

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


# --- terminal

class Reporter:
    """Progress on stderr (a rich spinner on a terminal, else plain lines); the result on
    stdout, exactly one JSON object with ``json_mode``."""

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        from rich.console import Console

        self.json_mode = json_mode
        self.quiet = quiet
        # emoji=False: rich would draw a user's text such as "cuda:abc" as cuda🔤 (its :abc: code)
        self.err = Console(stderr=True, highlight=False, emoji=False)
        self.out = Console(highlight=False, soft_wrap=False, emoji=False)
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
    report_dir = result.data.get("report_dir") if result.data is not None else None
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


Table = tuple[str, list[str], list[list[str]]]


class View(Protocol):
    """How one step's result is drawn: tables (title, header, rows) for rich and markdown,
    and its plot; each step registers its own (``register_view``)."""

    def tables(self, data: dict[str, Any]) -> list[Table]: ...

    def plot(self, data: dict[str, Any], folder: Path) -> Path | None: ...


@dataclass(frozen=True)
class Sections:
    """A ``View`` of ``parts`` (data -> tables) and ``figure`` (writes the plot, or None)."""

    parts: tuple[Callable[[dict[str, Any]], list[Table]], ...] = ()
    figure: Callable[[dict[str, Any], Path], Path | None] | None = None

    def tables(self, data: dict[str, Any]) -> list[Table]:
        return [t for part in self.parts for t in part(data)]

    def plot(self, data: dict[str, Any], folder: Path) -> Path | None:
        return self.figure(data, folder) if self.figure is not None else None


#: step name -> its view (``register_view``); a step without one is drawn as summary and checks.
VIEWS: dict[str, View] = {}


def register_view(step: str, view: View) -> View:
    """Make ``view`` the way results of ``step`` are drawn; returns it."""
    VIEWS[step] = view
    return view


def tables(result: StepResult) -> list[Table]:
    """The figures of a step as (title, header, rows) tables, from the step's registered view."""
    view = VIEWS.get(result.step)
    return view.tables(result.data.to_dict()) if view is not None and result.data is not None else []


def _runs(data: dict[str, Any], keys: tuple[str, ...], list_key: str | None) -> list[dict]:
    """The measurements a view names: ``data[k]`` for each of ``keys``, then ``data[list_key]``."""
    runs = [data[k] for k in keys if data.get(k)]
    return runs + list(data.get(list_key) or []) if list_key else runs


def measured(*keys: str, list_key: str | None = None) -> Callable[[dict[str, Any]], list[Table]]:
    """A part: the ``Measurement`` dicts at ``keys`` and in ``list_key`` as one table (a
    seq_len column for a sweep)."""
    def part(d: dict[str, Any]) -> list[Table]:
        runs = _runs(d, keys, list_key)
        if not runs:
            return []
        shape = d.get("shape") or {}
        title = "measured"
        if shape:
            title += f" on {d.get('device', '?')} {d.get('dtype', '')}, batch {shape.get('batch_size')}, seq_len {shape.get('seq_len')}"
        if any(m.get("mode") == "forward+backward" for m in runs):
            title += " (forward + backward)"
        sweep = len({m.get("seq_len") for m in runs}) > 1
        return [(title if not sweep else title.rsplit(", seq_len", 1)[0], (["seq_len"] if sweep else []) +
                 MEASUREMENT_HEADER, measurement_rows(runs, with_seq_len=sweep))]
    return part


def measured_figure(*keys: str, list_key: str | None = None) -> Callable[[dict[str, Any], Path], Path | None]:
    """A figure of those measurements: ``plot_sweep``, else ``plot_measurements``."""
    def figure(d: dict[str, Any], folder: Path) -> Path | None:
        runs = _runs(d, keys, list_key)
        shape = d.get("shape") or {}
        seq = shape.get("seq_lens") or [shape.get("seq_len")]
        seq_text = f"seq_len {seq[0]}" if len(seq) == 1 else f"seq_len {min(seq)}-{max(seq)}"
        title = (f"{d.get('model', '')} on {d.get('device', '')} {d.get('dtype', '')}, "
                 f"batch {shape.get('batch_size')}, {seq_text}")
        return plot_sweep(runs, folder / "report.png", title) or plot_measurements(runs, folder / "report.png", title)
    return figure


def accuracy_part(d: dict[str, Any]) -> list[Table]:
    """A part: ``data.accuracy`` (``measure.accuracy.Accuracy``), by the dtype or FP8 rule."""
    acc = d.get("accuracy")
    out: list[Table] = []
    if not acc:
        return out
    if acc.get("max_abs_err") is not None:
        rows = [[f"max_abs_err (vs {acc.get('reference') or 'float64 reference'})", fmt_err(acc.get("max_abs_err"))],
                ["baseline's own max_abs_err (vs float64)", fmt_err(acc.get("baseline_max_abs_err"))],
                ["tolerance", f"{fmt_err(acc.get('tolerance'))}  ({acc.get('rule', '')})"],
                ["max_rel_err", fmt_err(acc.get("max_rel_err"))],
                ["candidate vs baseline max_abs_err", fmt_err(acc.get("candidate_vs_baseline_max_abs_err"))]]
        if acc.get("reference_error_bound") is not None:
            rows.append(["the reference's bound on the baseline's error (64 x eps x max|ref|)",
                         fmt_err(acc.get("reference_error_bound")) +
                         ("" if acc.get("reference_trusted") else " (exceeded: reference not used)")])
        if acc.get("top1_agreement") is not None:
            rows.append(["top-1 token agreement with baseline", f"{100 * acc['top1_agreement']:.2f} %"])
        rows.append(["positions compared / padding left out",
                     f"{acc.get('compared_positions')} / {acc.get('padding_positions')}"])
        if acc.get("padding_positions"):
            rows.append(["max_abs_err at padding (not judged)", fmt_err(acc.get("padding_max_abs_err"))])
        out.append(("accuracy", ["figure", "value"], rows))
    if acc.get("precision") == "fp8_e4m3" and acc.get("rel_rms_err") is not None:
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
    return out


def autotune_part(d: dict[str, Any]) -> list[Table]:
    """A part: ``data.autotune`` (``measure.autotune.summary_dict``), every candidate ranked."""
    tune = d.get("autotune")
    if not tune or not tune.get("candidates"):
        return []
    rows = []
    for i, c in enumerate(tune["candidates"], 1):
        label = f"{c['backend']}[{c['kernel']}]" if c.get("kernel") else c["backend"]
        mark = " (chosen)" if label == tune.get("chosen_label") else ""
        acc = "" if c.get("accuracy_passed") is None else ("within tol" if c["accuracy_passed"] else "OUTSIDE tol")
        rows.append([str(i) if c.get("latency_ms") is not None else "-", label + mark, c["status"],
                     fmt_ms(c.get("latency_ms")), "n/a" if c.get("compile_s") is None else f"{c['compile_s']:.2f} s",
                     acc, one_line(c.get("reason") or "", 160)])
    return [(f"autotune ({tune.get('mode', '')}, fastest first; compile = first call minus one run)",
             ["#", "candidate", "status", "median", "compile", "accuracy", "reason"], rows)]


def rejected_part(d: dict[str, Any]) -> list[Table]:
    """A part: ``data.rejected``, each backend not chosen with its reason."""
    if not d.get("rejected"):
        return []
    return [("backends not chosen", ["backend", "reason"], [[r["backend"], r["reason"]] for r in d["rejected"]])]


# --- files

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
    versions = result.data.get("versions") if result.data is not None else None
    if versions:
        lines += ["## versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)


def plot_measurements(runs: list[dict], path: Path, title: str) -> Path | None:
    """Bars of median latency (ms) and peak memory (MB) per backend, as PNG: the path, or None."""
    ok = [m for m in runs if m.get("latency_ms") is not None]
    if not ok:
        return None
    names = [m["backend"] for m in ok]
    colors = ["#9e9e9e" if m["backend"] == "eager" else "#1f77b4" for m in ok]
    fig, axes = subplots(1, 2, figsize=(8, 3.2))
    for ax, key, unit in ((axes[0], "latency_ms", "median latency (ms)"),
                          (axes[1], "peak_memory_mb", "peak memory (MB)")):
        values = [m.get(key) or 0.0 for m in ok]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt="%.1f")
        ax.set_ylabel(unit)
        ax.set_ylim(0, max(values + [1e-9]) * 1.2)
    return save_figure(fig, path, title)


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots(...)`` on matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path, title: str, dpi: int = 120) -> Path:
    """Title ``fig``, write it to ``path`` (PNG) and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_sweep(runs: list[dict], path: Path, title: str) -> Path | None:
    """Median latency (ms) and peak memory (MB) against sequence length, a line per backend."""
    ok = [m for m in runs if m.get("latency_ms") is not None and m.get("seq_len")]
    if len({m["seq_len"] for m in ok}) < 2:
        return None
    fig, axes = subplots(1, 2, figsize=(8, 3.2))
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
    return save_figure(fig, path, title)


#: The files a run writes into its run folder, any of which a user's folder may already hold.
REPORT_FILES = ("report.json", "report.md", "report.png", "memory.png", "swap.patch")
#: Where the run folders go by default, under the working directory.
REPORTS_ROOT = Path("attention-reports")


def default_run_folder(step: str, model: str, root: Path = REPORTS_ROOT) -> Path:
    """Create a new ./attention-reports/<step>-<YYYYmmdd-HHMMSS.mmm>-<random>-<model>
    (``exist_ok=False``: runs started in one millisecond still get their own)."""
    import secrets

    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-")[-60:] or "model"
    for _ in range(100):
        now = time.time()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        folder = root / f"{step}-{stamp}-{secrets.token_hex(2)}-{name}"
        root.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return folder
    raise CannotRun(f"could not create a new run folder under {root}", "pass --report-dir DIR")


def _cannot_write(folder: Path) -> str | None:
    """Why no file can be created in the existing ``folder`` (None: it can), by really creating
    a temporary file, so read-only mounts and permissions are judged as the write would be."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def _check_creatable(path: Path, flag: str, shown: str, hint: str = "") -> None:
    """Raise ``CannotRun`` unless ``path``'s nearest existing ancestor is a writable folder."""
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise CannotRun(f"{flag} {shown}: {above} is a file, not a folder; nothing was written",
                        hint or f"pass a path in a folder for {flag}")
    why = _cannot_write(above)
    if why:
        raise CannotRun(f"{flag} {shown}: cannot write in {above} ({why}); nothing was written",
                        hint or f"pass a folder you can write to for {flag}")


def _require_writable(folder: Path, flag: str, shown: str) -> None:
    """Raise ``CannotRun`` when no file can be created in the existing folder ``folder``."""
    why = _cannot_write(folder)
    if why:
        raise CannotRun(f"{flag} {shown}: cannot write in it ({why}); nothing was written",
                        f"pass a folder you can write to for {flag}")


def check_run_folder(path: str, flag: str = "--report-dir") -> None:
    """Raise ``CannotRun`` before any work unless the run folder ``path`` is new and creatable or
    empty and writable: a run never overwrites or mixes with a report or the user's files."""
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise CannotRun(f"{flag} {path} is a file, not a folder; nothing was written",
                            f"pass a new or empty folder for {flag}")
        _require_writable(folder, flag, path)  # first: a read-only folder is refused as such, full or not
        held = [name for name in REPORT_FILES if (folder / name).exists()]
        if held:
            raise CannotRun(f"{flag} {path} already holds {', '.join(held)}, which this run would overwrite; "
                            "nothing was written", f"pass a new or empty folder for {flag}, or move those files")
        entries = sorted(e.name for e in folder.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise CannotRun(f"{flag} {path} is not empty (it holds {shown}): a run writes only into a new or empty "
                            "folder; nothing was written",
                            f"pass a new or empty folder for {flag}, e.g. {Path(path) / 'run'}")
    else:
        _check_creatable(folder, flag, path)


def check_new_folder(path: str, flag: str) -> None:
    """Like ``check_run_folder``, for ``--save``."""
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir() or any(folder.iterdir()):
            raise CannotRun(f"{flag} {path} already exists and is not an empty folder; nothing was written",
                            "pass a new folder: the job never overwrites your files")
        _require_writable(folder, flag, path)
    else:
        _check_creatable(folder, flag, path)


def refuse_to_overwrite(path: str | None, flag: str) -> None:
    """Raise ``CannotRun`` before any work when the new file ``path`` exists or cannot be
    created (folder missing, not a folder, not writable)."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.exists() or target.is_symlink():
        raise CannotRun(f"{flag} {path} already exists; nothing was written",
                        "pass a new file name: the job never overwrites your files")
    folder = target.parent
    if not folder.exists():
        raise CannotRun(f"{flag} {path}: the folder {folder} does not exist; nothing was written",
                        f"create {folder} first, or pass a file in an existing folder")
    if not folder.is_dir():
        raise CannotRun(f"{flag} {path}: {folder} is not a folder; nothing was written",
                        "pass a file in an existing folder")
    why = _cannot_write(folder)
    if why:
        raise CannotRun(f"{flag} {path}: cannot write in {folder} ({why}); nothing was written",
                        f"pass a file in a folder you can write to for {flag}")


def check_outputs(args: Any) -> None:
    """Check --report-dir (or ./attention-reports), --save and --write-patch before any work,
    so a long run never ends in "cannot write". Raises ``CannotRun``."""
    if hasattr(args, "report_dir") and not getattr(args, "no_report", False):
        if args.report_dir:
            check_run_folder(args.report_dir)
        else:
            _check_creatable(REPORTS_ROOT.absolute() / "run", "the default run folder", f"./{REPORTS_ROOT}",
                             "pass --report-dir DIR in a folder you can write to, or --no-report")
    if getattr(args, "save", None):
        check_new_folder(args.save, "--save")
    refuse_to_overwrite(getattr(args, "write_patch", None), "--write-patch")


def write_patch(result: StepResult, patch: str, path: str | None, why_none: str = "",
                apply_in: Path | None = None) -> None:
    """Write ``patch`` to the new file ``path`` (``data["patch_file"]``), with a note when its
    paths are relative to ``apply_in`` (``swap.patch.patch_root``) other than the working
    directory; with ``path`` but no patch, a note says nothing was written and ``why_none``."""
    if path and patch:
        target = Path(path).expanduser()
        with open(target, "x") as f:  # never over a file that appeared since the start
            f.write(patch)
        result.data.patch_file = str(target.resolve())
        if apply_in is not None and Path(apply_in).resolve() != Path.cwd().resolve():
            result.data.notes.append(f"{target}: its paths are relative to {apply_in}; apply it there "
                                     f"(git -C {apply_in} apply {target.resolve()})")
    elif path:
        result.data.notes.append(
            f"--write-patch {path}: nothing written, there is no source change" + (f": {why_none}" if why_none else ""))


def write_run_folder(result: StepResult, folder: Path, extra: dict[str, str] | None = None) -> Path:
    """Create ``folder`` and write report.json, report.md, the ``View``'s plots (report.png;
    another may record its path under an omitted-while-None field, e.g. ``memory_plot``) and
    each non-empty ``extra`` file (name -> text). A folder already holding a report (another
    run finished first) is never overwritten: a new subfolder is used, said in
    ``data["report_dir_note"]``. The absolute path goes to ``data["report_dir"]``.
    """
    folder = folder.expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if any((folder / name).exists() for name in REPORT_FILES):
        taken = folder
        folder = default_run_folder(result.step, "run", root=taken).resolve()
        result.data.report_dir_note = f"{taken} already held a report when this run finished; written to {folder}"
    result.data.report_dir = str(folder)
    view = VIEWS.get(result.step)
    shown = result.data.to_dict()
    try:
        png = view.plot(shown, folder) if view is not None else None
    except Exception as exc:  # a missing plotting backend must not lose the report
        png = None
        result.data.plot_error = f"{type(exc).__name__}: {exc}"
    for name in (f.name for f in fields(result.data)):  # a key the plot added (another plot's path): kept
        if name in shown and name not in result.data:
            setattr(result.data, name, shown[name])
    if png:
        result.data.plot = str(png)
    with open(folder / "report.json", "x") as f:
        f.write(result.to_json() + "\n")
    (folder / "report.md").write_text(to_markdown(result))
    for name, text in (extra or {}).items():
        if text:
            (folder / name).write_text(text)
    return folder
