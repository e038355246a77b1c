"""Measured backend choice: time every candidate on the real inputs, keep the fastest that is right.

As ``triton.autotune`` does with its configs: every candidate runs on the same inputs,
its first call (JIT, ``torch.compile``, cuDNN plans, lazy init) is timed apart from its
steady state, and it must pass the accuracy gate to win. Candidates (``candidates``):
SDPA's kernels one by one (each allowed alone by ``torch.nn.attention.sdpa_kernel``, so
one that cannot take the inputs says so instead of falling back), and every other
registry backend that can run here; ``eager`` is the baseline, ranked, never chosen.

The choice (``chosen``, ``CHOICE_RULE``): the lowest median of ``ROUNDS`` interleaved
rounds among those that passed, with a longer run-off (``runoff``) for those within
``RUNOFF_WITHIN`` of the fastest. ``torch.compile`` backends (``flex_attention``) are
``skipped`` on CPU (tens of seconds of inductor C++ build) unless ``compiled=True``.

``tune_model`` gates a loaded model's output per candidate; ``tune_op`` each
``Backend.call`` on q, k, v [B, S, H, D]; both against float64 (``accuracy.compare``).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..backends import BACKENDS, SDPA, availability
from ..env import Environment, dtype_name
from ..report import CannotRun, said
from ..swap import switch
from .accuracy import RULE, Accuracy, compare, dropout_off
from .flops import attention_flops
from .timing import (forward_fn, is_oom, no_kernel_error, no_kernel_reasons, oom_message, quartiles, synchronize,
                     time_it, train_fn)

BASELINE = "eager"


@dataclass
class Candidate:
    """One candidate and what happened to it. ``status``: ``passed`` / ``failed`` (ran, within /
    outside tolerance), ``error`` (could not run: ``reason``), ``skipped`` (not run here:
    ``reason``), ``baseline`` (eager). Times in ms; ``compile_s`` in s (the first call
    minus one steady-state call)."""

    backend: str
    kernel: str | None = None
    status: str = "pending"
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None
    compile_s: float | None = None
    accuracy_passed: bool | None = None
    max_abs_err: float | None = None
    tolerance: float | None = None
    tflops: float | None = None
    reason: str = ""
    runoff: bool = False  # re-timed in the run-off (``runoff``): its latency is the run-off's

    @property
    def label(self) -> str:
        """'sdpa[cudnn]' for an SDPA kernel, else the backend name."""
        return f"{self.backend}[{self.kernel}]" if self.kernel else self.backend

    @property
    def sdpa_kernels(self) -> list[str] | None:
        return [self.kernel] if self.kernel else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidates(env: Environment, device: str, dtype: torch.dtype, model: Any = None, *,
               compiled: bool | None = None, head_dim: int | None = None, train: bool = False) -> list[Candidate]:
    """Every registry backend and SDPA kernel as a candidate for ``device``, ``dtype`` and
    ``model``: ``pending``, or ``skipped`` with the reason. ``compiled`` (default: CUDA only)
    includes torch.compile backends. Records with ``auto`` False (FP8, which changes the
    numerics) are left out, except the eager baseline."""
    compiled = device.startswith("cuda") if compiled is None else compiled
    kind = "cuda" if device.startswith("cuda") else "cpu"
    usable = {k.name: k for k in env.sdpa_kernels.get(kind, [])}
    out: list[Candidate] = []
    for name, record in BACKENDS.items():
        if name != BASELINE and not record.auto:
            continue
        verdict = availability(name, env=env, device=device, dtype=dtype, model=model, train=train)
        if name == SDPA.name:
            for k in record.kernels:
                c = Candidate(name, k.name)
                probe = usable.get(k.name)
                if not verdict.available:
                    c.status, c.reason = "skipped", verdict.reason
                elif kind not in k.devices:
                    c.status, c.reason = "skipped", f"SDPA has no {k.name} kernel on {kind}"
                elif probe is not None and (not probe.compiled or probe.usable is False):
                    c.status, c.reason = "skipped", f"this torch's {k.name} kernel is not usable here" + (
                        f" ({probe.reason})" if probe.reason else "")
                out.append(c)
            continue
        if head_dim and record.max_head_dim and head_dim > record.max_head_dim and verdict.available:
            verdict.available, verdict.reason = False, f"head_dim {head_dim} > {record.max_head_dim}"
        c = Candidate(name)
        if name == BASELINE:
            c.status = "baseline"
        elif not verdict.available:
            c.status, c.reason = "skipped", verdict.reason
        elif record.compiles and "torch.compile" in record.compiles and not compiled:
            c.status, c.reason = "skipped", (f"{record.compiles}; on {kind} its first call takes tens of seconds: "
                                             "not timed unless asked (--tune-compiled)")
        out.append(c)
    return out


def _first_call(run: Callable[[], Any], device: str) -> tuple[Any, float]:
    """Run once (the warm-up, where compilation happens): (output, seconds)."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = run()
        except RuntimeError as exc:
            if no_kernel_error(exc):
                raise CannotRun(no_kernel_reasons(caught)) from None
            raise
    synchronize(device)
    return out, time.perf_counter() - t0


def _attempt(c: Candidate, body: Callable[[], None], device: str) -> None:
    """Run ``body`` for ``c``; any failure becomes ``error`` with its reason, never a crash."""
    try:
        body()
    except CannotRun as exc:
        c.status, c.reason = "error", exc.message
    except Exception as exc:
        if is_oom(exc):
            c.status, c.reason = "error", oom_message(exc)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        else:
            c.status, c.reason = "error", f"{said(exc, 240)}"


def _judge(c: Candidate, acc: Accuracy | None) -> None:
    if acc is None:
        c.status, c.reason = "passed", "accuracy not gated: no reference"
        return
    c.max_abs_err, c.tolerance = acc.max_abs_err, acc.tolerance
    c.accuracy_passed = acc.passed
    c.status = "passed" if acc.passed else "failed"
    if not acc.passed:
        c.reason = f"outside tolerance: {acc.evidence()}"


def tune_model(loaded: Any, inputs: Any, cands: list[Candidate], *, baseline_out: torch.Tensor | None,
               reference: torch.Tensor | None, dtype: torch.dtype, min_run_time: float, train: bool = False,
               flops: float | None = None, progress: Callable[[str], Any] | None = None) -> list[Candidate]:
    """Measure every ``pending`` candidate on ``loaded`` (``models.LoadedModel``) and ``inputs``
    inside ``switch.using``: first call (``compile_s``), steady state (forward, or forward +
    backward with ``train``), and its inference output judged against the float64
    ``reference`` with the eager ``baseline_out``. Returns ``cands``, updated."""
    lm = loaded.family == "causal-lm"
    runs: dict[str, Callable[[], Any]] = {}
    for c in cands:
        if c.status != "pending":
            continue

        def body(c=c):
            forward = forward_fn(loaded, inputs, c.sdpa_kernels)
            run = train_fn(loaded, inputs, c.sdpa_kernels) if train else forward
            with switch.using(loaded.model, c.backend), dropout_off(loaded.model):
                _, first = _first_call(run, loaded.device)
                out = forward()
            runs[c.label] = run
            c.compile_s = first  # the steady-state time is taken off once it is known
            acc = None
            if reference is not None and baseline_out is not None:
                acc = compare(out, baseline_out, reference, valid=inputs.valid, dtype=dtype, language_model=lm)
            _judge(c, acc)

        if progress is not None:
            with progress(f"autotune: first call and accuracy of {c.label}"):
                _attempt(c, body, loaded.device)
        else:
            _attempt(c, body, loaded.device)

    def switched(c: Candidate):
        return switch.using(loaded.model, c.backend)

    with progress(f"autotune: timing {len(runs)} candidates in {ROUNDS} interleaved rounds, then a run-off") \
            if progress is not None else contextlib.nullcontext():
        interleaved(cands, runs, switched, min_run_time, loaded.device, flops)
        runoff(cands, runs, switched, min_run_time, loaded.device, flops)
    return cands


#: Rounds of the timing phase: each candidate once per round, in turn (drift hits all alike).
ROUNDS = 5
#: The run-off (``runoff``): candidates within this fraction of the fastest are timed again.
#: Two kernels closer than 10 % are inside the noise of a short timing: on an H200 a quick pass
#: of 0.05 s chose 0.80x, 0.84x and 0.88x of the fastest in 3 of 24 configurations.
RUNOFF_WITHIN = 0.10
#: ... for this many times the first timing's seconds, in ``ROUNDS`` interleaved rounds again.
RUNOFF_TIME = 4


def interleaved(cands: list[Candidate], runs: dict[str, Callable[[], Any]], scope: Callable[[Candidate], Any],
                min_run_time: float, device: str, flops: float | None, *, first: bool = True) -> None:
    """Time each candidate in ``runs`` for ``ROUNDS`` rounds of ``min_run_time / ROUNDS`` s,
    each inside ``scope(c)``: latency and IQR (ms) of the round medians; with ``first``,
    ``compile_s`` loses one steady-state call. A failure here becomes ``error``."""
    medians: dict[str, list[float]] = {label: [] for label in runs}
    timed = [c for c in cands if c.label in runs and c.status in ("passed", "failed", "baseline")]
    for _ in range(ROUNDS):
        for c in timed:
            if c.status == "error":
                continue

            def body(c=c):
                with scope(c):
                    medians[c.label].append(time_it(runs[c.label], min_run_time / ROUNDS, c.label)[0])

            _attempt(c, body, device)
    for c in timed:
        values = sorted(medians[c.label])
        if c.status == "error" or not values:
            continue
        q1, c.latency_ms, q3 = quartiles(values)
        c.latency_iqr_ms = q3 - q1 if len(values) >= 4 else None
        if first:
            c.compile_s = max(0.0, (c.compile_s or 0.0) - c.latency_ms / 1e3)
        if flops:
            c.tflops = flops / (c.latency_ms * 1e-3) / 1e12


def runoff(cands: list[Candidate], runs: dict[str, Callable[[], Any]], scope: Callable[[Candidate], Any],
           min_run_time: float, device: str, flops: float | None) -> list[Candidate]:
    """Re-time the passed candidates within ``RUNOFF_WITHIN`` of the fastest, ``RUNOFF_TIME`` x
    longer (``Candidate.runoff``); returns them ([] when the fastest was clear)."""
    passed = [c for c in cands if c.status == "passed" and c.latency_ms is not None and c.label in runs]
    if len(passed) < 2:
        return []
    fastest = min(c.latency_ms for c in passed)
    close = [c for c in passed if c.latency_ms <= fastest * (1 + RUNOFF_WITHIN)]
    if len(close) < 2:
        return []
    interleaved(close, runs, scope, min_run_time * RUNOFF_TIME, device, flops, first=False)
    for c in close:
        c.runoff = True
    return close


def tune_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cands: list[Candidate], *, causal: bool,
            min_run_time: float = 0.2, backward: bool = False, reference_slice: tuple[int, int] = (1, 2)) -> list[Candidate]:
    """Measure every ``pending`` candidate's ``Backend.call`` on q [B, S, H, D], k, v
    [B, S, H_kv, D] (forward + backward with ``backward``). Accuracy: ``accuracy.compare``
    on the first ``reference_slice`` = (batch rows, key/value heads), eager as baseline.
    TFLOP/s from ``flops.attention_flops`` (x3.5 with backward: flash-attn's benchmark count).
    Returns ``cands``, updated; the baseline is timed too when it fits."""
    b, s_q, h, d = q.shape
    h_kv = k.shape[2]
    rows, kv_heads = min(reference_slice[0], b), min(reference_slice[1], h_kv)
    q_heads = kv_heads * (h // h_kv)
    sl = (slice(0, rows), slice(None), slice(0, q_heads))
    ref = BACKENDS[BASELINE].call(q[sl].double(), k[:rows, :, :kv_heads].double(), v[:rows, :, :kv_heads].double(),
                                  causal=causal)
    eager_slice = BACKENDS[BASELINE].call(q[sl], k[:rows, :, :kv_heads], v[:rows, :, :kv_heads], causal=causal)
    flops = attention_flops(b, s_q, h, d, 1, causal, kv_len=k.shape[1]) * (3.5 if backward else 1.0)
    device = str(q.device)
    runs: dict[str, Callable[[], Any]] = {}
    for c in cands:
        if c.status not in ("pending", "baseline"):
            continue
        record = BACKENDS[c.backend]
        kw = {"causal": causal}
        if c.kernel:
            kw["sdpa_kernel"] = SDPA.kernel(c.kernel)
        if backward:
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            grad = torch.randn_like(q)

            def run(record=record, kw=kw, qq=qq, kk=kk, vv=vv, grad=grad):
                out = record.call(qq, kk, vv, **kw)
                out.backward(grad)
                return out
        else:
            def run(record=record, kw=kw):
                with torch.no_grad():
                    return record.call(q, k, v, **kw)

        def body(c=c, run=run, record=record, kw=kw):
            _, c.compile_s = _first_call(run, device)
            runs[c.label] = run
            with torch.no_grad():
                got = record.call(q[sl], k[:rows, :, :kv_heads], v[:rows, :, :kv_heads], **kw)
            acc = compare(got, eager_slice, ref, valid=None, dtype=q.dtype, language_model=False)
            if c.status == "baseline":
                c.max_abs_err, c.tolerance, c.accuracy_passed = acc.max_abs_err, acc.tolerance, acc.passed
            else:
                _judge(c, acc)

        was_baseline = c.status == "baseline"
        _attempt(c, body, device)
        if was_baseline and c.status == "error":
            c.reason = f"the baseline could not be timed: {c.reason}"
    interleaved(cands, runs, lambda c: contextlib.nullcontext(), min_run_time, device, flops)
    runoff(cands, runs, lambda c: contextlib.nullcontext(), min_run_time, device, flops)
    return cands


#: Calls a model's first-call cost must pay back within (``chosen`` with ``payback_calls``):
#: ``torch.compile`` (flex_attention: tens of seconds on a CPU, seconds on a GPU), FA4's CuTe
#: DSL build (1.4-3.2 s per configuration on an H200, references/benchmarks.md) or a cuDNN
#: plan. 10,000 forward calls of one shape: a short evaluation or serving session.
PAYBACK_CALLS = 10_000

CHOICE_RULE = (f"the lowest median of {ROUNDS} interleaved rounds among candidates that passed the accuracy gate; "
               f"candidates within {RUNOFF_WITHIN:.0%} of the fastest timed again {RUNOFF_TIME}x longer (the run-off)")
MODEL_CHOICE_RULE = (f"the lowest first-call cost (compile_s) + {PAYBACK_CALLS:,} x median latency among candidates "
                     f"that passed the accuracy gate: a compiling backend wins only where its speed pays back its "
                     f"compile time within {PAYBACK_CALLS:,} calls; candidates within {RUNOFF_WITHIN:.0%} of the "
                     f"fastest timed again {RUNOFF_TIME}x longer (the run-off)")


def cost_s(c: Candidate, payback_calls: int | None) -> float:
    """What ``chosen`` minimises (s): latency, or ``compile_s + payback_calls x latency``."""
    if payback_calls is None:
        return c.latency_ms / 1e3
    return (c.compile_s or 0.0) + payback_calls * c.latency_ms / 1e3


def chosen(cands: list[Candidate], payback_calls: int | None = None) -> Candidate | None:
    """The passed candidate with the lowest ``cost_s`` (never the baseline); None if none passed."""
    passed = [c for c in cands if c.status == "passed" and c.latency_ms is not None]
    return min(passed, key=lambda c: cost_s(c, payback_calls)) if passed else None


def ranking(cands: list[Candidate]) -> list[Candidate]:
    """Timed candidates first, fastest first; then those that did not run, in registry order."""
    timed = sorted((c for c in cands if c.latency_ms is not None), key=lambda c: c.latency_ms)
    return timed + [c for c in cands if c.latency_ms is None]


def explain(best: Candidate | None, cands: list[Candidate], payback_calls: int | None = None) -> str:
    """Why ``best`` won, in one sentence, from the measurements."""
    timed = [c for c in cands if c.status == "passed"]
    if best is None:
        return "no candidate passed the accuracy gate"
    faster = [c for c in timed if c.latency_ms is not None and c.latency_ms < best.latency_ms]
    if payback_calls is not None and faster:
        f = min(faster, key=lambda c: c.latency_ms)
        return (f"measured: {f.label} runs faster ({f.latency_ms:.3f} ms against {best.latency_ms:.3f} ms) but its "
                f"first call took {f.compile_s or 0.0:.1f} s against {best.compile_s or 0.0:.1f} s, which its speed "
                f"pays back only after {_break_even(f, best):,.0f} calls (more than {payback_calls:,})")
    others = sorted((c for c in timed if c is not best), key=lambda c: c.latency_ms)
    text = (f"measured: the fastest of {len(timed)} candidates that passed the accuracy gate "
            f"({best.latency_ms:.3f} ms")
    if others:
        text += f"; next {others[0].label} {others[0].latency_ms:.3f} ms, {others[0].latency_ms / best.latency_ms:.2f}x"
    close = [c.label for c in timed if c.runoff]
    if close:
        text += (f"; {', '.join(close)} were within {RUNOFF_WITHIN:.0%} of the fastest and were timed again, "
                 f"{RUNOFF_TIME}x longer")
    return text + ")"


def _break_even(fast: Candidate, slow: Candidate) -> float:
    """Calls after which ``fast``'s lower latency has paid back its extra first-call cost."""
    saving = (slow.latency_ms - fast.latency_ms) / 1e3
    extra = (fast.compile_s or 0.0) - (slow.compile_s or 0.0)
    return extra / saving if saving > 0 else float("inf")


def summary_dict(cands: list[Candidate], best: Candidate | None, *, mode: str, min_run_time: float,
                 dtype: torch.dtype, payback_calls: int | None = None) -> dict[str, Any]:
    """``data.autotune``: every candidate (ranked) and the choice."""
    return {"candidates": [c.to_dict() for c in ranking(cands)], "chosen": best.backend if best else None,
            "chosen_kernel": best.kernel if best else None, "chosen_label": best.label if best else None,
            "mode": mode, "min_run_time_s": min_run_time, "rule": RULE, "dtype": dtype_name(dtype),
            "choice_rule": CHOICE_RULE if payback_calls is None else MODEL_CHOICE_RULE,
            "payback_calls": payback_calls,
            "why": explain(best, cands, payback_calls)}

