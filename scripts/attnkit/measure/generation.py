"""Generation the way users run it: ``model.generate`` with a KV cache, greedy, timed in two parts.

Prefill and decode (ms). Two greedy ``generate`` calls on the same prompt [B, P], timed
in turn over ``timing.PAIRED_ROUNDS`` rounds by ``torch.utils.benchmark`` (``timing.paired``:
each warmed up first, then one block of each per round, CUDA synchronised), so a machine
slowing down for a while slows both calls of a round alike::

    prefill_ms          = generate(max_new_tokens=1)   # one forward over the prompt, one token picked
    generate_ms         = generate(max_new_tokens=N)   # the same, then N - 1 decode steps
    decode_ms_per_token = median over rounds of (generate_ms - prefill_ms) / (N - 1)
    decode_tokens_per_s = B * 1000 / decode_ms_per_token   # every row of the batch gets a token per step

Both calls go through the same ``generate`` code (logits processors, stopping criteria,
the cache set-up), so what the difference leaves is the decode steps themselves, one
token each, reading the KV cache. ``min_new_tokens = max_new_tokens``: every run decodes
exactly N tokens, an end-of-sequence token never stops one early. This is how
huggingface/optimum-benchmark splits them (``scenarios/inference/scenario.py``: prefill is
``generate`` with ``max_new_tokens=min_new_tokens=1``, decode = generate - prefill). We
chose it over timestamping tokens with a streamer: a streamer gets each token with
``.cpu()``, a synchronisation per step that ``generate`` itself avoids on CUDA (its
deferred stop check), so it would change what it measures.

Caches: ``dynamic`` is transformers' default ``DynamicCache`` (grows by concatenation);
``static`` is a ``StaticCache(config, max_cache_len=P + N)`` made inside every timed call,
as ``generate(cache_implementation="static")`` would, so its allocation is part of both
calls and cancels out of the decode figure. transformers compiles the decode step of a
static cache on CUDA by default; ``compile=False`` (the default here) turns that off
(``GenerationConfig.disable_compile``), so every backend is timed as eager PyTorch and the
run takes seconds, not minutes; ``compile=True`` keeps transformers' default and its first
(compiling) call is the untimed warm-up.

Peak memory (MB = 2**20 bytes): during one ``generate`` of N tokens, above what was
allocated before it (the weights and the prompt); on CUDA ``max_memory_allocated``, on CPU
the running sum of the profiler's memory events (``timing.profile_once``, which also
records the attention kernels that ran: the evidence of which backend decoded).

KV cache (MB): ``2 x layers x kv_heads x head_dim x tokens x batch x bytes`` from the
config, cross-checked with the tensors of the cache object ``generate`` returns.

Greedy agreement: a left-padded batch of 4 prompts of different lengths; the fraction of
generated tokens equal to eager's (prompts and their padding are not generated, so they
are never compared). Where a row first differs, the two backends had the same prefix, so
their logits at that step are comparable: ``first_divergence`` judges both against a
float64 eager run of that row's prefix with ``accuracy.compare`` (the candidate's error
within 2 x eager's own error + eps(dtype) x max|ref|), which says whether the flip is a
near-tie that rounding explains or a wrong result.

Longest context: ``longest_context`` searches the longest prompt for which prefill plus a
few decode steps fit, under a memory limit (see its docstring for how it is enforced).
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..env import dtype_name
from ..report import CannotRun, NoMemoryBound, said
from ..swap import switch
from .accuracy import compare, exact_cast
from .timing import (Measurement, cap_cuda_memory, fits_in_memory, free_memory, is_oom, oom_message, paired,
                     profile_once, quartiles, search_longest, synchronize, time_it)

CACHES = ("dynamic", "static")

#: The left-padded agreement batch: 4 prompts, the longest of this many tokens (or half the
#: model's maximum, if less), the others 3/4, 1/2 and 1/4 of it.
AGREEMENT_ROWS = 4
AGREEMENT_LEN = 64

KV_FORMULA = "2 x layers x kv_heads x head_dim x tokens x batch x bytes"


@dataclass
class GenerationRun:
    """One backend, one cache kind, one batch size and prompt length. ``error`` set: it could not run."""

    backend: str
    cache: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    prefill_ms: float | None = None
    prefill_iqr_ms: float | None = None
    generate_ms: float | None = None
    generate_iqr_ms: float | None = None
    decode_ms_per_token: float | None = None
    decode_tokens_per_s: float | None = None
    peak_memory_mb: float | None = None
    kv_cache_mb: float | None = None  # from the config, for P + N tokens
    kv_cache_measured_mb: float | None = None  # the tensors of the cache object
    kv_cache_tokens: int | None = None  # tokens the cache object holds
    kv_cache_matches_formula: bool | None = None  # measured bytes == the formula at kv_cache_tokens
    kernels: dict[str, int] = field(default_factory=dict)
    compiled: bool = False
    decode_floor_ms: float | None = None  # the memory floor of one decode step (decode_floor_ms)
    floor_percent: float | None = None  # 100 x decode_floor_ms / decode_ms_per_token
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- inputs and calls

def pad_id(loaded: Any) -> int:
    """The pad token id: the tokenizer's, the config's, else the end-of-sequence id, else 0."""
    tok = loaded.tokenizer
    for value in (getattr(tok, "pad_token_id", None), getattr(loaded.text_config, "pad_token_id", None),
                  getattr(loaded.text_config, "eos_token_id", None)):
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


def prompt(loaded: Any, batch_size: int, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, P], no padding (``LoadedModel.inputs``'s tokens)."""
    kw = loaded.inputs(batch_size, prompt_len, 0.0).kwargs
    return kw["input_ids"], kw["attention_mask"]


def left_padded(loaded: Any, rows: int = AGREEMENT_ROWS, longest: int = AGREEMENT_LEN
                ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A left-padded batch [rows, longest]: row i holds ``longest * (1 - 0.75 i / (rows-1))``
    real tokens at the right end, pad ids and mask 0 before them; returns (ids, mask, lengths)."""
    inputs = loaded.inputs(rows, longest, 0.75)  # right-padded, row lengths 1, 3/4, 1/2, 1/4
    ids, mask = inputs.kwargs["input_ids"], inputs.kwargs["attention_mask"]
    lengths = [int(n) for n in mask.sum(-1).tolist()]
    out_ids = torch.full_like(ids, pad_id(loaded))
    out_mask = torch.zeros_like(mask)
    for r, n in enumerate(lengths):
        out_ids[r, longest - n:] = ids[r, :n]
        out_mask[r, longest - n:] = 1
    return out_ids, out_mask, lengths


def generation_config(loaded: Any, new_tokens: int, *, compile: bool = False, logits: bool = False) -> Any:
    """Greedy decoding of exactly ``new_tokens`` tokens (a copy of the model's own config);
    ``logits``: return them, one [B, V] per step (``output_logits``)."""
    gc = copy.deepcopy(loaded.model.generation_config)
    gc.max_new_tokens = new_tokens
    gc.min_new_tokens = new_tokens  # no early stop at an end-of-sequence token
    gc.do_sample = False
    gc.num_beams = 1
    gc.cache_implementation = None  # dynamic: generate's default DynamicCache; static: we pass the cache object
    gc.disable_compile = not compile
    if gc.pad_token_id is None:
        gc.pad_token_id = pad_id(loaded)
    gc.return_dict_in_generate = logits
    gc.output_logits = logits
    for name in ("temperature", "top_p", "top_k"):  # sampling settings: unused by greedy, and warned about
        if hasattr(gc, name):
            setattr(gc, name, None)
    return gc


def make_cache(model: Any, cache: str, max_cache_len: int) -> Any:
    """A fresh ``StaticCache`` for ``cache == "static"``, None (generate's DynamicCache) otherwise."""
    if cache != "static":
        return None
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


def generate_fn(loaded: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, cache: str, *,
                compile: bool = False, logits: bool = False, max_cache_len: int | None = None,
                keep: dict[str, Any] | None = None) -> Callable[[], Any]:
    """A closure running one greedy ``generate`` of ``new_tokens`` tokens of ``loaded.model``
    on (ids, mask) [B, P] with a ``cache`` KV cache (a new one per call, ``max_cache_len``
    tokens for a static one); returns generate's output. ``keep``: the cache object is
    stored there as ``keep["cache"]`` after the call."""
    model = loaded.model
    gc = generation_config(loaded, new_tokens, compile=compile, logits=logits)
    if keep is not None:
        gc.return_dict_in_generate = True  # so that a DynamicCache comes back
    cache_len = max_cache_len or ids.shape[1] + new_tokens

    def run() -> Any:
        kv = make_cache(model, cache, cache_len)
        kw = {"past_key_values": kv} if kv is not None else {}
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc, **kw)
        if keep is not None:
            keep["cache"] = kv if kv is not None else getattr(out, "past_key_values", None)
        return out

    return run


# ----------------------------------------------------------------------------- KV cache size

def kv_cache_bytes(shape: dict[str, Any], tokens: int, batch_size: int, dtype: torch.dtype) -> int:
    """``2 x layers x kv_heads x head_dim x tokens x batch x bytes`` (keys and values of every layer)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * tokens * batch_size * itemsize


def cache_tensors(cache: Any) -> tuple[int, int | None]:
    """(bytes of every key and value tensor, tokens held by the first layer) of a transformers
    cache object; (0, None) when it has none."""
    layers = getattr(cache, "layers", None) or []
    total, tokens = 0, None
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
                if tokens is None and t.dim() == 4:
                    tokens = int(t.shape[-2])
    return total, tokens


# ----------------------------------------------------------------------------- timing one configuration

def measure_generation(loaded: Any, backend: str, *, batch_size: int, prompt_len: int, new_tokens: int, cache: str,
                       min_run_time: float = 1.0, compile: bool = False, bandwidth: float | None = None
                       ) -> GenerationRun:
    """Time prefill and decode of ``backend`` (see the module docstring) and measure peak
    memory, the attention kernels that ran and the KV cache, for one configuration.
    ``bandwidth`` (bytes/s, ``copy_bandwidth``): also the decode step's memory floor and the
    percentage of it reached.

    Out of memory, any error of the backend, or transformers refusing the switch to it, is
    recorded in ``GenerationRun.error``; the caller goes on with the next run.
    """
    g = GenerationRun(backend, cache, batch_size, prompt_len, new_tokens, compiled=compile)
    try:
        with switch.using(loaded.model, backend):
            _time_generation(loaded, g, min_run_time)
    except CannotRun as exc:  # transformers refused it for this model: this backend's result, not the step's
        g.error = exc.message
        return g
    shape = loaded.attention_shape()
    if bandwidth and g.decode_ms_per_token and shape and shape.get("head_dim"):
        g.decode_floor_ms = decode_floor_ms(weight_bytes_per_token(loaded.model),
                                            kv_cache_bytes(shape, 1, 1, loaded.dtype), prompt_len, new_tokens,
                                            batch_size, bandwidth)
        g.floor_percent = 100.0 * g.decode_floor_ms / g.decode_ms_per_token
    return g


def _median_iqr(samples: list[float]) -> tuple[float, float | None]:
    """(median, IQR or None with fewer than 4 samples) of ``paired``'s round medians (ms)."""
    q1, median, q3 = quartiles(samples)
    return median, (q3 - q1) if len(samples) >= 4 else None


def _time_generation(loaded: Any, g: GenerationRun, min_run_time: float) -> GenerationRun:
    """``measure_generation``'s body, on a model already switched to ``g.backend``."""
    device, backend, batch_size, prompt_len = loaded.device, g.backend, g.batch_size, g.prompt_len
    new_tokens, cache, compile = g.new_tokens, g.cache, g.compiled
    shape = loaded.attention_shape()
    if shape and shape.get("head_dim"):
        g.kv_cache_mb = kv_cache_bytes(shape, prompt_len + new_tokens, batch_size, loaded.dtype) / 2**20
    ids, mask = prompt(loaded, batch_size, prompt_len)
    cache_len = prompt_len + new_tokens
    full = generate_fn(loaded, ids, mask, new_tokens, cache, compile=compile, max_cache_len=cache_len)
    first = generate_fn(loaded, ids, mask, 1, cache, compile=compile, max_cache_len=cache_len)
    try:
        # interleaved rounds: a stretch of load (another process taking the CPU) lands on both
        # calls of a round, and the median of the per-round differences leaves it out
        rounds = paired({"generate": (contextlib.nullcontext, full), "prefill": (contextlib.nullcontext, first)},
                        min_run_time)
        g.generate_ms, g.generate_iqr_ms = _median_iqr(rounds["generate"])
        g.prefill_ms, g.prefill_iqr_ms = _median_iqr(rounds["prefill"])
        decode = statistics.median(a - b for a, b in zip(rounds["generate"], rounds["prefill"]))
        kept: dict[str, Any] = {}
        m = Measurement(backend)
        profile_once(generate_fn(loaded, ids, mask, new_tokens, cache, compile=compile, max_cache_len=cache_len,
                                 keep=kept), device, m)
        g.peak_memory_mb, g.kernels = m.peak_memory_mb, m.kernel_counts
        measured, tokens = cache_tensors(kept.pop("cache", None))
        if measured:
            g.kv_cache_measured_mb, g.kv_cache_tokens = measured / 2**20, tokens
            if shape and shape.get("head_dim") and tokens:
                g.kv_cache_matches_formula = measured == kv_cache_bytes(shape, tokens, batch_size, loaded.dtype)
    except Exception as exc:  # out of memory, or the backend failing in generate: recorded, the run goes on
        g.error = oom_message(exc) if is_oom(exc) else f"{said(exc, 300)}"
        free_memory(device)
        return g
    if new_tokens < 2:
        g.error = "decode not measured: it needs --new-tokens 2 or more"
    elif decode <= 0:
        g.error = (f"decode time not resolved: generate of {new_tokens} tokens ({g.generate_ms:.2f} ms) was not "
                   f"slower than prefill ({g.prefill_ms:.2f} ms) in the median round; raise --new-tokens or "
                   f"--min-run-time")
    else:
        g.decode_ms_per_token = decode / (new_tokens - 1)
        g.decode_tokens_per_s = batch_size * 1000.0 / g.decode_ms_per_token
    free_memory(device)
    return g


# ----------------------------------------------------------------------------- greedy agreement

@dataclass
class Greedy:
    """What one backend generated for the left-padded batch: tokens [rows, N] and the raw
    logits of every step ([rows, V] each, float32), or the error that stopped it."""

    backend: str
    cache: str
    tokens: torch.Tensor | None = None
    logits: list[torch.Tensor] | None = None
    error: str | None = None


def _recorded(kind: type, loaded: Any, backend: str, cache: str, run: Callable[[], tuple]) -> Any:
    """``kind(backend, cache, *run())`` (``Greedy``, ``Forced``) with ``backend`` switched in;
    an error (out of memory, the backend failing, transformers refusing the switch) is
    recorded in ``kind.error``, not raised."""
    try:
        with switch.using(loaded.model, backend):
            return kind(backend, cache, *run())
    except CannotRun as exc:
        return kind(backend, cache, error=exc.message)
    except Exception as exc:
        free_memory(loaded.device)
        return kind(backend, cache, error=oom_message(exc) if is_oom(exc) else said(exc, 300))


def greedy(loaded: Any, backend: str, cache: str, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> Greedy:
    """Greedy tokens and logits of ``backend`` on a (left-padded) batch (``_recorded``)."""
    def run() -> tuple:
        out = generate_fn(loaded, ids, mask, new_tokens, cache, logits=True)()
        synchronize(loaded.device)
        return out.sequences[:, ids.shape[1]:].cpu(), [t.float().cpu() for t in out.logits]

    return _recorded(Greedy, loaded, backend, cache, run)


def reference_logits(loaded: Any, tokens: torch.Tensor) -> torch.Tensor:
    """The next-token logits [V] after ``tokens`` [n] (one row, no padding), in float64 with
    eager attention; the weights are cast and restored exactly (``accuracy.exact_cast``)."""
    with switch.using(loaded.model, "eager"), exact_cast(loaded.model), torch.inference_mode():
        out = loaded.model(input_ids=tokens[None].to(loaded.device), use_cache=False)
    return out.logits[0, -1].double().cpu()


def agreement(loaded: Any, base: Greedy, cand: Greedy, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """``cand``'s greedy tokens against ``base``'s (eager's): the fraction equal, and for each
    row that differs, its first divergent step judged against a float64 reference.

    A divergence is ``near_tie`` when at that step (same prefix in both runs) the
    candidate's logits are within 2 x eager's own error + eps(dtype) x max|ref| of the
    float64 logits (``accuracy.compare``): the candidate is as accurate as eager there,
    and the two top tokens were closer than rounding can separate.
    """
    equal = cand.tokens == base.tokens
    rows = []
    for r in range(equal.shape[0]):
        wrong = (~equal[r]).nonzero().flatten().tolist()
        if not wrong:
            continue
        k = wrong[0]
        a, b = int(base.tokens[r, k]), int(cand.tokens[r, k])
        real = ids[r][mask[r].bool()].cpu()
        ref = reference_logits(loaded, torch.cat([real, base.tokens[r, :k]]))
        judged = compare(cand.logits[k][r][None, None], base.logits[k][r][None, None], ref[None, None], valid=None,
                         dtype=loaded.dtype, language_model=False)
        rows.append({"row": r, "prompt_len": len(real), "first_divergence": k, "eager_token": a, "token": b,
                     "eager_margin": float(base.logits[k][r][a] - base.logits[k][r][b]),
                     "reference_margin": float(ref[a] - ref[b]),
                     "reference_prefers": "eager" if ref[a] > ref[b] else "candidate" if ref[b] > ref[a] else "tie",
                     "max_abs_err": judged.max_abs_err, "eager_max_abs_err": judged.baseline_max_abs_err,
                     "tolerance": judged.tolerance, "near_tie": judged.passed})
    return {"backend": cand.backend, "cache": cand.cache, "agreement": float(equal.double().mean()),
            "tokens_compared": int(equal.numel()), "rows_differing": len(rows), "divergences": rows}


# ----------------------------------------------------------------------------- teacher-forced agreement

@dataclass
class Forced:
    """Next-token logits of one configuration fed the same tokens at every step: ``logits``
    is [rows, N, V] (float32, on the CPU), step k's row the logits after the prompt and the
    first k forced tokens; or the error that stopped it."""

    backend: str
    cache: str
    logits: torch.Tensor | None = None
    error: str | None = None


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """position_ids [B, S] of a left-padded batch, as ``generate`` derives them: the count of
    real tokens before each one; 1 at padding (never attended to)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _parameters(model: Any) -> set[str]:
    """The names the model's forward takes (empty when it cannot be read)."""
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _keeps_last(model: Any) -> dict[str, Any]:
    """``{"logits_to_keep": 1}`` where the model's forward takes it (only the last position's
    logits are made: [B, 1, V] rather than [B, P, V]), else {}."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _parameters(model) else {}


def forced_logits(loaded: Any, cache: str, ids: torch.Tensor, mask: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Teacher-forced decoding with a KV cache: prefill (ids, mask) [rows, P], then N - 1
    decode steps of one token each, step k feeding ``forced[:, k - 1]`` ([rows, N] tokens)
    whatever the model predicted. Returns the next-token logits [rows, N, V] (float32, CPU).

    The calls are the ones ``generate`` makes (the cache object, ``cache_position``,
    position_ids from the padding mask, the mask grown by one column per step), without its
    token choice, so every configuration is judged on one token sequence."""
    model = loaded.model
    rows, p = ids.shape
    n = forced.shape[1]
    kv = make_cache(model, cache, p + n)
    if kv is None:
        from transformers import DynamicCache

        kv = DynamicCache(config=model.config)
    keep = _keeps_last(model)
    # transformers 5.17 renamed the forward's past_key_values to cache (the old name warns)
    keep["cache" if "cache" in _parameters(model) else "past_key_values"] = kv
    device = ids.device
    out = []
    with torch.inference_mode():
        step_ids, step_mask, pos = ids, mask, _positions(mask)
        cache_position = torch.arange(p, device=device)
        for k in range(n):
            logits = model(input_ids=step_ids, attention_mask=step_mask, position_ids=pos, use_cache=True,
                           cache_position=cache_position, **keep).logits
            out.append(logits[:, -1].float().cpu())
            step_ids = forced[:, k:k + 1].to(device)
            step_mask = torch.cat([step_mask, step_mask.new_ones(rows, 1)], dim=-1)
            pos = pos[:, -1:] + 1
            cache_position = cache_position[-1:] + 1
    return torch.stack(out, dim=1)


def teacher_forced(loaded: Any, backend: str, cache: str, ids: torch.Tensor, mask: torch.Tensor,
                   forced: torch.Tensor) -> Forced:
    """``forced_logits`` of ``backend`` with a ``cache`` KV cache (``_recorded``)."""
    return _recorded(Forced, loaded, backend, cache, lambda: (forced_logits(loaded, cache, ids, mask, forced),))


def forced_reference(loaded: Any, ids: torch.Tensor, mask: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """What ``forced_logits`` should give, computed without a cache: per row, one float64
    eager forward over that row's real prompt tokens and the forced tokens (no padding: in
    float64 a fully masked padding row overflows to NaN and spreads through ``0 x NaN``), the
    weights cast and restored exactly (``accuracy.exact_cast``). Returns the logits after
    the prompt and after each forced token but the last, [rows, N, V] float64 on the CPU."""
    n = forced.shape[1]
    out = []
    with switch.using(loaded.model, "eager"), exact_cast(loaded.model), torch.inference_mode():
        for r in range(ids.shape[0]):
            real = ids[r][mask[r].bool()]
            seq = torch.cat([real, forced[r, :n - 1].to(real.device)])[None]
            logits = loaded.model(input_ids=seq, use_cache=False).logits
            out.append(logits[0, len(real) - 1:].double().cpu())
    return torch.stack(out)


def forced_agreement(base: Forced, cand: Forced, reference: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """Per step, ``cand``'s teacher-forced logits against the float64 ``reference`` with
    ``accuracy.compare`` (the step passes when the candidate's error is within 2 x eager's
    own error at that step + eps(dtype) x max|ref|; an untrusted reference falls to the
    same-dtype rule). ``agreement`` = the fraction of steps that pass; the worst step is
    reported with its error and tolerance."""
    steps = []
    for k in range(reference.shape[1]):
        judged = compare(cand.logits[:, k][:, None], base.logits[:, k][:, None], reference[:, k][:, None], valid=None,
                         dtype=dtype, language_model=False)
        steps.append(judged)
    passed = [s for s in steps if s.passed]
    worst_k = max(range(len(steps)), key=lambda i: (not steps[i].passed,
                                                     (steps[i].max_abs_err or 0.0) / (steps[i].tolerance or 1.0)))
    worst = steps[worst_k]
    return {"backend": cand.backend, "cache": cand.cache, "agreement": len(passed) / len(steps), "steps": len(steps),
            "steps_failed": len(steps) - len(passed), "worst_step": worst_k, "worst_max_abs_err": worst.max_abs_err,
            "worst_eager_max_abs_err": worst.baseline_max_abs_err, "worst_tolerance": worst.tolerance,
            "reference": worst.reference, "note": worst.note}


# ----------------------------------------------------------------------------- the memory floor

FLOOR_FORMULA = ("decode floor per step = (weight bytes read + KV-cache bytes at P + N/2 tokens x batch) / copy "
                 "bandwidth measured in this run; % of floor = floor / decode ms per token")

#: Bytes copied by ``copy_bandwidth``: large enough to leave every cache (an H200's L2 is
#: 50 MB; a server CPU's L3 a few hundred MB at most).
BANDWIDTH_BYTES = 512 * 2**20


def copy_bandwidth(device: str, min_run_time: float = 0.3, nbytes: int = BANDWIDTH_BYTES) -> float:
    """Usable memory bandwidth (bytes/s) of ``device``, measured: a device-to-device copy of
    ``nbytes`` (one read and one write of each byte) timed by ``time_it``; 2 x nbytes /
    median time. This is what the decode floor divides by: what this machine moves, not a
    data-sheet peak."""
    buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
    median_ms, _, _ = time_it(lambda: buffers[1].copy_(buffers[0]), min_run_time, "copy bandwidth")
    buffers.clear()
    free_memory(device)
    return 2 * nbytes / (median_ms / 1e3)


def weight_bytes_per_token(model: Any) -> int:
    """Bytes of parameters one decode step reads: every parameter, except an input embedding
    table that is not tied to the output (a step reads one row of it, not the table)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and (out is None or getattr(out, "weight", None) is not weight):
        total -= weight.numel() * weight.element_size()
    return total


def decode_floor_ms(weights: int, kv_per_token: int, prompt_len: int, new_tokens: int, batch_size: int,
                    bandwidth: float) -> float:
    """The memory floor of one decode step (ms): (weight bytes + KV-cache bytes read) /
    bandwidth, the KV cache read at its mean length over the decode steps, P + N / 2 tokens,
    for every row of the batch. ``kv_per_token``: bytes of keys and values of one token of one
    row, all layers (``kv_cache_bytes(shape, 1, 1, dtype)``)."""
    kv = kv_per_token * (prompt_len + new_tokens / 2) * batch_size
    return (weights + kv) / bandwidth * 1e3


# ----------------------------------------------------------------------------- longest context

def fits_fn(loaded: Any, backend: str, batch_size: int, new_tokens: int) -> Callable[[int], bool]:
    """``fits(P)``: True when prefill of [batch, P] plus ``new_tokens`` decode steps (dynamic
    cache) runs; False on out-of-memory; other errors propagate."""
    def fits(p: int) -> bool:
        with switch.using(loaded.model, backend):
            return fits_in_memory(lambda: generate_fn(loaded, *prompt(loaded, batch_size, p), new_tokens, "dynamic")(),
                                  loaded.device)

    return fits


def context_cap(loaded: Any, new_tokens: int) -> tuple[int, str]:
    """The longest prompt the model's positions allow with ``new_tokens`` more, and why."""
    limit = loaded.max_seq_len()
    if limit:
        return limit - new_tokens, f"the model's max_position_embeddings ({limit}) minus {new_tokens} new tokens"
    return 1 << 20, "no position limit in the config: searched up to 1M tokens"


def longest_context(loaded: Any, backend: str, *, batch_size: int = 1, new_tokens: int = 4,
                    memory_limit_gb: float | None = None, trust_remote_code: bool = False,
                    start: int = 512) -> dict[str, Any]:
    """The longest prompt that fits for ``backend``: prefill plus ``new_tokens`` decode steps.

    How the limit is enforced:

    * CUDA: in this process, with ``torch.cuda.set_per_process_memory_fraction`` =
      limit / the GPU's total memory (the whole process: weights included); without a
      limit, the GPU's own memory. The fraction is put back to 1.0 afterwards.
    * CPU: in a child process that loads the same spec, warms up, then sets
      ``resource.RLIMIT_AS`` to its mapped address space + the limit, so every allocation
      past it fails for real (the kernel refuses the mapping); without a limit, the
      ``MemAvailable`` of /proc/meminfo. The child's allocator is made steady
      (``steady_malloc``), so memory freed after a failed probe is unmapped and the next
      probe starts from the same address space. On CPU the limit is what the search may add beyond
      the loaded process: a torch process maps far more address space than it uses, so a
      total would mean nothing.

    Never probes past the model's ``max_position_embeddings`` (``capped`` says that was
    the cap). Returns the ``search_longest`` result plus the limit and how it was enforced;
    ``error`` when the search itself failed.
    """
    cap, cap_why = context_cap(loaded, new_tokens)
    info: dict[str, Any] = {"backend": backend, "batch_size": batch_size, "new_tokens": new_tokens,
                            "cap": cap, "cap_reason": cap_why, "resolution": "1/64 of the longest fit"}
    try:
        if loaded.device.startswith("cuda"):
            result = _longest_cuda(loaded, backend, batch_size, new_tokens, memory_limit_gb, cap, start, info)
        else:
            result = _longest_cpu(loaded, backend, batch_size, new_tokens, memory_limit_gb, cap, start, info,
                                  trust_remote_code)
    except CannotRun as exc:  # a --memory-limit above the GPU's memory, or the switch refused
        info["error"] = exc.message
        return info
    except Exception as exc:
        info["error"] = f"{said(exc, 300)}"
        return info
    info.update(result)
    if info.get("max_context") == 0:
        info["error"] = f"not even a {min(p['prompt_len'] for p in info['probes'])}-token prompt fits"
    return info


def _longest_cuda(loaded: Any, backend: str, batch_size: int, new_tokens: int, limit_gb: float | None, cap: int,
                  start: int, info: dict[str, Any]) -> dict[str, Any]:
    free_memory(loaded.device)
    info.update(cap_cuda_memory(limit_gb, loaded.device))
    info["enforced_by"] += ", weights included"
    try:
        return search_longest(fits_fn(loaded, backend, batch_size, new_tokens), cap, start)
    finally:
        cap_cuda_memory(None, loaded.device)
        free_memory(loaded.device)


def _mem_available_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    return None


def _longest_cpu(loaded: Any, backend: str, batch_size: int, new_tokens: int, limit_gb: float | None, cap: int,
                 start: int, info: dict[str, Any], trust_remote_code: bool) -> dict[str, Any]:
    if limit_gb is None:
        limit_gb = _mem_available_gb()
        if limit_gb is None:
            raise NoMemoryBound("cannot read MemAvailable from /proc/meminfo to bound the search on CPU")
        info["memory_limit_source"] = "MemAvailable of /proc/meminfo"
    info.update({"memory_limit_gb": limit_gb,
                 "enforced_by": "resource.RLIMIT_AS of a child process: its address space after loading the model "
                                f"+ {limit_gb:g} GB"})
    args = {"spec": loaded.spec, "dtype": dtype_name(loaded.dtype), "backend": backend, "batch_size": batch_size,
            "new_tokens": new_tokens, "limit_bytes": int(limit_gb * 2**30), "cap": cap, "start": start,
            "trust_remote_code": trust_remote_code}
    scripts = Path(__file__).resolve().parents[2]
    code = f"import sys; sys.path.insert(0, {str(scripts)!r}); from attnkit.measure.generation import _child; _child()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                          check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])[-300:]
        raise RuntimeError(f"the search process exited {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def steady_malloc(mmap_threshold: int = 128 * 1024) -> bool:
    """Make glibc's allocator give memory back and reserve no more, so that under RLIMIT_AS
    every probe starts from the same address space: ``mallopt(M_MMAP_THRESHOLD)`` fixes the
    mmap threshold (glibc otherwise raises it after a free, and keeps what later blocks of
    that size free as heap, still counted against the limit), and ``mallopt(M_ARENA_MAX, 1)``
    keeps one arena (each new thread's arena reserves 64 MB of address space). False where
    the C library has no mallopt (not glibc)."""
    import ctypes
    import ctypes.util

    m_mmap_threshold, m_arena_max = -3, -8  # glibc malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(libc.mallopt(m_arena_max, 1))
    except (OSError, AttributeError, TypeError):
        return False


def address_space() -> int:
    """The bytes of address space this process maps now, asked of the kernel: the smallest
    RLIMIT_AS under which a one-page anonymous ``mmap`` still succeeds, by bisection to a
    page. The soft limit is put back afterwards."""
    import mmap
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    lo, hi = 0, hard if hard != resource.RLIM_INFINITY else 1 << 47  # x86-64's user address space
    try:
        while hi - lo > mmap.PAGESIZE:
            mid = (lo + hi) // 2
            resource.setrlimit(resource.RLIMIT_AS, (mid, hard))
            try:
                mmap.mmap(-1, mmap.PAGESIZE).close()
                hi = mid
            except (OSError, MemoryError):
                lo = mid
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return hi - mmap.PAGESIZE


def _child() -> None:
    """The CPU search process (``_longest_cpu``): load, warm up, limit, search, print JSON."""
    import resource

    from .. import models

    steady_malloc()
    args = json.loads(sys.argv[1])
    loaded = models.load(args["spec"], device="cpu", dtype=getattr(torch, args["dtype"]),
                         trust_remote_code=args["trust_remote_code"])
    fits = fits_fn(loaded, args["backend"], args["batch_size"], args["new_tokens"])
    fits(min(16, args["cap"]))  # warm-up before the limit: thread pools, lazy inits
    limit = address_space() + args["limit_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    result = search_longest(fits, args["cap"], args["start"])
    sys.stdout.write(json.dumps(result) + "\n")
