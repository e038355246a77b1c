"""Is the candidate's output as close to the truth as the baseline's? Judged, not guessed.

Both outputs (logits [B, S, V] for language models, else the last hidden state
[B, S, hidden]) are compared with a float64 run of the same model on the same inputs
(``reference``: weights cast to float64 in place and restored bit for bit, eager
attention; op by op in float64, ``Float64Everywhere``, when the model builds fixed-dtype
tensors inside forward; failing that in the run's own dtype, named in
``Accuracy.reference``). The rule, from flash-attn's ``tests/test_flash_attn.py``
(``(out - out_ref).abs().max() <= 2 * (out_pt - out_ref).abs().max()``)::

    err_candidate <= 2 * err_baseline + eps(dtype) * max|reference|

``err``: max absolute error against float64 over real tokens; ``eps(dtype)``:
``torch.finfo(dtype).eps`` (1.2e-7 fp32, 7.8e-3 bf16, 9.8e-4 fp16), one unit in the last
place at the output's scale: no magic number.

The reference is judged first. Over this project's 182 measured baselines
(references/measurements/: bf16 and fp32, CPU and H200, up to Llama 3B at 8K) a correct
run erred by at most 9.5 eps(dtype) x max|ref|, so (6.7x that)::

    err_baseline <= REFERENCE_FACTOR x eps(dtype) x max|ref|,   REFERENCE_FACTOR = 64

Beyond it the float64 run is not the model's function (its code picks a constant by
dtype: a norm's eps 1e-5 in float32, 1e-3 otherwise) and ``2 x err_baseline`` would
accept anything; the candidate is then compared with the eager baseline in its dtype::

    max|candidate - baseline| <= 2 x REFERENCE_FACTOR x eps(dtype) x max|baseline|

sound only while that is below ``SAME_DTYPE_LIMIT`` = 1/16 of the output's scale: true in
float32 (1.5e-5), not in bf16 (1.0) or fp16 (0.125), where the check fails "cannot verify".

Padding positions (``Inputs.valid`` False) are reported apart, not judged: what a model
writes at a padded query is undefined and differs by backend.

FP8 attention (``Backend.precision == "fp8_e4m3"``: 3 mantissa bits, one call errs about
0.06 relative RMS where bf16 errs 0.002; H100, cuDNN sdpa_fp8 vs fp32) is judged by
``compare_fp8``, the same idea scaled by the precision::

    r = eps(e4m3) / eps(dtype)            16 for bf16 (2**-3 / 2**-7), 128 for fp16
    relRMS(candidate, ref) <= r x relRMS(baseline, ref)                  logits (or hidden states)
    top-1 disagreements with the baseline <= r x (baseline's disagreements with ref + 1)
    each layer: relRMS(attention out, fp32 attention on the same q, k, v) <= eps(e4m3) = 0.125

relRMS(a, b) = ||a - b|| / ||b|| over real tokens. The first two let the model's own
sensitivity set the scale (a deep network amplifies bf16 and FP8 rounding alike); the
third reads real activations, where a sharper softmax raises FP8's error (issue 12: 0.06
to 0.10).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..backends import BACKENDS
from ..report import CannotRun, OutOfMemory, one_line
from ..swap import switch
from .timing import is_oom, oom_caught, run_backend, train_fn

RULE = "err <= 2 x baseline err + eps(dtype) x max|ref| (flash-attn tests)"
#: The bound on a correct run's error against float64, in eps(dtype) x max|ref| (module docstring).
REFERENCE_FACTOR = 64
#: A same-dtype comparison whose tolerance reaches this fraction of the output's scale cannot
#: tell a wrong swap (a dropped mask moves outputs by their own scale) from rounding.
SAME_DTYPE_LIMIT = 1 / 16
SAME_DTYPE_RULE = (f"max|candidate - baseline| <= 2 x {REFERENCE_FACTOR} x eps(dtype) x max|baseline| "
                   "(the float64 reference is not the same function)")
FP8 = "fp8_e4m3"
#: One e4m3 unit, relative: torch.finfo(torch.float8_e4m3fn).eps = 2**-3.
E4M3_EPS = float(torch.finfo(torch.float8_e4m3fn).eps)
FP8_RULE = ("FP8 attention vs the baseline, r = eps(e4m3) / eps(dtype): relRMS(out, float64) <= r x the baseline's; "
            "top-1 disagreements with the baseline <= r x (the baseline's with float64 + 1); every layer's attention "
            "within eps(e4m3) = 0.125 relRMS of fp32 attention on its own q, k, v")


@contextlib.contextmanager
def exact_cast(model: nn.Module, dtype: torch.dtype = torch.float64) -> Iterator[nn.Module]:
    """Cast the model's floating parameters and buffers to ``dtype`` inside the block; each
    gets back its own dtype after (a bf16 model keeps its fp32 rotary ``inv_freq``), bit for
    bit: float64 holds every fp32/bf16/fp16 value exactly."""
    saved = [(module, _cast_own(module, dtype)) for module in model.modules()]
    try:
        yield model
    finally:
        for module, own in saved:
            _restore_own(module, own)


def _cast_own(module: nn.Module, dtype: torch.dtype) -> list[tuple[str, str, torch.dtype]]:
    """Cast ``module``'s own floating parameters and buffers (not its children's) to ``dtype``;
    return what to restore."""
    saved = []
    for kind, table in (("p", module._parameters), ("b", module._buffers)):
        for name, t in table.items():
            if t is not None and t.is_floating_point() and t.dtype != dtype:
                saved.append((kind, name, t.dtype))
                if kind == "p":
                    t.data = t.data.to(dtype)
                else:
                    table[name] = t.to(dtype)
    return saved


def _restore_own(module: nn.Module, saved: list[tuple[str, str, torch.dtype]]) -> None:
    for kind, name, original in saved:
        if kind == "p":
            t = module._parameters[name]
            t.data = t.data.to(original)
        else:
            module._buffers[name] = module._buffers[name].to(original)


@contextlib.contextmanager
def exact_cast_per_module(model: nn.Module, dtype: torch.dtype = torch.float64) -> Iterator[nn.Module]:
    """Like ``exact_cast``, but each module's own weights are in ``dtype`` only while it runs
    (pre-hook casts, hook restores bit for bit): the float64 reference of a model spread over
    devices (references/context-parallel.md). An offloaded module is cast on its "meta"
    placeholder, so accelerate loads it in float64. A forward reading another module's
    weights outside that module's call fails with a dtype error, which the caller reports.
    """
    handles, stacks = [], {}

    def pre(module: nn.Module, args: Any) -> None:
        with torch.inference_mode(False):  # the weights stay ordinary tensors, as exact_cast leaves them
            stacks.setdefault(id(module), []).append(_cast_own(module, dtype))

    def post(module: nn.Module, args: Any, output: Any) -> None:
        with torch.inference_mode(False):
            _restore_own(module, stacks[id(module)].pop())

    for module in model.modules():
        own = [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]
        if any(t.is_floating_point() for t in own):
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post, always_call=True))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """Inside the block every float attribute named like a dropout rate (nn.Dropout's ``p``,
    ``attention_dropout``, ``attn_pdrop``, ...) is 0, so two training passes can be compared."""
    saved = []
    for m in model.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, float) and value > 0 and ("drop" in name or name == "p"):
                saved.append((m, name, value))
                setattr(m, name, 0.0)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


@dataclass
class Accuracy:
    """The candidate's error against float64, judged against the baseline's own error."""

    max_abs_err: float | None  # candidate vs float64 reference, real tokens
    max_rel_err: float | None  # max_abs_err / max|reference|
    mean_abs_err: float | None
    tolerance: float | None
    passed: bool
    baseline_max_abs_err: float | None
    candidate_vs_baseline_max_abs_err: float | None
    top1_agreement: float | None  # share of real tokens whose argmax matches the baseline's (LMs)
    compared_positions: int
    padding_positions: int
    padding_max_abs_err: float | None  # candidate vs baseline at padding: reported, not judged
    reference: str
    rule: str = RULE
    note: str = ""
    # the FP8 rule (``compare_fp8``); None under the dtype rule
    precision: str = ""
    rel_rms_err: float | None = None  # candidate vs reference, ||c - r|| / ||r||
    baseline_rel_rms_err: float | None = None
    rel_rms_vs_baseline: float | None = None  # the outputs' relative error vs the baseline (bf16)
    rel_rms_tolerance: float | None = None
    baseline_top1_agreement: float | None = None  # baseline vs reference (LMs)
    min_top1_agreement: float | None = None
    attention: list[dict[str, Any]] | None = None  # per layer: rel_rms vs fp32 attention on the same inputs
    attention_tolerance: float | None = None
    # the reference judged first: the baseline's own error against float64 may be at most this
    reference_error_bound: float | None = None
    reference_trusted: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def evidence(self) -> str:
        if self.max_abs_err is None:
            return self.note
        if self.precision == FP8:
            return self._fp8_evidence()
        sign = "<=" if self.passed else ">"
        if self.reference_trusted is False:
            return (f"max|candidate - baseline| {self.max_abs_err:.1e} {sign} tol {self.tolerance:.1e} "
                    f"(same-dtype rule) vs {self.reference}")
        text = (f"max_abs_err {self.max_abs_err:.1e} {sign} tol {self.tolerance:.1e} "
                f"(2 x baseline {self.baseline_max_abs_err:.1e} + eps) vs {self.reference}")
        if self.top1_agreement is not None:
            text += f"; top-1 agreement {100 * self.top1_agreement:.2f} %"
        return text


    def _fp8_evidence(self) -> str:
        ratio = self.rel_rms_tolerance / self.baseline_rel_rms_err if self.baseline_rel_rms_err else float("nan")
        ok = self.rel_rms_err is not None and self.rel_rms_err <= self.rel_rms_tolerance
        text = (f"rel RMS err {self.rel_rms_err:.1e} {'<=' if ok else '>'} tol {self.rel_rms_tolerance:.1e} "
                f"({ratio:.0f} x baseline {self.baseline_rel_rms_err:.1e}, FP8 rule) vs {self.reference}; "
                f"rel RMS vs the baseline {self.rel_rms_vs_baseline:.1e}")
        if self.top1_agreement is not None:
            sign = ">=" if self.top1_agreement >= self.min_top1_agreement else "<"
            text += (f"; top-1 agreement with the baseline {100 * self.top1_agreement:.2f} % {sign} "
                     f"{100 * self.min_top1_agreement:.2f} % (baseline vs {self.reference}: "
                     f"{100 * self.baseline_top1_agreement:.2f} %)")
        if self.attention:
            worst = max(self.attention, key=lambda a: a["rel_rms"])
            sign = "<=" if worst["rel_rms"] <= self.attention_tolerance else ">"
            text += (f"; attention on this model's own q, k, v: worst layer {worst['layer']} rel RMS "
                     f"{worst['rel_rms']:.3f} {sign} eps(e4m3) {self.attention_tolerance:.3f} "
                     f"({len(self.attention)} calls)")
        elif self.attention is not None:
            text += "; attention per layer: no call observed"
        return text


def _rows(t: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split [B, S, ...] into real-token rows [N, ...] and padding rows [P, ...]."""
    if valid is None or t.dim() < 2 or tuple(t.shape[:2]) != tuple(valid.shape):
        return t.reshape(-1, *t.shape[2:]) if t.dim() >= 2 else t.reshape(1, -1), None
    valid = valid.to(t.device)
    return t[valid], t[~valid]


def compare(candidate: torch.Tensor, baseline: torch.Tensor, reference: torch.Tensor, *,
            valid: torch.Tensor | None, dtype: torch.dtype, language_model: bool,
            reference_name: str = "float64 eager", check_reference: bool = True) -> Accuracy:
    """Judge ``candidate`` against ``baseline`` using the float64 ``reference`` (all [B, S, ...]),
    in float64 on the outputs' device. The reference is judged first (``check_reference``);
    one that fails hands the verdict to the same-dtype rule or "cannot verify". Non-finite
    candidate values at real tokens fail."""
    cand, cand_pad = _rows(candidate.double(), valid)
    base, base_pad = _rows(baseline.double(), valid)
    ref, _ = _rows(reference.double().to(candidate.device), valid)
    n = cand.shape[0]
    if n == 0 or not bool(torch.isfinite(ref).all()):
        return Accuracy(None, None, None, None, False, None, None, None, n, 0, None, reference_name,
                        note=f"not compared: the {reference_name} reference has NaN or inf at real tokens" if n
                        else "no real tokens to compare")
    diff = (cand - ref).abs()
    finite = bool(torch.isfinite(cand).all())
    err = float(diff.max()) if finite else float("inf")
    err_base = float((base - ref).abs().max())
    scale = float(ref.abs().max())
    bound = REFERENCE_FACTOR * torch.finfo(dtype).eps * scale
    if check_reference and not err_base <= bound:
        return _same_dtype(cand, base, cand_pad, base_pad, err_base, bound, dtype, reference_name)
    tol = 2.0 * err_base + torch.finfo(dtype).eps * scale
    top1 = None
    if language_model and cand.dim() == 2:
        top1 = float((cand.argmax(-1) == base.argmax(-1)).double().mean())
    pad_err = _pad_err(cand_pad, base_pad)
    return Accuracy(
        max_abs_err=err, max_rel_err=err / scale if scale else None,
        mean_abs_err=float(diff.mean()) if finite else float("inf"), tolerance=tol,
        passed=finite and err <= tol, baseline_max_abs_err=err_base,
        candidate_vs_baseline_max_abs_err=float((cand - base).abs().max()) if finite else float("inf"),
        top1_agreement=top1, compared_positions=n,
        padding_positions=0 if cand_pad is None else int(cand_pad.shape[0]), padding_max_abs_err=pad_err,
        reference=reference_name, note="" if finite else "the candidate's output has NaN or inf at real tokens",
        reference_error_bound=bound if check_reference else None, reference_trusted=True if check_reference else None)


def _pad_err(cand_pad: torch.Tensor | None, base_pad: torch.Tensor | None) -> float | None:
    if cand_pad is None or not cand_pad.numel():
        return None
    return float((cand_pad - base_pad).abs().nan_to_num(nan=float("inf")).max())


def _same_dtype(cand: torch.Tensor, base: torch.Tensor, cand_pad: torch.Tensor | None, base_pad: torch.Tensor | None,
                err_base: float, bound: float, dtype: torch.dtype, reference_name: str) -> Accuracy:
    """The reference failed its test (``err_base`` > ``bound``): judge [N, ...] real-token rows
    against the eager baseline by ``SAME_DTYPE_RULE``, or "cannot verify" where that is too loose."""
    eps = torch.finfo(dtype).eps
    why = (f"the {reference_name} reference is not the same function as the model in {str(dtype)[6:]}: the baseline's "
           f"own error {err_base:.1e} > {REFERENCE_FACTOR} x eps x max|ref| = {bound:.1e} (the model's code may pick a "
           "constant by dtype)")
    n, pads = cand.shape[0], 0 if cand_pad is None else int(cand_pad.shape[0])
    finite = bool(torch.isfinite(cand).all())
    if 2 * REFERENCE_FACTOR * eps >= SAME_DTYPE_LIMIT:
        acc = not_compared(f"cannot verify: {why}; and in {str(dtype)[6:]} the same-dtype rule's tolerance "
                           f"(2 x {REFERENCE_FACTOR} x eps = {2 * REFERENCE_FACTOR * eps:.2g} of the output's scale) "
                           "could not tell a wrong swap from rounding; rerun with --dtype float32", pads)
        acc.baseline_max_abs_err, acc.reference_error_bound, acc.reference_trusted = err_base, bound, False
        acc.compared_positions = n
        return acc
    scale = float(base.abs().max())
    tol = 2 * REFERENCE_FACTOR * eps * scale
    err = float((cand - base).abs().max()) if finite else float("inf")
    return Accuracy(
        max_abs_err=err, max_rel_err=err / scale if scale else None,
        mean_abs_err=float((cand - base).abs().mean()) if finite else float("inf"), tolerance=tol,
        passed=finite and err <= tol, baseline_max_abs_err=err_base, candidate_vs_baseline_max_abs_err=err,
        top1_agreement=None, compared_positions=n, padding_positions=pads,
        padding_max_abs_err=_pad_err(cand_pad, base_pad), reference=f"the eager baseline in {str(dtype)[6:]}",
        rule=SAME_DTYPE_RULE, note=why, reference_error_bound=bound, reference_trusted=False)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (the relative RMS error of a against b)."""
    a, b = a.double(), b.double().to(a.device)
    norm = float(b.norm())
    return float((a - b).norm()) / norm if norm else float("inf")


def precision_ratio(dtype: torch.dtype) -> float:
    """eps(e4m3) / eps(dtype): how much coarser FP8 rounds than ``dtype`` (16 for bf16)."""
    return E4M3_EPS / torch.finfo(dtype).eps


def compare_fp8(candidate: torch.Tensor, baseline: torch.Tensor, reference: torch.Tensor, *,
                valid: torch.Tensor | None, dtype: torch.dtype, language_model: bool,
                attention: list[dict[str, Any]] | None = None, reference_name: str = "float64 eager") -> Accuracy:
    """Judge an FP8-attention ``candidate`` [B, S, ...] by the FP8 rule (module docstring);
    ``attention``: per-layer errors from ``attention_errors`` (None: not judged)."""
    acc = compare(candidate, baseline, reference, valid=valid, dtype=dtype, language_model=language_model,
                  reference_name=reference_name)
    if acc.max_abs_err is None or acc.reference_trusted is False:
        acc.passed = False
        acc.note = acc.note if acc.note.startswith("cannot verify") else f"cannot verify by the FP8 rule: {acc.note}"
        return acc
    acc.rule, acc.precision = FP8_RULE, FP8
    cand, _ = _rows(candidate, valid)
    base, _ = _rows(baseline, valid)
    ref, _ = _rows(reference.to(candidate.device), valid)
    ratio = precision_ratio(dtype)
    acc.rel_rms_err, acc.baseline_rel_rms_err = rel_rms(cand, ref), rel_rms(base, ref)
    acc.rel_rms_vs_baseline = rel_rms(cand, base)
    acc.rel_rms_tolerance = acc.tolerance = ratio * acc.baseline_rel_rms_err
    passed = bool(torch.isfinite(cand).all()) and acc.rel_rms_err <= acc.rel_rms_tolerance
    if acc.top1_agreement is not None:
        n = cand.shape[0]
        base_flips = int((base.argmax(-1) != ref.argmax(-1)).sum())
        acc.baseline_top1_agreement = 1.0 - base_flips / n
        acc.min_top1_agreement = max(0.0, 1.0 - ratio * (base_flips + 1) / n)
        passed = passed and acc.top1_agreement >= acc.min_top1_agreement
    if attention is not None:
        acc.attention, acc.attention_tolerance = attention, E4M3_EPS
        passed = passed and bool(attention) and all(a["rel_rms"] <= E4M3_EPS for a in attention)
    acc.passed = passed
    return acc


def attention_errors(loaded: Any, inputs: Any, backend: str) -> list[dict[str, Any]]:
    """One forward pass of ``loaded`` with ``backend`` (registered with transformers), each
    attention call's output compared with float32 SDPA on its own q, k, v (k, v repeated to
    the query heads): per call ``{"layer", "rel_rms", "shape"}``."""
    from ..swap import registered

    errors: list[dict[str, Any]] = []

    def check(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
              causal: bool, scale: float | None) -> None:
        rep = query.shape[1] // key.shape[1]
        k, v = (t.float().repeat_interleave(rep, dim=1) for t in (key, value))  # [B, H, S_k, D]
        ref = torch.nn.functional.scaled_dot_product_attention(query.float(), k, v, is_causal=causal, scale=scale)
        errors.append({"layer": getattr(module, "layer_idx", len(errors)), "rel_rms": rel_rms(out.transpose(1, 2), ref),
                       "shape": list(query.shape)})

    with switch.using(loaded.model, backend), registered.observe(check), torch.inference_mode():
        loaded.forward(inputs)
    return errors


def judge(backend: str, candidate: torch.Tensor, baseline: torch.Tensor, reference: torch.Tensor, *,
          valid: torch.Tensor | None, dtype: torch.dtype, language_model: bool, loaded: Any = None,
          inputs: Any = None, reference_name: str = "float64 eager") -> Accuracy:
    """``compare``, or ``compare_fp8`` for an FP8 backend, with each layer's attention
    measured on ``loaded`` and ``inputs`` when given (one more forward pass)."""
    record = BACKENDS.get(backend)
    if record is None or record.precision != FP8:
        return compare(candidate, baseline, reference, valid=valid, dtype=dtype, language_model=language_model,
                       reference_name=reference_name)
    measurable = loaded is not None and inputs is not None and loaded.is_transformers  # registered function only
    attention = attention_errors(loaded, inputs, backend) if measurable else None
    return compare_fp8(candidate, baseline, reference, valid=valid, dtype=dtype, language_model=language_model,
                       attention=attention, reference_name=reference_name)


def not_compared(reason: str, padding_positions: int = 0) -> Accuracy:
    """An accuracy record for a run where no comparison could be made (``passed`` False)."""
    return Accuracy(None, None, None, None, False, None, None, None, 0, padding_positions, None, "", note=reason)


_LOW = (torch.float32, torch.float16, torch.bfloat16)
_CASTS = {"float", "half", "bfloat16"}


def _up(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.dtype in _LOW else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_up(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _up(v) for k, v in obj.items()}
    if obj in _LOW:
        return torch.float64
    return obj


class Float64Everywhere(TorchFunctionMode):
    """Inside the block every torch call computes in float64: lower floating arguments and
    ``dtype=`` are upcast, downcasts (``x.float()``, ``x.to(torch.float32)``) keep float64.
    For models that build float32 tensors inside forward (timestep embeddings, fp32 norms).
    An in-place update's target keeps its dtype (a KV cache stays as it was)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _CASTS and args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64:
            return args[0]
        if name.endswith("_") and not name.startswith("_") or name in ("__setitem__", "__iadd__", "__isub__",
                                                                           "__imul__", "__itruediv__", "copy_"):
            return func(args[0], *_up(tuple(args[1:])), **_up(kwargs))
        if name in ("to", "type") and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            return func(*args, **kwargs)
        return func(*_up(tuple(args)), **_up(kwargs))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _dtype_error(exc: BaseException) -> bool:
    """A failure of a plain float64 run because the model mixes dtypes (not a bug of the model)."""
    text = str(exc)
    return isinstance(exc, (RuntimeError, TypeError)) and any(t in text for t in (
        "dtype", "scalar type", "Float and Double", "Double and Float", "mixed dtype", "same type", "expected both",
        "Input type", "type of Float", "type of Double"))


def run_reference(model: nn.Module, run: Callable[[nn.Module, torch.dtype], Any], *, copy_model: bool = True,
                  low: torch.dtype = torch.float32) -> tuple[Any, str]:
    """Run ``run(model, dtype)`` as the reference: (output, which reference it was).

    1. float64: a deep copy cast to float64 (a KV cache written in place stays on the copy),
       then the model itself cast in place and restored bit for bit (a copy is not faithful
       where forward reaches submodules through a closure: minGPT's ``self.mlpf``);
       ``copy_model=False`` starts in place;
    2. on a dtype error of (1): the same under ``Float64Everywhere``;
    3. else ``low`` (the run's own dtype), said so.

    Under ``torch.no_grad`` (not inference mode: the model may update its own tensors).
    """
    attempts = []  # (copy or in place, op by op)
    if copy_model:
        try:
            attempts.append((copy.deepcopy(model), False))
        except Exception:  # a module that cannot be copied: cast in place only
            pass
    attempts += [(None, False), (attempts[0][0] if attempts else None, True)]
    errors = []
    for target, op_by_op in attempts:
        try:
            with (contextlib.nullcontext(target) if target is not None else exact_cast(model)), torch.no_grad(), \
                    default_dtype(torch.float64):
                m = target.double() if target is not None else model
                if not op_by_op:
                    return run(m, torch.float64), "float64 eager"
                with Float64Everywhere():
                    return run(m, torch.float64), ("float64 eager, op by op (the model builds lower-precision "
                                                   f"tensors inside forward: {one_line(errors[0], 120)})")
        except Exception as exc:
            if is_oom(exc) or not _dtype_error(exc):
                raise
            errors.append(one_line(exc))
    with torch.no_grad():
        out = run(model, low)
    return out, f"{str(low).replace('torch.', '')} eager (float64 did not run: {one_line(errors[-1], 120)})"


def reference_output(loaded: Any, inputs: Any, backend: str = "eager") -> torch.Tensor:
    """``reference`` without the name of the reference."""
    return reference(loaded, inputs, backend)[0]


def reference(loaded: Any, inputs: Any, backend: str = "eager") -> tuple[torch.Tensor, str]:
    """(output in float64 with ``backend`` attention, reference name) of a ``models.LoadedModel``,
    by ``run_reference``, or module by module for a model spread over devices
    (``exact_cast_per_module``); the attention implementation is put back after.

    A causal LM runs without the padding mask: exact for real tokens under right padding
    (causal attention never looks right), and it avoids NaN from a padded query past a
    sliding window (every key masked; ``finfo(float64).min`` overflows to -inf in
    transformers' float32 eager softmax) reaching real tokens in the next layer.

    Raises what the forward pass raises (out of memory included).
    """
    if loaded.family == "causal-lm" and "attention_mask" in inputs.kwargs:
        inputs = type(inputs)(inputs.batch_size, inputs.seq_len, inputs.args,
                              {k: v for k, v in inputs.kwargs.items() if k != "attention_mask"}, inputs.valid,
                              inputs.description)
    original = loaded.model

    def run(model, dtype):
        loaded.model = model
        try:
            return loaded.forward(inputs.cast(dtype), autocast=False).double()
        finally:
            loaded.model = original

    with switch.using(original, backend):
        if getattr(loaded, "device_map", None):  # spread over devices: each module in float64 only while it runs
            with exact_cast_per_module(original), torch.no_grad():
                return run(original, torch.float64), "float64 eager, cast module by module"
        # a transformers model is cast in place (large weights); others are copied (in-place state)
        return run_reference(original, run, copy_model=not loaded.is_transformers, low=loaded.dtype)


def judge_outputs(first: Any, second: Any, inputs: Any, baseline: str, candidate: str, labels: tuple[str, str],
                  reporter: Any, dtype: torch.dtype, sdpa_kernels: list[str] | None = None) -> Accuracy:
    """Run ``inputs`` through ``first`` with ``baseline``, ``second`` (``models.LoadedModel``,
    possibly the same) with ``candidate`` and ``first`` in float64; ``judge``. Raises
    ``OutOfMemory``, or ``CannotRun`` when the outputs differ in shape."""
    with oom_caught() as oom:
        with reporter.stage(f"running {labels[0]}"):
            base_out = run_backend(first, inputs, baseline, sdpa_kernels)
        with reporter.stage(f"running {labels[1]}"):
            cand_out = run_backend(second, inputs, candidate, sdpa_kernels)
        with reporter.stage("computing the float64 reference"):
            ref, ref_name = reference(first, inputs, "eager")
    if oom:
        raise OutOfMemory(f"batch {inputs.batch_size}, seq_len {inputs.seq_len}", oom.message)
    if cand_out.shape != base_out.shape:
        raise CannotRun(f"the outputs differ in shape: {labels[0]} gives {list(base_out.shape)}, {labels[1]} gives "
                        f"{list(cand_out.shape)}", "compare two models with the same architecture and vocabulary")
    return judge(candidate, cand_out, base_out, ref, valid=inputs.valid, dtype=dtype,
                 language_model=first.family == "causal-lm", loaded=second, inputs=inputs, reference_name=ref_name)


def reference_train(loaded: Any, inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + backward in float64 with eager attention and the runs' own loss weights:
    (output, gradients), both float64. The model's weights are restored exactly."""
    with switch.using(loaded.model, "eager"), exact_cast(loaded.model):
        out, grads = train_fn(loaded, inputs.cast(torch.float64))()
    for p in loaded.model.parameters():
        p.grad = None
    return out.double(), {k: v.double() for k, v in grads.items()}


def compare_gradients(candidate: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor],
                      reference: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    """The rule of ``compare`` applied to every gradient (parameters and floating inputs):
    passed when each one holds; reports the worst (largest error / tolerance)."""
    worst, failed, compared = None, [], 0
    for name, ref in reference.items():
        if name not in candidate or name not in baseline:
            failed.append(f"{name}: missing")
            continue
        # the reference is judged once, on the pass's outputs: a gradient's own max can be tiny
        acc = compare(candidate[name].reshape(1, -1), baseline[name].reshape(1, -1), ref.reshape(1, -1), valid=None,
                      dtype=dtype, language_model=False, reference_name="float64 eager", check_reference=False)
        compared += 1
        ratio = (acc.max_abs_err or 0.0) / acc.tolerance if acc.tolerance else float("inf")
        if worst is None or ratio > worst["ratio"]:
            worst = {"name": name, "ratio": ratio, "max_abs_err": acc.max_abs_err, "tolerance": acc.tolerance,
                     "baseline_max_abs_err": acc.baseline_max_abs_err}
        if not acc.passed:
            failed.append(name)
    evidence = (f"{compared} gradients; worst {worst['name']}: max_abs_err {worst['max_abs_err']:.1e} vs tol "
                f"{worst['tolerance']:.1e} (2 x baseline {worst['baseline_max_abs_err']:.1e} + eps)") if worst else \
        "no gradients to compare"
    if failed:
        evidence += "; outside tolerance: " + ", ".join(failed[:5]) + (" ..." if len(failed) > 5 else "")
    return {"compared": compared, "passed": not failed and compared > 0, "worst": worst, "failed": failed,
            "evidence": evidence}
