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
5. run the float64 reference and judge accuracy (``measure.accuracy.judge``: the dtype rule,
   or the FP8 rule for a backend that computes attention in FP8, ``--backend fp8``);
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
from ..measure import autotune
from ..measure.flops import forward_flops, site_flops
from ..measure.timing import Measurement, forward_fn, is_oom, measure_backend, oom_message, train_fn
from ..measure.verdicts import comparison_summary, kernel_check, memory_check, speed_check
from ..measure.verify import module_timings, verify_sites
from ..models.features import needed
from ..report import (CannotRun, Check, Reporter, StepResult, default_run_folder, fmt_mb, fmt_ms, refuse_to_overwrite,
                      write_patch, write_run_folder)
from ..swap import switch
from ..swap.patch import patch_of
from .session import check_shape, open_session

STEP = "enable_flash"
#: How a user keeps a backend transformers does not ship (``Backend.hf`` False).
REGISTER_HINT = ("from attnkit.backends import BACKENDS; from attnkit.swap import registered; "
                 "registered.register(BACKENDS[{name!r}]); model.set_attn_implementation({name!r})")


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
    tune_compiled: bool | None = None  # None: time torch.compile candidates on CUDA only
    device_map: str | None = None  # --device-map: spread the model over devices (accelerate)
    max_memory: str | None = None  # --max-memory 0=10GiB,cpu=50GiB
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
    if o.device_map and o.device != "auto":
        raise CannotRun(f"--device {o.device} with --device-map: the map places the model", "use --max-memory to limit it")


def refuse_unsupported_masks(loaded: models.LoadedModel, inputs: models.Inputs, backend: str) -> None:
    """Raise ``CannotRun`` when this batch needs a mask ``backend``'s record says it lacks:
    padding, or a sliding window shorter than the sequence (``fp8`` takes neither)."""
    record = BACKENDS[backend]
    uses = needed(loaded, inputs)
    lacking = [f for f in ("padding", "sliding_window") if f in uses and "(not exercised" not in uses[f]
               and not record.supports(f).supported]
    if lacking:
        raise CannotRun(f"{backend} cannot run this batch: it needs " +
                        "; ".join(f"{f} ({uses[f]}), which {backend} lacks: {record.supports(f).how}" for f in lacking),
                        "use --pad-fraction 0 and a model without a sliding window, or --backend sdpa")


def _checks(base: Measurement, cand: Measurement, acc: acc_mod.Accuracy, model: Any, backend: str,
            trail: str, matrix_mb: float | None = None, sdpa_kernels: list[str] | None = None) -> list[Check]:
    one_kernel = sdpa_kernels[0] if backend == "sdpa" and sdpa_kernels and len(sdpa_kernels) == 1 else None
    checks = [Check("switch", switch.current(model) == backend, trail), kernel_check(base, cand, backend, one_kernel)]
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


def _dropout_in_use(loaded: models.LoadedModel, inputs: models.Inputs) -> str:
    """What attention dropout a transformers model applies in training ('' when none), from
    its config. Hand-written sites need no refusal: their FlashAttention-4 call falls back
    to SDPA, with the dropout, whenever its probability is not 0."""
    return needed(loaded, inputs).get("dropout", "")


def _refuse_without_dropout(backend: str, o: EnableOptions, dropout: str) -> None:
    """``--train`` with a backend that has no attention dropout would train another model:
    raise ``CannotRun`` instead of changing the semantics (transformers' FA4 path drops the
    dropout without an error at forward time)."""
    if o.train and dropout and not BACKENDS[backend].supports("dropout").supported:
        raise CannotRun(f"--backend {backend} with --train: the model uses attention dropout ({dropout}), which "
                        f"{backend} does not have ({BACKENDS[backend].supports('dropout').how})",
                        "use --backend sdpa or flash_attention_2 for training, or set the attention dropout to 0")


def _gate_outputs(loaded: models.LoadedModel, inputs: models.Inputs, notes: list[str]):
    """The eager output, its float64 reference and the reference's name, for the autotuner's
    accuracy gate, with dropout off (training mode included); (None, None, name) with a note
    when either runs out of memory: the candidates are then timed but not gated."""
    with acc_mod.dropout_off(loaded.model):
        try:
            switch.apply(loaded.model, "eager")
            out = forward_fn(loaded, inputs)()
            ref, name = acc_mod.reference(loaded, inputs, "eager")
        except Exception as exc:
            if not is_oom(exc):
                raise
            notes.append(f"the accuracy gate's eager run or float64 reference ran out of memory ({oom_message(exc)}): "
                         "autotune candidates were timed but not gated on accuracy")
            return None, None, "float64 eager"
    return out, ref, name


def _tuned_rejections(cands: list[autotune.Candidate], best: autotune.Candidate | None,
                      baseline: str) -> list[dict[str, Any]]:
    """``data.rejected`` from the measurements: for each backend not chosen, its best
    candidate's figures or why it did not run."""
    out = []
    for name in dict.fromkeys(c.backend for c in cands):
        if best is not None and name == best.backend or name == baseline:
            continue
        rows = [c for c in cands if c.backend == name]
        timed = sorted((c for c in rows if c.status == "passed"), key=lambda c: c.latency_ms)
        if timed and best is not None:
            fastest = timed[0]
            reason = (f"measured slower: {fastest.label} {fastest.latency_ms:.3f} ms vs {best.label} "
                      f"{best.latency_ms:.3f} ms")
        else:
            reason = "; ".join(f"{c.label}: {c.status}, {c.reason}" for c in rows)
        out.append({"backend": name, "available": any(c.status not in ("skipped",) for c in rows), "reason": reason})
    return out


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
    for name in {o.baseline, o.backend} - {"auto"}:  # fail before loading anything
        if name not in BACKENDS:
            raise CannotRun(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}", "")
        if o.train and not BACKENDS[name].backward:
            raise CannotRun(f"--train needs a backward pass and {name} has none: it is forward only "
                            f"({BACKENDS[name].description})", f"drop --train: {name} is for inference; train with "
                                                                "--backend sdpa")
    if o.save and o.backend in BACKENDS and not BACKENDS[o.backend].hf:
        raise CannotRun(f"--save would record attn_implementation={o.backend!r} in config.json, a name transformers "
                        f"does not ship, so from_pretrained could not load the copy",
                        f"drop --save; switch at run time instead: {REGISTER_HINT.format(name=o.backend)}")
    env, device, dtype = resolve(o.device, o.dtype)
    if o.backend != "auto":
        choose(o.backend, env=env, device=device, dtype=dtype)
    base_av = availability(o.baseline, env=env, device=device, dtype=dtype)
    if not base_av.available:
        raise CannotRun(f"--baseline {o.baseline} cannot run here: {base_av.reason}", "use --baseline eager")
    session = open_session(o.model, device=device, dtype=o.dtype, batch_size=o.batch_size, seq_len=o.seq_len,
                           pad_fraction=o.pad_fraction, trust_remote_code=o.trust_remote_code, baseline=o.baseline,
                           reporter=reporter, env=env, train=o.train, device_map=o.device_map,
                           max_memory=o.max_memory)
    loaded, inputs, notes = session.loaded, session.inputs, session.notes
    seq_len = inputs.seq_len
    choice = choose(o.backend, env=env, device=device, dtype=dtype, model=loaded.model)
    refuse_unsupported_masks(loaded, inputs, choice.backend)
    tuning = o.backend == "auto"
    swapper, flops, patch = session.swapper, None, ""
    dropout = _dropout_in_use(loaded, inputs)
    if not tuning:
        _refuse_without_dropout(choice.backend, o, dropout)
    if swapper is not None:
        if not tuning and choice.backend != swapper.target:
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
        "sdpa_kernels_allowed": o.sdpa_kernels, "report_dir": None, "saved_to": None, "autotune": None,
        "mode": "forward+backward (training)" if o.train else "forward (inference)",
    })
    if swapper is not None:
        biggest = max((d[0] * d[1] * d[2] for _, d in calls if len(d) == 4), default=0)
        data.update({"sites": [s.to_dict() for s in swapper.sites.values()], "patch": patch, "patch_file": None,
                     "attention_matrix_mb": biggest * dtype.itemsize / 2**20, "attention_modules": None,
                     "sites_swapped": sum(s.status == "swapped" for s in swapper.sites.values())})
    base = cand = None
    base_out = cand_out = ref = None
    backend, cand_kernels = choice.backend, o.sdpa_kernels
    ref_name = "float64 eager"
    stage = ""
    interrupted = False
    try:
        stage = f"measuring the baseline, {o.baseline}"
        with reporter.stage(stage):
            base, base_out = measure_backend(loaded, inputs, o.baseline, min_run_time=o.min_run_time,
                                             sdpa_kernels=o.sdpa_kernels, train=o.train, flops=flops)
        data["baseline"] = base.to_dict()
        if tuning:
            stage = "computing the float64 reference for the autotuner's accuracy gate"
            with reporter.stage(stage):
                if base.error:
                    notes.append(f"the baseline could not run ({base.error}): autotune candidates were timed but "
                                 "not gated on accuracy")
                    gate_out, ref = None, None
                else:
                    gate_out, ref, ref_name = _gate_outputs(loaded, inputs, notes)
            cands = autotune.candidates(env, device, dtype, loaded.model, compiled=o.tune_compiled)
            for c in cands:
                if c.status != "pending":
                    continue
                if swapper is not None and c.backend != swapper.target:
                    c.status, c.reason = "skipped", (f"hand-written attention is swapped to {swapper.target}; pass "
                                                     f"--backend {c.backend} to swap it to {c.backend} instead")
                elif c.kernel and o.sdpa_kernels and c.kernel not in o.sdpa_kernels:
                    c.status, c.reason = "skipped", f"not among --sdpa-kernel {','.join(o.sdpa_kernels)}"
                elif o.train and dropout and not BACKENDS[c.backend].supports("dropout").supported:
                    c.status, c.reason = "skipped", f"the model uses attention dropout ({dropout}); {c.backend} has none"
            stage = "autotune: timing every candidate"
            autotune.tune_model(loaded, inputs, cands, baseline_out=gate_out, reference=ref, dtype=dtype,
                                min_run_time=min(o.min_run_time, 0.5), train=o.train, flops=flops,
                                progress=reporter.stage)
            best = autotune.chosen(cands)
            data["autotune"] = autotune.summary_dict(cands, best, mode=data["mode"],
                                                     min_run_time=min(o.min_run_time, 0.5), dtype=dtype)
            data["rejected"] = _tuned_rejections(cands, best, o.baseline) + [
                {"backend": o.baseline, "available": True, "reason": "the baseline this run measures against"}]
            if best is not None:
                backend, cand_kernels = best.backend, best.sdpa_kernels or o.sdpa_kernels
                data["chosen"], data["chosen_because"] = backend, autotune.explain(best, cands)
                data["sdpa_kernels_allowed"] = cand_kernels
            else:
                notes.append(f"no autotune candidate passed the accuracy gate; measuring {backend} (the static choice)")
            if o.train:
                ref = None  # the training check below runs its own float64 forward + backward
        stage = f"measuring the candidate, {backend}"
        with reporter.stage(stage):
            cand, cand_out = measure_backend(loaded, inputs, backend, min_run_time=o.min_run_time,
                                             sdpa_kernels=cand_kernels, train=o.train, flops=flops)
        data["candidate"] = cand.to_dict()
        if swapper is not None and not cand.error:
            stage = "timing each attention module alone"
            with reporter.stage(stage):
                timings = module_timings(swapper, max(0.05, o.min_run_time / 2))
                swapper.apply(backend)
            before, after = sum(t["eager_ms"] for t in timings), sum(t["swapped_ms"] for t in timings)
            data["attention_modules"] = {"per_module": timings, "eager_ms": before, "swapped_ms": after,
                                         "speedup": before / after if after else None}
        if base_out is not None and cand_out is not None and ref is None:
            stage = "computing the float64 reference"
            with reporter.stage(stage):
                try:
                    if o.train:
                        train_acc, gradients = _train_accuracy(loaded, inputs, backend, dtype, cand_kernels)
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
    elif ref is not None and cand_out is not None and base_out is not None:
        with reporter.stage("judging accuracy" + (" by the FP8 rule, each layer on its own inputs"
                                                  if BACKENDS[backend].precision else "")):
            accuracy = acc_mod.judge(backend, cand_out, base_out, ref, valid=inputs.valid, dtype=dtype,
                                     language_model=lm, loaded=loaded, inputs=inputs, reference_name=ref_name)
    elif base is not None and base.error:
        accuracy = acc_mod.not_compared(f"not compared: the baseline {o.baseline} could not run ({base.error})",
                                        inputs.padding_positions)
    elif cand is not None and cand.error:
        accuracy = acc_mod.not_compared(f"not compared: {backend} could not run ({cand.error})",
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
    arrow = f"{o.baseline} -> {backend}"
    if interrupted:
        kept = ", ".join(k for k in ("baseline", "candidate") if data.get(k)) or "nothing"
        result = StepResult(STEP, "error", f"interrupted (Ctrl-C) while {stage}; measured so far: {kept}", [], data,
                            "rerun to finish; the run folder holds what was measured")
    elif base is not None and base.error:
        cand_text = (f"{backend} ran: {fmt_ms(cand.latency_ms)}, {fmt_mb(cand.peak_memory_mb)} peak"
                     if cand and not cand.error else f"{backend}: {cand.error if cand else 'not run'}")
        result = StepResult(STEP, "error", f"baseline {o.baseline} could not run at batch {o.batch_size}, "
                                           f"seq_len {seq_len}: {base.error}; {cand_text}; accuracy not compared",
                            [], data, "the candidate runs where the baseline cannot; to compare accuracy, rerun with a "
                                      "smaller --batch-size or --seq-len")
    else:
        checks = _checks(base, cand, accuracy, loaded.model, backend, trail, data.get("attention_matrix_mb"),
                         cand_kernels)
        if data.get("gradients") is not None:
            checks.append(Check("gradients", data["gradients"]["passed"], data["gradients"]["evidence"]))
        failed = [c for c in checks if not c.passed]
        if not failed:
            summary = (f"{arrow}: {comparison_summary(base, cand)}, "
                       f"outputs match ({accuracy.evidence().split(' vs ')[0]})")
            nxt = (f"keep {backend}: load the model with attn_implementation=\"{backend}\""
                   + ("" if o.save else ", or rerun with --save DIR to write the switched model"))
            if not BACKENDS[backend].hf:
                nxt = (f"keep {backend} for inference (forward only): with scripts/ on sys.path, "
                       + REGISTER_HINT.format(name=backend))
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
                data["saved_to"] = str(_save(loaded, backend, Path(o.save).expanduser()))
            result.next = f"saved to {data['saved_to']}: from_pretrained() loads it with {backend}"
        elif o.save:
            notes.append(f"--save {o.save}: nothing written, because a check failed")
    write_patch(result, patch, o.write_patch)
    if o.write_report:
        write_run_folder(result, Path(o.report_dir) if o.report_dir else default_run_folder(STEP, loaded.name),
                         {"swap.patch": patch})
    return result
