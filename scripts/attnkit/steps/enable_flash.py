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
from typing import Any, ClassVar

from .. import models
from ..backends import BACKENDS, availability, choose
from ..backends.choice import Choice
from ..env import resolve
from ..measure import accuracy as acc_mod
from ..measure import autotune
from ..measure.flops import forward_flops, site_flops
from ..measure.timing import Measurement, forward_fn, is_oom, measure_backend, oom_caught, time_paired, train_fn
from ..measure.verdicts import comparison_summary, kernel_check, memory_check, speed_check
from ..measure.verify import module_timings, ran_new_call, verify_sites
from ..models.features import needed
from ..report import (CannotRun, Check, Reporter, Sections, StepResult, accuracy_part, autotune_part, check_new_folder,
                      default_run_folder, fmt_kernels, fmt_mb, measured, measured_figure, refuse_to_overwrite,
                      one_line, register_view, rejected_part, write_patch, write_run_folder)
from ..swap import switch
from ..swap.patch import patch_of, patch_root, patched_files
from .session import Session, SessionData, check_shape, open_session

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
    if not 0 < o.min_run_time < float("inf"):  # NaN and inf never end a timing loop
        raise CannotRun(f"--min-run-time must be positive, not {o.min_run_time}", "")
    if o.save:
        check_new_folder(o.save, "--save")
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
    """save_pretrained into ``folder`` with ``attn_implementation`` recorded in config.json.
    The one switch without a way back: the saved model is meant to keep ``backend``."""
    switch.apply(loaded.model, backend)
    loaded.model.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["attn_implementation"] = backend  # from_pretrained reads it back as the implementation
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- stage 1: before measuring

@dataclass
class Prepared:
    """What the run measures, settled before any timing: the session (model, inputs, notes),
    the static backend choice, the attention dropout in use, and for hand-written attention
    the recorded calls, their FLOPs and the source patch."""

    session: Session
    choice: Choice
    dropout: str
    flops: float | None = None
    patch: str = ""
    calls: list = field(default_factory=list)

    @property
    def loaded(self) -> models.LoadedModel:
        return self.session.loaded

    @property
    def inputs(self) -> models.Inputs:
        return self.session.inputs

    @property
    def notes(self) -> list[str]:
        return self.session.notes

    @property
    def swapper(self) -> Any:
        return self.session.swapper


def _refuse_early(o: EnableOptions) -> None:
    """Every refusal that needs no model: bad numbers, an unknown or forward-only backend with
    --train, --save of a backend transformers does not ship. Raises ``CannotRun``."""
    validate(o)
    for name in {o.baseline, o.backend} - {"auto"}:
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


def _prepare(o: EnableOptions, reporter: Reporter) -> Prepared:
    """Resolve device and dtype, refuse what cannot run here, open the session (load, locate,
    verify hand-written swaps, inputs) and choose the static backend. Raises ``CannotRun``."""
    _refuse_early(o)
    env, device, dtype = resolve(o.device, o.dtype)
    if o.backend != "auto":
        choose(o.backend, env=env, device=device, dtype=dtype, train=o.train)
    base_av = availability(o.baseline, env=env, device=device, dtype=dtype, train=o.train)
    if not base_av.available:
        raise CannotRun(f"--baseline {o.baseline} cannot run here: {base_av.reason}", "use --baseline eager")
    session = open_session(o.model, device=device, dtype=o.dtype, batch_size=o.batch_size, seq_len=o.seq_len,
                           pad_fraction=o.pad_fraction, trust_remote_code=o.trust_remote_code, baseline=o.baseline,
                           reporter=reporter, env=env, train=o.train, device_map=o.device_map,
                           max_memory=o.max_memory, target="flex_attention" if o.backend == "flex_attention" else "sdpa",
                           alternative="flex_attention" if o.backend == "auto" and (
                               device.startswith("cuda") if o.tune_compiled is None else o.tune_compiled) and
                           availability("flex_attention", env=env, device=device, dtype=dtype,
                                        train=o.train).available else None)
    choice = choose(o.backend, env=env, device=device, dtype=dtype, model=session.loaded.model, train=o.train)
    refuse_unsupported_masks(session.loaded, session.inputs, choice.backend)
    prep = Prepared(session, choice, _dropout_in_use(session.loaded, session.inputs))
    if o.backend != "auto":
        _refuse_without_dropout(choice.backend, o, prep.dropout)
    if prep.swapper is not None:
        _prepare_swaps(prep, o, reporter)
    return prep


def _prepare_swaps(prep: Prepared, o: EnableOptions, reporter: Reporter) -> None:
    """Hand-written attention: verify the swaps for a forced backend other than the one the
    session verified, record the attention calls at the measured shape, count their FLOPs
    (``site_flops``) and write the source patch."""
    swapper, loaded, inputs = prep.swapper, prep.loaded, prep.inputs
    if o.backend != "auto" and prep.choice.backend != swapper.target:
        with reporter.stage(f"swapping hand-written attention for {prep.choice.backend} and verifying each site"):
            verify_sites(swapper, loaded, loaded.probe(), prep.session.dtype, prep.choice.backend)
        swapper.require_swapped()
    with reporter.stage(f"recording the attention calls at batch {o.batch_size}, seq_len {inputs.seq_len}"):
        try:
            prep.calls = swapper.capture(forward_fn(loaded, inputs))
        except Exception as exc:  # the model's own forward at this shape (a mask buffer shorter than S)
            if is_oom(exc):
                raise
            raise CannotRun(f"a forward pass of {loaded.spec} at batch {o.batch_size}, seq_len {inputs.seq_len} raised "
                            f"{type(exc).__name__}: {one_line(exc, 200)}", "the model may not take this length: "
                            "try a smaller --seq-len") from None
    prep.flops = forward_flops(loaded.model, inputs.batch_size, inputs.seq_len, None, o.train, site_flops(prep.calls))
    prep.patch = patch_of(swapper)


# ----------------------------------------------------------------------------- stage 2: measuring

@dataclass
class Measured:
    """What the measuring stages found; None where a stage did not run (out of memory,
    Ctrl-C). ``backend`` and ``cand_kernels`` are the candidate finally measured (the
    autotuner's choice under ``--backend auto``)."""

    backend: str
    cand_kernels: list[str] | None
    base: Measurement | None = None
    cand: Measurement | None = None
    base_out: Any = None
    cand_out: Any = None
    ref: Any = None
    ref_name: str = "float64 eager"
    train_accuracy: acc_mod.Accuracy | None = None
    gradients: dict[str, Any] | None = None
    autotune: dict[str, Any] | None = None
    rejected: list[dict[str, Any]] | None = None
    chosen_because: str | None = None
    modules: dict[str, Any] | None = None
    stage: str = ""
    interrupted: bool = False


def _measure(prep: Prepared, o: EnableOptions, reporter: Reporter) -> Measured:
    """Every measuring stage in order; Ctrl-C keeps what was measured (``interrupted``).
    Every run is inside ``switch.using``: the model keeps the backend it was loaded with."""
    m = Measured(prep.choice.backend, o.sdpa_kernels)
    try:
        _measure_stages(prep, o, reporter, m)
    except KeyboardInterrupt:
        m.interrupted = True
    return m


def _stage(m: Measured, reporter: Reporter, text: str):
    m.stage = text
    return reporter.stage(text)


def _measure_stages(prep: Prepared, o: EnableOptions, reporter: Reporter, m: Measured) -> None:
    loaded, inputs = prep.loaded, prep.inputs
    with _stage(m, reporter, f"measuring the baseline, {o.baseline}"):
        m.base, m.base_out = measure_backend(loaded, inputs, o.baseline, min_run_time=o.min_run_time,
                                             sdpa_kernels=o.sdpa_kernels, train=o.train, flops=prep.flops, timed=False)
    if o.backend == "auto":
        _tune(prep, o, reporter, m)
    with _stage(m, reporter, f"measuring the candidate, {m.backend}"):
        m.cand, m.cand_out = measure_backend(loaded, inputs, m.backend, min_run_time=o.min_run_time,
                                             sdpa_kernels=m.cand_kernels, train=o.train, flops=prep.flops, timed=False)
    compiles = BACKENDS[m.backend].compiles
    if compiles and m.base is not None and m.cand.first_call_s is not None and m.base.first_call_s is not None:
        prep.notes.append(f"{m.backend}'s first call took {m.cand.first_call_s:.2f} s against {o.baseline}'s "
                          f"{m.base.first_call_s:.2f} s ({compiles}): paid once per shape, not in the timings")
    # both sides timed against each other; a side that could not run leaves the other timed alone
    sides = [(loaded, inputs, name, kernels, mm) for name, kernels, mm in
             ((o.baseline, o.sdpa_kernels, m.base), (m.backend, m.cand_kernels, m.cand)) if not mm.error]
    if sides:
        names = " and ".join(side[2] for side in sides)
        with _stage(m, reporter, f"timing {names} in interleaved rounds" if len(sides) > 1 else f"timing {names}"):
            with oom_caught() as oom:
                time_paired(sides, o.min_run_time, train=o.train)
            if oom:
                prep.notes.append(f"the interleaved timing ran out of memory ({oom.message}): no speed figure")
    if prep.swapper is not None and not m.cand.error:
        with _stage(m, reporter, "timing each attention module alone"):
            m.modules = _module_speed(prep.swapper, o)
    if m.base_out is not None and m.cand_out is not None and m.ref is None:
        with _stage(m, reporter, "computing the float64 reference"):
            _reference(prep, o, m)


def _module_speed(swapper: Any, o: EnableOptions) -> dict[str, Any]:
    """``data.attention_modules``: each swapped module alone, eager vs swapped (ms)."""
    timings = module_timings(swapper, max(0.05, o.min_run_time / 2))
    before, after = sum(t["eager_ms"] for t in timings), sum(t["swapped_ms"] for t in timings)
    return {"per_module": timings, "eager_ms": before, "swapped_ms": after, "speedup": before / after if after else None}


def _reference(prep: Prepared, o: EnableOptions, m: Measured) -> None:
    """The float64 reference (or, with --train, the gradients' check); out of memory is a note."""
    with oom_caught() as oom:
        if o.train:
            m.train_accuracy, m.gradients = _train_accuracy(prep.loaded, prep.inputs, m.backend, prep.session.dtype,
                                                            m.cand_kernels)
        else:
            m.ref, m.ref_name = acc_mod.reference(prep.loaded, prep.inputs, "eager")
    if oom:
        prep.notes.append(f"the float64 reference ran out of memory ({oom.message})")


def _train_accuracy(loaded, inputs, backend: str, dtype, sdpa_kernels) -> tuple[acc_mod.Accuracy, dict]:
    """Training mode: outputs and every gradient of one forward + backward pass, baseline
    (eager) and candidate against float64, with dropout set to 0 so the passes compare."""
    runs = {}
    with acc_mod.dropout_off(loaded.model):
        for name in ("eager", backend):
            with switch.using(loaded.model, name):
                runs[name] = train_fn(loaded, inputs, sdpa_kernels)()
        ref_out, ref_grads = acc_mod.reference_train(loaded, inputs)  # leaves no gradients behind
    (base_out, base_grads), (cand_out, cand_grads) = runs["eager"], runs[backend]
    accuracy = acc_mod.compare(cand_out, base_out, ref_out, valid=inputs.valid, dtype=dtype,
                               language_model=loaded.family == "causal-lm")
    return accuracy, acc_mod.compare_gradients(cand_grads, base_grads, ref_grads, dtype)


def _gate_outputs(loaded: models.LoadedModel, inputs: models.Inputs, notes: list[str]):
    """The eager output, its float64 reference and the reference's name, for the autotuner's
    accuracy gate, with dropout off (training mode included); (None, None, name) with a note
    when either runs out of memory: the candidates are then timed but not gated."""
    with oom_caught() as oom, acc_mod.dropout_off(loaded.model), switch.using(loaded.model, "eager"):
        out = forward_fn(loaded, inputs)()
        ref, name = acc_mod.reference(loaded, inputs, "eager")
    if oom:
        notes.append(f"the accuracy gate's eager run or float64 reference ran out of memory ({oom.message}): "
                     "autotune candidates were timed but not gated on accuracy")
        return None, None, "float64 eager"
    return out, ref, name


def _tune(prep: Prepared, o: EnableOptions, reporter: Reporter, m: Measured) -> None:
    """``--backend auto``: gate every candidate on accuracy and time them in interleaved rounds
    (``measure.autotune``); the fastest that passed becomes ``m.backend``."""
    loaded, inputs, notes, dtype = prep.loaded, prep.inputs, prep.notes, prep.session.dtype
    with _stage(m, reporter, "computing the float64 reference for the autotuner's accuracy gate"):
        if m.base.error:
            notes.append(f"the baseline could not run ({m.base.error}): autotune candidates were timed but "
                         "not gated on accuracy")
            gate_out = None
        else:
            gate_out, m.ref, m.ref_name = _gate_outputs(loaded, inputs, notes)
    cands = autotune.candidates(prep.session.env, prep.session.device, dtype, loaded.model, compiled=o.tune_compiled,
                                train=o.train)
    _skip_candidates(cands, prep, o)
    m.stage = "autotune: timing every candidate"
    tune_time = min(o.min_run_time, 0.5)
    autotune.tune_model(loaded, inputs, cands, baseline_out=gate_out, reference=m.ref, dtype=dtype,
                        min_run_time=tune_time, train=o.train, flops=prep.flops, progress=reporter.stage)
    best = autotune.chosen(cands, autotune.PAYBACK_CALLS)
    mode = "forward+backward (training)" if o.train else "forward (inference)"
    m.autotune = autotune.summary_dict(cands, best, mode=mode, min_run_time=tune_time, dtype=dtype,
                                       payback_calls=autotune.PAYBACK_CALLS)
    m.rejected = _tuned_rejections(cands, best, o.baseline)
    if best is not None:
        m.backend, m.cand_kernels = best.backend, best.sdpa_kernels or o.sdpa_kernels
        m.chosen_because = autotune.explain(best, cands, autotune.PAYBACK_CALLS)
    elif any(c.status not in ("skipped", "baseline") for c in cands):
        notes.append(f"no autotune candidate passed the accuracy gate; measuring {m.backend} (the static choice)")
    else:
        notes.append(f"no autotune candidate could run here (data.autotune has each one's reason); measuring "
                     f"{m.backend} (the static choice)")
    if o.train:
        m.ref = None  # the training check runs its own float64 forward + backward


def _skip_candidates(cands: list[autotune.Candidate], prep: Prepared, o: EnableOptions) -> None:
    """Mark the candidates this run cannot take, with the reason: another target than the
    verified hand-written swaps, an SDPA kernel outside --sdpa-kernel, no dropout for --train."""
    swapper = prep.swapper
    for c in cands:
        if c.status != "pending":
            continue
        if swapper is not None and c.backend != swapper.target:
            c.status, c.reason = "skipped", (f"hand-written attention is swapped to {swapper.target}; pass "
                                             f"--backend {c.backend} to swap it to {c.backend} instead")
        elif c.kernel and o.sdpa_kernels and c.kernel not in o.sdpa_kernels:
            c.status, c.reason = "skipped", f"not among --sdpa-kernel {','.join(o.sdpa_kernels)}"
        elif o.train and prep.dropout and not BACKENDS[c.backend].supports("dropout").supported:
            c.status, c.reason = "skipped", f"the model uses attention dropout ({prep.dropout}); {c.backend} has none"


# ----------------------------------------------------------------------------- stage 3: judging

def _accuracy(prep: Prepared, o: EnableOptions, m: Measured, reporter: Reporter) -> acc_mod.Accuracy:
    """The accuracy verdict from what was measured, or why there is none."""
    inputs = prep.inputs
    if o.train and m.gradients is not None:
        return m.train_accuracy
    if m.ref is not None and m.cand_out is not None and m.base_out is not None:
        fp8 = " by the FP8 rule, each layer on its own inputs" if BACKENDS[m.backend].precision else ""
        with reporter.stage("judging accuracy" + fp8):
            return acc_mod.judge(m.backend, m.cand_out, m.base_out, m.ref, valid=inputs.valid,
                                 dtype=prep.session.dtype, language_model=prep.loaded.family == "causal-lm",
                                 loaded=prep.loaded, inputs=inputs, reference_name=m.ref_name)
    if m.base is not None and m.base.error:
        why = f"the baseline {o.baseline} could not run ({m.base.error})"
    elif m.cand is not None and m.cand.error:
        why = f"{m.backend} could not run ({m.cand.error})"
    else:
        why = prep.notes[-1] if prep.notes else "interrupted"
    return acc_mod.not_compared(f"not compared: {why}", inputs.padding_positions)


def _switch_check(prep: Prepared, o: EnableOptions, m: Measured) -> Check:
    """Did the candidate run on its backend? From what was recorded while it was measured:
    the implementation the model reported, and for hand-written attention the sites whose
    new call the profiler saw run (``verify_sites``) and the backend's op in the candidate's
    own profile."""
    loaded, cand, swapper = prep.loaded, m.cand, prep.swapper
    after = f"{switch.current(loaded.model)} again after the run"
    if swapper is None:
        return Check("switch", cand.implementation == m.backend,
                     f"config._attn_implementation: {loaded.original_backend} (as loaded) -> {o.baseline} (baseline) -> "
                     f"{cand.implementation} (while the candidate was measured); {after}")
    swapped = [s for s in swapper.sites.values() if s.status == "swapped"]
    ran = ran_new_call(cand.kernel_counts, m.backend)
    text = (f"hand-written attention: {len(swapped)} of {len(swapper.sites)} sites swapped to {m.backend}, each seen "
            f"calling it on its module's own inputs ({', '.join(sorted({s.function for s in swapped}))})")
    by_graph = sum(s.path == "graph" for s in swapped)
    if by_graph:
        text += (f"; {by_graph} of them by the graph path (a captured graph, matched by data flow): run-time only, "
                 "no source patch")
    text += (f"; the candidate's forward pass ran {m.backend}" if ran else
             f"; but the candidate's forward pass ran no {m.backend} op (profiler: {fmt_kernels(cand.kernel_counts)})")
    return Check("switch", bool(swapped) and ran and cand.implementation == m.backend, text + f"; {after}")


def _checks(prep: Prepared, o: EnableOptions, m: Measured, accuracy: acc_mod.Accuracy) -> list[Check]:
    backend, base, cand = m.backend, m.base, m.cand
    kernels = m.cand_kernels
    one_kernel = kernels[0] if backend == "sdpa" and kernels and len(kernels) == 1 else None
    checks = [_switch_check(prep, o, m), kernel_check(base, cand, backend, one_kernel)]
    if cand.error:
        return checks + [Check("runs", False, f"{backend}: {cand.error}"), Check("accuracy", False, accuracy.evidence())]
    checks.append(speed_check(base, cand))
    matrix_mb = _matrix_mb(prep)
    mem = memory_check(base, cand, matrix_mb)
    checks += ([mem] if mem else []) + [Check("accuracy", accuracy.passed, accuracy.evidence())]
    if m.gradients is not None:
        checks.append(Check("gradients", m.gradients["passed"], m.gradients["evidence"]))
    return checks


def _matrix_mb(prep: Prepared) -> float | None:
    """The largest [B, H, S, S] score matrix eager forms (MB), from the recorded calls."""
    if prep.swapper is None:
        return None
    biggest = max((d[0] * d[1] * d[2] for _, d in prep.calls if len(d) == 4), default=0)
    return biggest * prep.session.dtype.itemsize / 2**20


# ----------------------------------------------------------------------------- stage 4: the result

@dataclass(kw_only=True)
class EnableFlashData(SessionData):
    """``data`` of enable_flash (README: the JSON contract): the session's fields, the two
    measurements, their ratios, the accuracy verdict, how the backend was chosen and, for
    hand-written attention, the sites and the source patch.

    ``speedup`` = baseline / candidate median latency; ``memory_ratio`` = baseline / candidate
    peak memory (MB); both None unless both sides were measured."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = SessionData.OMIT_IF_NONE | {
        "gradients", "sites", "patch", "attention_matrix_mb", "attention_modules", "sites_swapped"}

    baseline: Measurement | None = None
    candidate: Measurement | None = None
    speedup: float | None = None
    memory_ratio: float | None = None
    accuracy: acc_mod.Accuracy | None = None
    chosen: str = ""
    chosen_because: str = ""
    rejected: list[dict[str, Any]] = field(default_factory=list)
    sdpa_kernels_allowed: list[str] | None = None
    saved_to: str | None = None
    autotune: dict[str, Any] | None = None
    mode: str = "forward (inference)"
    gradients: dict[str, Any] | None = None
    sites: list[Any] | None = None
    patch: str | None = None
    attention_matrix_mb: float | None = None
    attention_modules: dict[str, Any] | None = None
    sites_swapped: int | None = None


def _data(prep: Prepared, o: EnableOptions, m: Measured, accuracy: acc_mod.Accuracy) -> EnableFlashData:
    """The step's typed ``data``: the session's fields and every figure this run measured."""
    base, cand, swapper = m.base, m.cand, prep.swapper
    rejected = m.rejected if m.rejected is not None else [r.to_dict() for r in prep.choice.rejected
                                                          if r.backend != o.baseline]
    timed = base is not None and cand is not None and base.latency_ms and cand.latency_ms
    peaks = base is not None and cand is not None and base.peak_memory_mb and cand.peak_memory_mb
    data = EnableFlashData(
        **prep.session.fields(), baseline=base, candidate=cand,
        speedup=base.latency_ms / cand.latency_ms if timed else None,
        memory_ratio=base.peak_memory_mb / cand.peak_memory_mb if peaks else None,
        accuracy=accuracy, chosen=m.backend, chosen_because=m.chosen_because or prep.choice.why,
        rejected=rejected + [{"backend": o.baseline, "available": True,
                              "reason": "the baseline this run measures against"}],
        sdpa_kernels_allowed=m.cand_kernels, autotune=m.autotune,
        mode="forward+backward (training)" if o.train else "forward (inference)", gradients=m.gradients)
    if swapper is not None:
        data.sites = list(swapper.sites.values())
        data.patch, data.attention_matrix_mb, data.attention_modules = prep.patch, _matrix_mb(prep), m.modules
        data.sites_swapped = sum(s.status == "swapped" for s in swapper.sites.values())
    return data


def _result(prep: Prepared, o: EnableOptions, m: Measured, accuracy: acc_mod.Accuracy) -> StepResult:
    """The verdict: ``error`` when interrupted or when the baseline could not run, else
    ``pass`` when every check passed and ``fail`` otherwise."""
    data, backend = _data(prep, o, m, accuracy), m.backend
    base, cand = m.base, m.cand
    if m.interrupted:
        kept = ", ".join(k for k in ("baseline", "candidate") if getattr(data, k)) or "nothing"
        return StepResult(STEP, "error", f"interrupted (Ctrl-C) while {m.stage}; measured so far: {kept}", [], data,
                          "rerun to finish; " + ("the run folder holds what was measured" if o.write_report else
                                                 "this result holds what was measured (--no-report: no run folder)"))
    if base.error:
        cand_text = (f"{backend} ran: {fmt_mb(cand.peak_memory_mb)} peak" if cand and not cand.error
                     else f"{backend}: {cand.error if cand else 'not run'}")
        return StepResult(STEP, "error", f"baseline {o.baseline} could not run at batch {o.batch_size}, seq_len "
                                         f"{prep.inputs.seq_len}: {base.error}; {cand_text}; accuracy not compared",
                          [], data, "the candidate runs where the baseline cannot; to compare accuracy, rerun with a "
                                    "smaller --batch-size or --seq-len")
    checks = _checks(prep, o, m, accuracy)
    failed = [c for c in checks if not c.passed]
    arrow = f"{o.baseline} -> {backend}"
    if failed:
        return StepResult(STEP, "fail", f"{arrow}: " + "; ".join(f"{c.name} failed ({c.evidence})" for c in failed),
                          checks, data, " ".join(NEXT_FAIL[c.name] for c in failed))
    summary = f"{arrow}: {comparison_summary(base, cand)}, outputs match ({accuracy.evidence().split(' vs ')[0]})"
    nxt = (f"keep {backend}: load the model with attn_implementation=\"{backend}\""
           + ("" if o.save else ", or rerun with --save DIR to write the switched model"))
    if not BACKENDS[backend].hf:
        nxt = f"keep {backend} for inference (forward only): with scripts/ on sys.path, " + \
              REGISTER_HINT.format(name=backend)
    if prep.swapper is not None:
        nxt = ("make the swap permanent: review and apply the source change (git apply), written to "
               + (o.write_patch or "swap.patch in the run folder; --write-patch FILE writes it elsewhere"))
    return StepResult(STEP, "pass", summary, checks, data, nxt)


def _finish(result: StepResult, prep: Prepared, o: EnableOptions, reporter: Reporter) -> StepResult:
    """``--save`` (only a transformers model on which every check passed), the patch, the run
    folder."""
    notes, backend = prep.notes, result.data.chosen
    if o.save and prep.swapper is not None:
        notes.append("--save: nothing written for a model without a transformers switch; the permanent change "
                     "is the source patch")
    elif o.save and result.status == "pass":
        with reporter.stage(f"saving the switched model to {o.save}"):
            result.data.saved_to = str(_save(prep.loaded, backend, Path(o.save).expanduser()))
        result.next = f"saved to {result.data.saved_to}: from_pretrained() loads it with {backend}"
    elif o.save:
        notes.append(f"--save {o.save}: nothing written, because a check failed")
    write_patch(result, prep.patch, o.write_patch,
                "a transformers model is switched through attn_implementation, not by editing its source (--save "
                "writes the switched model)" if prep.swapper is None else "no hand-written attention site was swapped",
                patch_root(patched_files(prep.swapper)) if prep.swapper is not None else None)
    if o.write_report:
        write_run_folder(result, Path(o.report_dir) if o.report_dir else default_run_folder(STEP, prep.loaded.name),
                         {"swap.patch": prep.patch})
    return result


def enable_flash(o: EnableOptions, reporter: Reporter) -> StepResult:
    """Run the main job (see the module docstring): prepare, measure, judge, report. Raises
    ``CannotRun`` when it cannot start; once measuring has begun, problems are reported in
    the returned result."""
    prep = _prepare(o, reporter)
    measured = _measure(prep, o, reporter)
    accuracy = _accuracy(prep, o, measured, reporter)
    return _finish(_result(prep, o, measured, accuracy), prep, o, reporter)


#: How a result of this step is drawn (report.View): the two measurements, accuracy, autotune, rejections.
VIEW = register_view(STEP, Sections((measured("baseline", "candidate"), accuracy_part, autotune_part, rejected_part),
                                    measured_figure("baseline", "candidate")))
