"""The profile_attention step: backends (or two models) side by side, over sequence lengths.

Each run is ``measure.timing.measure_backend`` on the same inputs: the kernels the
profiler saw, peak memory, median latency with its IQR, TFLOP/s.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import BACKENDS, availability, choose
from ..env import resolve
from ..measure.timing import Measurement, measure_backend, time_paired
from ..measure.verdicts import comparison_summary, kernel_check, memory_check, speed_check
from ..report import (CannotRun, Check, Sections, StepResult, default_run_folder, measured, measured_figure,
                      register_view, write_run_folder)
from .session import SessionData, open_session


@dataclass
class ProfileOptions:
    """What ``profile_attention.py`` takes (see its --help)."""

    model: str | None = None
    against: str | None = None
    backends: list[str] | None = None  # None: eager,auto for one model; each as loaded for two
    batch_size: int = 1
    seq_lens: list[int] = field(default_factory=lambda: [1024])
    pad_fraction: float | None = None
    dtype: str = "auto"
    device: str = "auto"
    min_run_time: float = 1.0
    sdpa_kernels: list[str] | None = None
    trust_remote_code: bool = False
    train: bool = False  # forward + backward in training mode
    report_dir: str | None = None
    write_report: bool = True


@dataclass(kw_only=True)
class ProfileAttentionData(SessionData):
    """``data`` of profile_attention: the first model's session fields (``shape`` adds
    ``seq_lens``, every length measured), then:

    ``against``: the second model spec, or None for backends of one model; ``measurements``:
    every run as the sweep measured it (``measure.timing.Measurement``: latency in ms, peak
    memory in MB, TFLOP/s), by length, then in plan order; ``speedup``: the first run's median
    latency / the last run's at the longest length, the two re-timed against each other in
    interleaved rounds (None unless both ran); ``memory_ratio``: their peak memory (MB), first
    / last (None unless both have one); ``sweep``: ``{"seq_len", "speedup"}`` for each length
    where the first and last runs both ran (the sweep's own latencies);
    ``sdpa_kernels_allowed``: --sdpa-kernel, or None; ``mode``: "forward" or
    "forward+backward"; ``weights_mb``: the first model's parameters (MB)."""

    against: str | None = None
    measurements: list[Measurement] = field(default_factory=list)
    speedup: float | None = None
    memory_ratio: float | None = None
    sweep: list[dict[str, Any]] = field(default_factory=list)
    sdpa_kernels_allowed: list[str] | None = None
    mode: str = "forward"
    weights_mb: float | None = None


def _retime(plan: list, before: Measurement, after: Measurement, o: Any) -> None:
    """The speed verdict's evidence: the first and last plan entries at the longest length,
    timed against each other in interleaved rounds (``timing.time_paired``)."""
    sides = []
    for (s, backend, _), m in ((plan[0], before), (plan[-1], after)):
        limit = s.loaded.max_seq_len()
        inputs = s.loaded.inputs(o.batch_size, min(m.seq_len, limit or m.seq_len), o.pad_fraction)
        sides.append((s.loaded, inputs, backend, o.sdpa_kernels, m))
    time_paired(sides, o.min_run_time, train=o.train)


def _validate(o: ProfileOptions) -> list[str]:
    """The backend names asked for, after refusing what cannot be compared (``CannotRun``)."""
    names = list(o.backends or [])
    unknown = [b for b in names if b != "auto" and b not in BACKENDS]
    if unknown:
        raise CannotRun(f"unknown backend {', '.join(unknown)}; choose from auto, {', '.join(BACKENDS)}", "")
    if o.against and len(names) > 2:
        raise CannotRun("with --against, give at most two backends: one for each model", "")
    if not o.against and len(names) == 1:
        raise CannotRun("give at least two backends to compare, e.g. --backends eager,sdpa", "")
    if not 0 < o.min_run_time < float("inf"):  # NaN and inf never end a timing loop
        raise CannotRun(f"--min-run-time must be positive, not {o.min_run_time}", "")
    return names


def profile_attention(o: ProfileOptions, reporter: Any) -> StepResult:
    """Measure backends (or two model specs) side by side, over one or more sequence lengths.

    One model: each of ``backends`` (default eager, then auto's choice) on the same inputs.
    ``train``: forward + backward in training mode (the model's ``train()``; loss
    sum(output * G) for a fixed random G, as ``measure.timing.train_fn``), per backend; a
    backend out of memory is recorded in its ``Measurement.error``.
    Two models (``against``): each as loaded, or with ``backends[0]`` / ``backends[-1]``.
    Passes when, at the longest sequence, the last run shows its fused kernel, is faster
    than the first and uses no more peak memory. Raises ``CannotRun`` when it cannot start.
    """
    names = _validate(o)
    seq_lens = sorted(set(o.seq_lens))
    env, device, dtype = resolve(o.device, o.dtype)
    for name in dict.fromkeys(names):
        av = availability(name, env=env, device=device, dtype=dtype) if name != "auto" else None
        if av is not None and not av.available:
            raise CannotRun(f"--backends {name} cannot run here: {av.reason}",
                            "drop it from --backends; check_env.py says which backends run here")
    kw = dict(device=device, dtype=o.dtype, batch_size=o.batch_size, seq_len=seq_lens[-1], pad_fraction=o.pad_fraction,
              trust_remote_code=o.trust_remote_code, reporter=reporter, env=env, train=o.train)
    first = open_session(o.model, **kw)
    plan = []  # (session, backend, label)
    if o.against:
        second = open_session(o.against, **kw)
        picks = names or [None, None]
        for s, pick in ((first, picks[0]), (second, picks[-1])):
            b = pick or s.loaded.original_backend or "eager"
            b = choose("auto", env=env, device=device, dtype=dtype, model=s.loaded.model).backend if b == "auto" else b
            plan.append((s, b, f"{s.loaded.name}: {b}"))
    else:
        for b in names or ["eager", "auto"]:
            b = choose(b, env=env, device=device, dtype=dtype, model=first.loaded.model).backend if b == "auto" else b
            plan.append((first, b, b))
    data = ProfileAttentionData(
        **first.fields(), against=o.against, sdpa_kernels_allowed=o.sdpa_kernels,
        mode="forward+backward" if o.train else "forward",
        weights_mb=sum(p.numel() * p.element_size() for p in first.loaded.model.parameters()) / 2**20)
    data.shape["seq_lens"] = seq_lens
    runs: list[Measurement] = []
    interrupted = ""
    try:
        for seq_len in seq_lens:
            for s, backend, label in plan:
                limit = s.loaded.max_seq_len()
                inputs = s.loaded.inputs(o.batch_size, min(seq_len, limit or seq_len), o.pad_fraction)
                mode = " (forward + backward)" if o.train else ""
                with reporter.stage(f"measuring {label} at seq_len {inputs.seq_len}{mode}"):
                    m, _ = measure_backend(s.loaded, inputs, backend, min_run_time=o.min_run_time,
                                           sdpa_kernels=o.sdpa_kernels, label=label, train=o.train,
                                           gradients=False)
                runs.append(m)
                data.measurements.append(copy.deepcopy(m))  # as measured: _retime re-times the last pair in place
    except KeyboardInterrupt:
        interrupted = f"interrupted (Ctrl-C) after {len(runs)} of {len(plan) * len(seq_lens)} runs"
    for seq_len in seq_lens:
        row = [m for m in runs if m.seq_len == seq_len]
        if len(row) == len(plan) and not row[0].error and not row[-1].error:
            data.sweep.append({"seq_len": seq_len, "speedup": row[0].latency_ms / row[-1].latency_ms})
    last_s = [m for m in runs if m.seq_len == max((m.seq_len or 0) for m in runs)] if runs else []
    if interrupted or len(last_s) < len(plan):
        result = StepResult("profile_attention", "error", interrupted or "not every run finished", [], data,
                            "rerun to finish")
    else:
        before, after = last_s[0], last_s[-1]
        failed_run = next((m for m in (before, after) if m.error), None)
        if failed_run is not None:
            checks = [Check("runs", False, f"{failed_run.label}: {failed_run.error}")]
            summary = f"{failed_run.label} could not run at seq_len {failed_run.seq_len}: {failed_run.error}"
        else:
            with reporter.stage(f"timing {before.label} and {after.label} in interleaved rounds"):
                _retime(plan, before, after, o)
            checks = [kernel_check(before, after, after.backend)] if after.backend != "eager" else []
            checks.append(speed_check(before, after))
            mem = memory_check(before, after)
            checks += [mem] if mem else []
            data.speedup = before.latency_ms / after.latency_ms
            if before.peak_memory_mb and after.peak_memory_mb:
                data.memory_ratio = before.peak_memory_mb / after.peak_memory_mb
            summary = f"{before.label} -> {after.label} at seq_len {after.seq_len}: {comparison_summary(before, after)}"
            if len(data.sweep) > 1:
                summary += "; speedup by seq_len: " + ", ".join(f"{r['seq_len']}: {r['speedup']:.2f}x"
                                                                for r in data.sweep)
        ok = all(c.passed for c in checks)
        result = StepResult("profile_attention", "pass" if ok else "fail", summary, checks, data,
                            "run compare_accuracy.py to check that the outputs still match" if ok else
                            "the switch does not pay at this shape: read the kernels each run shows; a longer "
                            "--seq-len raises attention's share of the time")
    if o.write_report:
        write_run_folder(result, Path(o.report_dir) if o.report_dir else
                         default_run_folder("profile_attention", first.loaded.name))
    return result


#: How a result of this step is drawn (report.View): every measurement, and a sweep over lengths.
VIEW = register_view("profile_attention", Sections((measured(list_key="measurements"),),
                                                   measured_figure(list_key="measurements")))
