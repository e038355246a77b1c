"""The main job: choose a backend, switch the model to it, prove it in this run, report.

``enable_flash(options, reporter)`` is what ``scripts/enable_flash.py`` calls:

1. load the model spec (``models.load``) and note its current attention implementation;
2. run one small forward pass under the profiler to find its attention
   (``session.locate_attention``; no attention, or attention with no switch, stops here
   with a clear reason), and swap and verify hand-written attention (``measure.verify``);
3. choose the backend (``backends.choose``: ``auto`` or forced), with a reason for every
   backend not taken;
4. measure the baseline (eager) and the candidate on the same inputs
   (``measure.timing.measure_backend``): kernels that ran, peak memory, median latency;
5. run the float64 reference and judge accuracy (``measure.accuracy.compare``);
6. write report.json / report.md / report.png, and ``--save`` the switched model only when
   every check passed.

Exit status (through ``StepResult.status``): ``pass`` when the switch is verified
(fused kernel ran, faster, no more memory, outputs within tolerance), ``fail`` when a
check fails, ``error`` when the step could not run, when the baseline ran out of memory
(the candidate is still measured and reported) or on Ctrl-C (what was measured is kept).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import models
from ..backends import BACKENDS, availability, choose
from ..env import resolve
from ..measure import accuracy as acc_mod
from ..measure.flops import forward_flops, site_flops
from ..measure.timing import Measurement, forward_fn, is_oom, measure_backend, oom_message, train_fn
from ..measure.verdicts import comparison_summary, kernel_check, memory_check, speed_check
from ..measure.verify import module_timings, verify_sites
from ..report import (CannotRun, Check, Reporter, StepResult, default_run_folder, fmt_mb, fmt_ms, refuse_to_overwrite,
                      write_patch, write_run_folder)
from ..swap import switch
from ..swap.patch import patch_of
from .session import check_shape, open_session

STEP = "enable_flash"


@dataclass
class EnableOptions:
    """What ``enable_flash.py`` takes; the defaults are its defaults (see its --help)."""

    model: str | None = None
    backend: str = "auto"
    baseline: str = "eager"
    batch_size: int = 1
    seq_len: int = 1024
    pad_fraction: float | None = None
    dtype: str = "auto"
    device: str = "auto"
    min_run_time: float = 1.0
    sdpa_kernels: list[str] | None = None
    report_dir: str | None = None
    write_report: bool = True
    save: str | None = None
    trust_remote_code: bool = False
    train: bool = False
    write_patch: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def validate(o: EnableOptions) -> None:
    """Reject bad numbers and an unsafe --save folder before any work. Raises ``CannotRun``."""
    check_shape(o.batch_size, o.seq_len, o.pad_fraction)
    if o.min_run_time <= 0:
        raise CannotRun(f"--min-run-time must be positive, not {o.min_run_time}", "")
    if o.save:
        path = Path(o.save).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise CannotRun(f"--save {o.save} already exists and is not an empty folder; nothing was written",
                            "pass a new folder: the job never overwrites your files")
    refuse_to_overwrite(o.write_patch, "--write-patch")


def _checks(base: Measurement, cand: Measurement, acc: acc_mod.Accuracy, model: Any, backend: str,
            trail: str, matrix_mb: float | None = None) -> list[Check]:
    checks = [Check("switch", switch.current(model) == backend, trail), kernel_check(base, cand, backend)]
    if cand.error:
        return checks + [Check("runs", False, f"{backend}: {cand.error}"), Check("accuracy", False, acc.evidence())]
    checks.append(speed_check(base, cand))
    mem = memory_check(base, cand, matrix_mb)
    return checks + ([mem] if mem else []) + [Check("accuracy", acc.passed, acc.evidence())]


def _train_accuracy(loaded, inputs, backend: str, dtype, sdpa_kernels) -> tuple[acc_mod.Accuracy, dict]:
    """Training mode: outputs and every gradient of one forward + backward pass, baseline
    (eager) and candidate against float64, with dropout set to 0 so the passes compare."""
    runs = {}
    with acc_mod.dropout_off(loaded.model):
        for name in ("eager", backend):
            switch.apply(loaded.model, name)
            runs[name] = train_fn(loaded, inputs, sdpa_kernels)()
        switch.apply(loaded.model, backend)
        ref_out, ref_grads = acc_mod.reference_train(loaded, inputs)  # leaves no gradients behind
    (base_out, base_grads), (cand_out, cand_grads) = runs["eager"], runs[backend]
    accuracy = acc_mod.compare(cand_out, base_out, ref_out, valid=inputs.valid, dtype=dtype,
                               language_model=loaded.family == "causal-lm")
    return accuracy, acc_mod.compare_gradients(cand_grads, base_grads, ref_grads, dtype)


NEXT_FAIL = {
    "switch": "the model did not switch; see the switch check's evidence",
    "kernels": "the expected fused kernel did not run: read data.candidate.kernels, and run check_env.py to see "
               "which SDPA kernels can run here",
    "runs": "the candidate ran out of memory at this shape: lower --batch-size or --seq-len",
    "speed": "the candidate is not faster at this shape; attention's share of the time grows with the sequence: "
             "try a longer --seq-len, or profile_attention.py to see where the time goes",
    "memory": "the candidate used more peak memory; read data.candidate.kernels to see which kernel ran",
    "accuracy": "outputs differ beyond the baseline's own error: do not keep this switch; rerun compare_accuracy.py "
                "with --dtype float32 to separate kernel error from precision",
}


def _save(loaded: models.LoadedModel, backend: str, folder: Path) -> Path:
    """save_pretrained into ``folder`` with ``attn_implementation`` recorded in config.json."""
    loaded.model.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["attn_implementation"] = backend  # from_pretrained reads it back as the implementation
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    return folder


def enable_flash(o: EnableOptions, reporter: Reporter) -> StepResult:
    """Run the main job (see the module docstring). Raises ``CannotRun`` when it cannot
    start; once measuring has begun, problems are reported in the returned result."""
    validate(o)
    env, device, dtype = resolve(o.device, o.dtype)
    for name in {o.baseline, o.backend} - {"auto"}:  # fail before loading anything
        if name not in BACKENDS:
            raise CannotRun(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}", "")
    if o.backend != "auto":
        choose(o.backend, env=env, device=device, dtype=dtype)
    base_av = availability(o.baseline, env=env, device=device, dtype=dtype)
    if not base_av.available:
        raise CannotRun(f"--baseline {o.baseline} cannot run here: {base_av.reason}", "use --baseline eager")
    session = open_session(o.model, device=device, dtype=o.dtype, batch_size=o.batch_size, seq_len=o.seq_len,
                           pad_fraction=o.pad_fraction, trust_remote_code=o.trust_remote_code, baseline=o.baseline,
                           reporter=reporter, env=env, train=o.train)
    loaded, inputs, notes = session.loaded, session.inputs, session.notes
    seq_len = inputs.seq_len
    choice = choose(o.backend, env=env, device=device, dtype=dtype, model=loaded.model)
    swapper, flops, patch = session.swapper, None, ""
    if swapper is not None:
        if choice.backend != swapper.target:
            with reporter.stage(f"swapping hand-written attention for {choice.backend} and verifying each site"):
                verify_sites(swapper, loaded, loaded.probe(), dtype, choice.backend)
            swapper.require_swapped()
        with reporter.stage(f"recording the attention calls at batch {o.batch_size}, seq_len {seq_len}"):
            calls = swapper.capture(forward_fn(loaded, inputs))
        flops = forward_flops(loaded.model, inputs.batch_size, inputs.seq_len, None, o.train,
                              site_flops(calls))
        patch = patch_of(swapper)

    data: dict[str, Any] = session.data()
    data.update({
        "baseline": None, "candidate": None, "speedup": None, "memory_ratio": None, "accuracy": None,
        "chosen": choice.backend, "chosen_because": choice.why,
        "rejected": [r.to_dict() for r in choice.rejected if r.backend != o.baseline]
                    + [{"backend": o.baseline, "available": True, "reason": "the baseline this run measures against"}],
        "sdpa_kernels_allowed": o.sdpa_kernels, "report_dir": None, "saved_to": None,
        "mode": "forward+backward (training)" if o.train else "forward (inference)",
    })
    if swapper is not None:
        biggest = max((d[0] * d[1] * d[2] for _, d in calls if len(d) == 4), default=0)
        data.update({"sites": [s.to_dict() for s in swapper.sites.values()], "patch": patch, "patch_file": None,
                     "attention_matrix_mb": biggest * dtype.itemsize / 2**20, "attention_modules": None,
                     "sites_swapped": sum(s.status == "swapped" for s in swapper.sites.values())})
    base = cand = None
    base_out = cand_out = ref = None
    ref_name = "float64 eager"
    stage = ""
    interrupted = False
    try:
        stage = f"measuring the baseline, {o.baseline}"
        with reporter.stage(stage):
            base, base_out = measure_backend(loaded, inputs, o.baseline, min_run_time=o.min_run_time,
                                             sdpa_kernels=o.sdpa_kernels, train=o.train, flops=flops)
        data["baseline"] = base.to_dict()
        stage = f"measuring the candidate, {choice.backend}"
        with reporter.stage(stage):
            cand, cand_out = measure_backend(loaded, inputs, choice.backend, min_run_time=o.min_run_time,
                                             sdpa_kernels=o.sdpa_kernels, train=o.train, flops=flops)
        data["candidate"] = cand.to_dict()
        if swapper is not None and not cand.error:
            stage = "timing each attention module alone"
            with reporter.stage(stage):
                timings = module_timings(swapper, max(0.05, o.min_run_time / 2))
                swapper.apply(choice.backend)
            before, after = sum(t["eager_ms"] for t in timings), sum(t["swapped_ms"] for t in timings)
            data["attention_modules"] = {"per_module": timings, "eager_ms": before, "swapped_ms": after,
                                         "speedup": before / after if after else None}
        if base_out is not None and cand_out is not None:
            stage = "computing the float64 reference"
            with reporter.stage(stage):
                try:
                    if o.train:
                        train_acc, gradients = _train_accuracy(loaded, inputs, choice.backend, dtype, o.sdpa_kernels)
                        data["gradients"] = gradients
                    else:
                        ref, ref_name = acc_mod.reference(loaded, inputs, "eager")
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    notes.append(f"the float64 reference ran out of memory ({oom_message(exc)})")
    except KeyboardInterrupt:
        interrupted = True

    lm = loaded.family == "causal-lm"
    if o.train and data.get("gradients") is not None:
        accuracy = train_acc
    elif ref is not None:
        accuracy = acc_mod.compare(cand_out, base_out, ref, valid=inputs.valid, dtype=dtype, language_model=lm,
                                   reference_name=ref_name)
    elif base is not None and base.error:
        accuracy = acc_mod.not_compared(f"not compared: the baseline {o.baseline} could not run ({base.error})",
                                        inputs.padding_positions)
    elif cand is not None and cand.error:
        accuracy = acc_mod.not_compared(f"not compared: {choice.backend} could not run ({cand.error})",
                                        inputs.padding_positions)
    else:
        accuracy = acc_mod.not_compared("not compared: " + (notes[-1] if notes else "interrupted"),
                                        inputs.padding_positions)
    data["accuracy"] = accuracy.to_dict()
    if base and cand and base.latency_ms and cand.latency_ms:
        data["speedup"] = base.latency_ms / cand.latency_ms
    if base and cand and base.peak_memory_mb and cand.peak_memory_mb:
        data["memory_ratio"] = base.peak_memory_mb / cand.peak_memory_mb

    trail = f"config._attn_implementation: {loaded.original_backend} (as loaded) -> {o.baseline} (baseline) -> " \
            f"{switch.current(loaded.model)}"
    if swapper is not None:
        trail = (f"hand-written attention: {data['sites_swapped']} of {len(swapper.sites)} sites swapped to "
                 f"{switch.current(loaded.model)} at run time ({', '.join(sorted({s.function for s in swapper.sites.values() if s.status == 'swapped'}))})")
    arrow = f"{o.baseline} -> {choice.backend}"
    if interrupted:
        kept = ", ".join(k for k in ("baseline", "candidate") if data.get(k)) or "nothing"
        result = StepResult(STEP, "error", f"interrupted (Ctrl-C) while {stage}; measured so far: {kept}", [], data,
                            "rerun to finish; the run folder holds what was measured")
    elif base is not None and base.error:
        cand_text = (f"{choice.backend} ran: {fmt_ms(cand.latency_ms)}, {fmt_mb(cand.peak_memory_mb)} peak"
                     if cand and not cand.error else f"{choice.backend}: {cand.error if cand else 'not run'}")
        result = StepResult(STEP, "error", f"baseline {o.baseline} could not run at batch {o.batch_size}, "
                                           f"seq_len {seq_len}: {base.error}; {cand_text}; accuracy not compared",
                            [], data, "the candidate runs where the baseline cannot; to compare accuracy, rerun with a "
                                      "smaller --batch-size or --seq-len")
    else:
        checks = _checks(base, cand, accuracy, loaded.model, choice.backend, trail, data.get("attention_matrix_mb"))
        if data.get("gradients") is not None:
            checks.append(Check("gradients", data["gradients"]["passed"], data["gradients"]["evidence"]))
        failed = [c for c in checks if not c.passed]
        if not failed:
            summary = (f"{arrow}: {comparison_summary(base, cand)}, "
                       f"outputs match ({accuracy.evidence().split(' vs ')[0]})")
            nxt = (f"keep {choice.backend}: load the model with attn_implementation=\"{choice.backend}\""
                   + ("" if o.save else ", or rerun with --save DIR to write the switched model"))
            if swapper is not None:
                nxt = ("make the swap permanent: review and apply the source change (git apply), written to "
                       + (o.write_patch or "swap.patch in the run folder; --write-patch FILE writes it elsewhere"))
        else:
            summary = f"{arrow}: " + "; ".join(f"{c.name} failed ({c.evidence})" for c in failed)
            nxt = " ".join(NEXT_FAIL[c.name] for c in failed)
        result = StepResult(STEP, "fail" if failed else "pass", summary, checks, data, nxt)
        if o.save and swapper is not None:
            notes.append("--save: nothing written for a model without a transformers switch; the permanent change "
                         "is the source patch")
        elif o.save and result.status == "pass":
            with reporter.stage(f"saving the switched model to {o.save}"):
                data["saved_to"] = str(_save(loaded, choice.backend, Path(o.save).expanduser()))
            result.next = f"saved to {data['saved_to']}: from_pretrained() loads it with {choice.backend}"
        elif o.save:
            notes.append(f"--save {o.save}: nothing written, because a check failed")
    write_patch(result, patch, o.write_patch)
    if o.write_report:
        write_run_folder(result, Path(o.report_dir) if o.report_dir else default_run_folder(STEP, loaded.name),
                         {"swap.patch": patch})
    return result
