"""The check_features step: the features a model uses, and whether the backend provides them.

``models.features.needed(loaded, inputs)`` reads the model's config and the batch; each
backend record says whether and how it provides each feature, with the source of the
statement (``Backend.features``). Where the backend can run here, the step proves it on
inputs that exercise the features (a padded batch longer than the window) with the
accuracy rule of ``measure.accuracy.compare``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import BACKENDS, FEATURES, availability, choose
from ..env import resolve
from ..measure.accuracy import Accuracy, judge_outputs
from ..models.features import needed
from ..report import (CannotRun, Check, Sections, StepResult, Table, accuracy_part, default_run_folder, register_view,
                      write_run_folder)
from .session import SessionData, open_session


@dataclass
class FeatureOptions:
    """What ``check_features.py`` takes (see its --help)."""

    model: str | None = None
    backend: str = "auto"
    batch_size: int = 2
    seq_len: int = 256
    pad_fraction: float | None = 0.25
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    report_dir: str | None = None
    write_report: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class CheckFeaturesData(SessionData):
    """``data`` of check_features: the session's fields, then ``backend`` (the one checked),
    ``needed`` (feature -> how the model uses it, from ``models.features.needed``),
    ``features`` (one row per feature of ``backends.FEATURES``: needed, the detail, supported,
    how, and the source of that statement) and ``accuracy`` (the backend's outputs against
    eager's, a ``measure.accuracy.Accuracy``; None when it did not run: a lacking feature, or
    a backend that cannot run here)."""

    backend: str = ""
    needed: dict[str, str] = field(default_factory=dict)
    features: list[dict[str, Any]] = field(default_factory=list)
    accuracy: Accuracy | None = None


def check_features(o: FeatureOptions, reporter: Any) -> StepResult:
    """The check_features step: fail when the backend lacks a feature the model needs,
    skip (with the reason) when the backend cannot run here, else pass or fail on the
    outputs of a batch that exercises the features. Raises ``CannotRun`` when it cannot
    start (see ``session.open_session``)."""
    if o.backend != "auto" and o.backend not in BACKENDS:
        raise CannotRun(f"unknown --backend {o.backend!r}; choose from auto, {', '.join(BACKENDS)}", "")
    env, device, dtype = resolve(o.device, o.dtype)
    session = open_session(o.model, device=device, dtype=o.dtype, batch_size=o.batch_size, seq_len=o.seq_len,
                           pad_fraction=o.pad_fraction, trust_remote_code=o.trust_remote_code, reporter=reporter,
                           env=env)
    loaded, inputs = session.loaded, session.inputs
    backend = choose("auto", env=env, device=device, dtype=dtype, model=loaded.model).backend \
        if o.backend == "auto" else o.backend
    uses = needed(loaded, inputs)
    record = BACKENDS[backend]
    table = [{"feature": f, "needed": f in uses, "detail": uses.get(f, ""), "supported": record.supports(f).supported,
              "how": record.supports(f).how, "source": record.supports(f).source} for f in FEATURES]
    data = CheckFeaturesData(**session.fields(), backend=backend, needed=uses, features=table)
    lacking = [row for row in table if row["needed"] and not row["supported"]]
    names = ", ".join(uses) or "none of the advanced features"
    can = availability(backend, env=env, device=device, dtype=dtype, model=loaded.model)
    checks = [Check("supported", not lacking,
                    f"{backend} lacks {', '.join(r['feature'] for r in lacking)}: " +
                    "; ".join(f"{r['how']} ({r['source']})" for r in lacking) if lacking else
                    f"{backend} provides every feature the model uses: {names}")]
    if lacking:
        result = StepResult("check_features", "fail", f"{backend} cannot run {loaded.name}: " + checks[0].evidence,
                            checks, data, "choose a backend that provides these features, e.g. --backend eager or "
                                          "flash_attention_2")
    elif not can.available:
        result = StepResult("check_features", "skip", f"{backend} provides {names} (by its documentation; sources in "
                                                      f"data.features), but it cannot run here to prove it: "
                                                      f"{can.reason}", checks, data,
                            f"run this step where {backend} can run to verify the outputs")
    else:
        acc = judge_outputs(loaded, loaded, inputs, "eager", backend, ("eager", backend), reporter, dtype)
        data.accuracy = acc
        checks.append(Check("accuracy", acc.passed, acc.evidence()))
        status = "pass" if acc.passed else "fail"
        summary = (f"{backend} on {loaded.name} with {names}: " +
                   ("outputs match eager" if acc.passed else "outputs differ from eager") +
                   f" ({acc.evidence().split(' vs ')[0]})")
        result = StepResult("check_features", status, summary, checks, data,
                            "benchmark it next with profile_attention.py" if acc.passed else
                            f"do not use {backend} for this model: read data.accuracy")
    if o.write_report:
        write_run_folder(result, Path(o.report_dir) if o.report_dir else default_run_folder("check_features",
                                                                                            loaded.name))
    return result


def _features_table(d: dict[str, Any]) -> list[Table]:
    if not d.get("features"):
        return []
    return [(f"features ({d.get('backend', '')})", ["feature", "model uses it", "backend provides it", "how", "source"],
             [[f["feature"], f["detail"] or "no", "yes" if f["supported"] else "NO", f["how"], f["source"]]
              for f in d["features"]])]


#: How a result of this step is drawn (report.View): every feature, and the accuracy figures.
VIEW = register_view("check_features", Sections((_features_table, accuracy_part)))
