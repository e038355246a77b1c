"""The proof that a hand-written attention swap computes the same function, site by site.

``swap.live.Swapper`` finds the sites and installs rewrites; it never judges them. Here
each candidate is installed alone (``Swapper.trial``) and run on its module's own
captured inputs, in eval mode: the swapped output against the original's, judged with
``accuracy.compare`` against a float64 run of the original, with the profiler naming the
kernel that ran. A swap that raises or differs stays ``kept`` with the reason; then the
whole model runs with every verified swap installed (``verify_model``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..models import cast_floating, select_output
from .accuracy import compare, dropout_off, reference, run_reference
from .kernels import SDPA_OPS, attention_kernels, profiled
from .timing import run_backend, time_it
from ..report import one_line, said


NO_FUSED = "no fused attention kernel"


def verify_sites(swapper: Any, loaded: Any, inputs: Any, dtype: torch.dtype, backend: str = "sdpa") -> list:
    """Try every candidate site of ``swapper`` for ``backend`` (sdpa, flex_attention or a FlashAttention backend)
    one at a time on its module's own inputs, mark those that match ``swapped``, then check
    the whole model (``loaded``, a ``models.LoadedModel``) on ``inputs`` with them all
    installed (``verify_model``). Returns every site."""
    for live in swapper.candidates(backend):
        _verify_site(swapper, live, loaded, dtype, backend)
        unfused = live.status == "swapped" and live.kernel_after == NO_FUSED  # SDPA's math kernel: fix, not result
        if live.path == "source" and backend == "sdpa" and (unfused or live.status != "swapped" and (
                live.reason.startswith("the swapped code raised") or live.reason.startswith("outputs differ"))) \
                and swapper.fall_back(live, "its source rewrite ran SDPA's unfused math kernel" if unfused else
                                      f"its source rewrite failed its check: {live.reason}"):
            live.status, live.accuracy, live.kernel_after = "kept", None, ""
            live.reason = live.graph.reason_for(backend)  # e.g. a soft-cap only flex_attention takes
            if not live.reason:
                _verify_site(swapper, live, loaded, dtype, backend)  # the graph path's rewrite, proven the same way
    swapper.revert()
    verify_model(swapper, loaded, inputs, dtype)
    return list(swapper.sites.values())


def _verify_site(swapper: Any, live: Any, loaded: Any, dtype: torch.dtype, backend: str) -> None:
    """Try ``live``'s swap alone on its module's own inputs: ``swapped`` when the output
    matches the original's and the new call ran, else ``kept`` with the reason."""
    args, kwargs = swapper.module_inputs(live)
    module = live._module  # type: ignore[attr-defined]
    was_training = module.training
    module.eval()
    mode = grad_mode(module, args, kwargs)
    try:
        with mode(), autocast_of(loaded):
            base = select_output(module(*args, **kwargs))

        def run(m, dt):
            with mode():
                return select_output(m(*cast_floating(args, dt), **cast_floating(kwargs, dt))).double()

        ref, ref_name = run_reference(module, run, low=loaded.input_dtype)
        try:
            with swapper.trial(live), mode(), autocast_of(loaded), profiled() as prof:
                cand = select_output(module(*args, **kwargs))
        except Exception as exc:
            live.reason = f"the swapped code raised {said(exc, 200)}"
            return
        acc = compare(cand, base, ref, valid=None, dtype=dtype, language_model=False,
                      reference_name=ref_name.replace("eager", "original"))
        live.accuracy = acc.to_dict()
        seen = attention_kernels(prof.events())
        kernels = [k for k in seen if ("scaled_dot_product" in k and "math" not in k) or "flash" in k
                   or k.endswith("(compiled)")]
        live.kernel_after = ", ".join(sorted(set(kernels))) or NO_FUSED
        if not acc.passed:
            live.reason = f"outputs differ after the swap: {acc.evidence()}"
            return
        if not ran_new_call(seen, backend):
            # the rewrite kept the original path for these inputs (a run-time guard for a
            # construct SDPA cannot take): the same output proves nothing about the swap
            live.reason = (f"the swapped code did not call {backend} on the module's own inputs: the profiler saw "
                           f"{', '.join(sorted(seen)) or 'no attention op'} (its original path ran, behind a "
                           "run-time guard)")
            return
        live.status = "swapped"
    finally:
        module.train(was_training)


def ran_new_call(seen: Any, backend: str) -> bool:
    """Did the profiler (``kernels.attention_kernels`` counts) see ``backend``'s call run: an
    SDPA op for sdpa (any of its kernels: which one is the kernels check's business), the
    library's op for the others (``Backend.kernel_markers``)?"""
    from ..backends import BACKENDS

    if backend == "sdpa":
        return any("scaled_dot_product" in k or k in SDPA_OPS for k in seen)
    return any(m in k for k in seen for m in BACKENDS[backend].kernel_markers)


def grad_mode(module: torch.nn.Module, args: tuple, kwargs: dict):
    """torch.no_grad, or torch.inference_mode when the module's state or inputs are inference
    tensors (a model whose own forward runs under @torch.inference_mode and writes a cache in
    place): such tensors can only be updated in place inside inference mode."""
    from torch.utils._pytree import tree_flatten

    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    for m in module.modules():
        tensors += [v for v in vars(m).values() if isinstance(v, torch.Tensor)] + list(m.buffers(recurse=False))
    return torch.inference_mode if any(t.is_inference() for t in tensors) else torch.no_grad


def autocast_of(loaded: Any):
    """torch.autocast when the model runs that way (``LoadedModel.autocast``), else nothing."""
    import contextlib

    if getattr(loaded, "autocast", None) is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(loaded.device).type, dtype=loaded.autocast)


def verify_model(swapper: Any, loaded: Any, inputs: Any, dtype: torch.dtype) -> None:
    """Run the whole model with every verified swap installed, against the original: a
    swap that changes what a function returns (the attention weights, now None) is only
    safe when no caller uses them. On a failure, such swaps are reverted and the model is
    checked again; if it still fails, every swap is reverted."""

    def check() -> str:
        # dropout off: in training mode two passes (and the float64 one) would draw other masks
        with dropout_off(loaded.model):
            try:
                base = run_backend(loaded, inputs, "eager")
                cand = run_backend(loaded, inputs, swapper.target)
            except Exception as exc:
                return f"the model raised {type(exc).__name__} with the swaps: {one_line(exc, 160)}"
            finally:
                swapper.revert()
            ref, name = reference(loaded, inputs, "eager")
        acc = compare(cand, base, ref, valid=inputs.valid, dtype=dtype, language_model=False,
                      reference_name=name.replace("eager", "original"))
        return "" if acc.passed else f"the model's output differs with the swaps: {acc.evidence()}"

    if not any(s.status == "swapped" for s in swapper.sites.values()):
        return
    problem = check()
    if not problem:
        return
    changed = [s for s in swapper.sites.values() if s.status == "swapped" and s.site is not None and
               any("returned the attention" in n for n in s.site.notes)]
    for s in changed:
        s.status, s.reason = "kept", f"its caller uses the attention weights it returns ({problem})"
    if changed and not check():
        return
    for s in swapper.sites.values():
        if s.status == "swapped":
            s.status, s.reason = "kept", problem


def module_timings(swapper: Any, min_run_time: float) -> list[dict[str, Any]]:
    """Each swapped attention module alone, on its captured inputs: median forward time
    (ms) before and after the swap (``timing.time_it``)."""
    out = []
    seen = set()
    for live in swapper.sites.values():
        module = live._module  # type: ignore[attr-defined]
        if live.status != "swapped" or id(module) in seen or module not in swapper.inputs:
            continue
        seen.add(id(module))
        args, kwargs = swapper.inputs[module]
        mode = grad_mode(module, args, kwargs)  # a cache made under inference mode is written there

        def call():
            with mode():
                return module(*args, **kwargs)

        swapper.revert()
        before = time_it(call, min_run_time, "eager")[0]
        swapper.apply(swapper.target)
        after = time_it(call, min_run_time, swapper.target)[0]
        swapper.revert()
        out.append({"module": live.module_name, "eager_ms": before, "swapped_ms": after,
                    "speedup": before / after if after else None})
    return out
