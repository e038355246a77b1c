"""The compare_accuracy step: two backends of one model, or two models, against float64.

The rule is ``measure.accuracy``'s: the candidate's max error against a float64 run must
stay within 2 x the baseline's own error + eps(dtype) x max|reference|.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import BACKENDS, availability, choose
from ..env import dtype_name, resolve
from ..measure.accuracy import Accuracy, judge_outputs
from ..report import (CannotRun, Check, Sections, StepResult, accuracy_part, default_run_folder, register_view,
                      write_run_folder)
from .session import SessionData, open_session


@dataclass
class AccuracyOptions:
    """What ``compare_accuracy.py`` takes (see its --help)."""

    model: str | None = None
    against: str | None = None
    baseline: str | None = None  # None: eager for one model; as loaded for two
    candidate: str | None = None  # None: auto's choice for one model; as loaded for two
    batch_size: int = 1
    seq_len: int = 1024
    pad_fraction: float | None = None
    dtype: str = "auto"
    device: str = "auto"
    sdpa_kernels: list[str] | None = None
    trust_remote_code: bool = False
    report_dir: str | None = None
    write_report: bool = True


@dataclass(kw_only=True)
class CompareAccuracyData(SessionData):
    """``data`` of compare_accuracy: the first model's session fields, then ``against`` (the
    second model spec, or None for two backends of one model), ``baseline`` and ``candidate``
    (each ``{"backend", "label"}``: the backend run and how the result names it),
    ``sdpa_kernels_allowed`` (--sdpa-kernel, or None) and ``accuracy`` (the candidate against
    float64, judged against the baseline's own error: a ``measure.accuracy.Accuracy``)."""

    against: str | None = None
    baseline: dict[str, str] = field(default_factory=dict)
    candidate: dict[str, str] = field(default_factory=dict)
    sdpa_kernels_allowed: list[str] | None = None
    accuracy: Accuracy | None = None


def _refuse_other_vocabulary(first: Any, second: Any) -> None:
    """Raise ``CannotRun`` when the two models' vocabularies differ: the same token ids then
    mean other tokens (or none: an id past the smaller table), so there is nothing to compare."""
    sizes = [getattr(m.text_config, "vocab_size", None) for m in (first, second)]
    if first is not second and all(isinstance(v, int) for v in sizes) and sizes[0] != sizes[1]:
        raise CannotRun(f"--model {first.name} and --against {second.name} have different vocabularies ({sizes[0]} "
                        f"and {sizes[1]} tokens): the same token ids are not the same input, so their outputs cannot "
                        "be compared", "compare a model with its own switched copy (enable_flash.py --save), or two "
                                       "backends of one model with --baseline and --candidate")


def compare_accuracy(o: AccuracyOptions, reporter: Any) -> StepResult:
    """Compare the outputs of two backends of one model, or of two model specs (for example
    a checkpoint and its switched copy from ``enable_flash.py --save``), on the same inputs,
    against the float64 eager run of the first (see the module docstring for the rule).

    Passes when the candidate is within tolerance. Raises ``CannotRun`` when it cannot run
    (an out-of-memory error included: there is nothing to compare then).
    """
    for name in (o.baseline, o.candidate):
        if name not in (None, "auto") and name not in BACKENDS:
            raise CannotRun(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}", "")
    env, device, dtype = resolve(o.device, o.dtype)
    for flag, name, instead in (("--baseline", o.baseline, "eager"), ("--candidate", o.candidate, "auto")):
        if name not in (None, "auto"):
            av = availability(name, env=env, device=device, dtype=dtype)
            if not av.available:
                raise CannotRun(f"{flag} {name} cannot run here: {av.reason}", f"use {flag} {instead}")
    kw = dict(device=device, dtype=o.dtype, batch_size=o.batch_size, seq_len=o.seq_len, pad_fraction=o.pad_fraction,
              trust_remote_code=o.trust_remote_code, reporter=reporter, env=env)
    first = open_session(o.model, **kw)
    second = open_session(o.against, **kw) if o.against else first
    _refuse_other_vocabulary(first.loaded, second.loaded)

    def pick(session, requested, default):
        name = requested or default or "eager"
        if name == "auto":
            return choose("auto", env=env, device=device, dtype=dtype, model=session.loaded.model).backend
        return name

    if o.against:
        baseline = pick(first, o.baseline, first.loaded.original_backend)
        candidate = pick(second, o.candidate, second.loaded.original_backend)
        labels = (f"{first.loaded.name}: {baseline}", f"{second.loaded.name}: {candidate}")
    else:
        baseline, candidate = pick(first, o.baseline, "eager"), pick(first, o.candidate, "auto")
        labels = (baseline, candidate)
    inputs = first.inputs
    acc = judge_outputs(first.loaded, second.loaded, inputs, baseline, candidate, labels, reporter, dtype,
                        o.sdpa_kernels)
    data = CompareAccuracyData(**first.fields(), against=o.against, baseline={"backend": baseline, "label": labels[0]},
                               candidate={"backend": candidate, "label": labels[1]},
                               sdpa_kernels_allowed=o.sdpa_kernels, accuracy=acc)
    check = Check("accuracy", acc.passed, acc.evidence())
    verdict = "outputs match" if acc.passed else "outputs differ"
    summary = f"{labels[0]} -> {labels[1]}: {verdict} ({acc.evidence().split(' vs ')[0]})"
    result = StepResult("compare_accuracy", "pass" if acc.passed else "fail", summary, [check], data,
                        f"{candidate} computes the same function within {dtype_name(dtype)} error" if acc.passed else
                        "do not keep this switch: compare at --dtype float32 to tell kernel error from precision, "
                        "and read data.accuracy")
    if o.write_report:
        write_run_folder(result, Path(o.report_dir) if o.report_dir else
                         default_run_folder("compare_accuracy", first.loaded.name))
    return result


#: How a result of this step is drawn (report.View): the accuracy figures.
VIEW = register_view("compare_accuracy", Sections((accuracy_part,)))
