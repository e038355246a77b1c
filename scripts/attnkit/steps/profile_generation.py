"""The profile_generation step: generation with a KV cache, per backend, the way users run it.

For a Hugging Face causal LM and each backend: prefill and decode (``measure.generation``:
two greedy ``generate`` calls, dynamic and static cache, at each batch size and prompt
length), peak memory and KV-cache size, greedy agreement with eager on a left-padded
batch of 4 prompts of different lengths, and with ``max_context`` the longest prompt that
fits. Checks: greedy agreement (1.0 in float32; in half precision every divergence must be
a near-tie, see ``agreement_check``), the fused kernel ran during generation, every run
finished (out of memory is a measured limit, not a failure).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..backends import BACKENDS, availability
from ..env import dtype_name, resolve
from ..measure import generation as gen
from ..measure.kernels import fused
from ..report import (CannotRun, Check, Sections, StepResult, Table, default_run_folder, fmt_mb, fmt_ms,
                      register_view, write_run_folder)
from .session import SessionData, open_session

STEP = "profile_generation"


@dataclass
class GenerationOptions:
    """What ``profile_generation.py`` takes (see its --help)."""

    model: str | None = None
    backends: list[str] | None = None  # None: eager + every backend auto may pick that can run here
    prompt_lens: list[int] = field(default_factory=lambda: [512])
    new_tokens: int = 32
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    caches: list[str] = field(default_factory=lambda: list(gen.CACHES))
    dtype: str = "auto"
    device: str = "auto"
    min_run_time: float = 1.0
    compile: bool = False
    max_context: bool = False
    memory_limit: float | None = None  # GB
    trust_remote_code: bool = False
    report_dir: str | None = None
    write_report: bool = True
    save: str | None = None  # --save DIR: the chosen configuration (write_chosen)


@dataclass(kw_only=True)
class ProfileGenerationData(SessionData):
    """``data`` of profile_generation: the session's fields without ``shape`` (each run has
    its own prompt length and batch size), then what was asked and measured.

    ``prompt_lens`` (tokens, each capped to the model's limit), ``new_tokens``,
    ``batch_sizes``, ``caches`` and ``compiled`` (--compile): the grid of runs;
    ``min_run_time``: seconds of timing per run; ``kv_cache_formula``: how ``kv_cache_mb``
    is computed (``measure.generation.KV_FORMULA``); ``weights_mb``: the model's parameters
    (MB); ``timing``: how prefill (ms), decode (ms per token) and tokens/s are derived;
    ``agreement_batch``: the left-padded batch both agreements run on (None until it is
    built); ``bandwidth_gb_s``: the copy bandwidth measured in this run (GB/s, 10**9 bytes),
    which ``floor_formula`` divides by; ``backends``: one entry per backend (availability,
    headline figures of the first prompt length, batch size and cache, every run, its
    teacher-forced and greedy agreement with eager, its longest context);
    ``not_available``: default backends that cannot run here, with why; ``chosen``: the
    configuration ``choose`` picked, with the code and generation_config fields that apply
    it (None when none qualified); ``saved_to``: where --save wrote it."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = SessionData.OMIT_IF_NONE | {"shape"}

    shape: dict[str, Any] | None = None
    prompt_lens: list[int] = field(default_factory=list)
    new_tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    caches: list[str] = field(default_factory=list)
    compiled: bool = False
    min_run_time: float = 0.0
    kv_cache_formula: str = ""
    weights_mb: float | None = None
    timing: str = ""
    agreement_batch: dict[str, Any] | None = None
    bandwidth_gb_s: float | None = None
    floor_formula: str = ""
    backends: list[dict[str, Any]] = field(default_factory=list)
    not_available: list[dict[str, str]] = field(default_factory=list)
    chosen: dict[str, Any] | None = None
    saved_to: str | None = None


def validate(o: GenerationOptions) -> None:
    """Reject bad numbers and names before anything loads. Raises ``CannotRun``."""
    if o.new_tokens < 2:
        raise CannotRun(f"--new-tokens must be at least 2 (one prefill token, then decode steps), not {o.new_tokens}",
                        "")
    for p in o.prompt_lens:
        if p < 1:
            raise CannotRun(f"--prompt-len must be at least 1, not {p}", "")
    for b in o.batch_sizes:
        if b < 1:
            raise CannotRun(f"--batch-size must be at least 1, not {b}", "")
    bad = [c for c in o.caches if c not in gen.CACHES]
    if bad:
        raise CannotRun(f"unknown --cache {', '.join(bad)}; choose from {', '.join(gen.CACHES)}", "")
    unknown = [b for b in o.backends or [] if b not in BACKENDS]
    if unknown:
        raise CannotRun(f"unknown backend {', '.join(unknown)}; choose from {', '.join(BACKENDS)}", "")
    if not 0 < o.min_run_time < float("inf"):  # NaN and inf never end a timing loop
        raise CannotRun(f"--min-run-time must be positive, not {o.min_run_time}", "")
    if o.memory_limit is not None and not 0 < o.memory_limit < float("inf"):
        raise CannotRun(f"--memory-limit must be a positive number of GB, not {o.memory_limit}", "")
    if o.memory_limit is not None and not o.max_context:
        raise CannotRun("--memory-limit bounds the --max-context search; add --max-context", "")


def default_backends() -> list[str]:
    """eager (the reference), then every backend ``auto`` may pick, in the registry's order.
    flex_attention only when named: it compiles per shape, and decoding changes the shape
    at every step."""
    return ["eager"] + [name for name, b in BACKENDS.items() if name not in ("eager", "flex_attention") and b.auto]


def _prompt_lens(o: GenerationOptions, limit: int | None, notes: list[str]) -> list[int]:
    """--prompt-len values, each capped so that it and --new-tokens fit the model's ``limit``
    positions (a note says so). Raises ``CannotRun`` when no prompt fits."""
    prompt_lens: list[int] = []
    for p in dict.fromkeys(o.prompt_lens):
        if limit and p + o.new_tokens > limit:
            notes.append(f"--prompt-len {p} capped to {limit - o.new_tokens}: the model's max_position_embeddings "
                         f"({limit}) minus {o.new_tokens} new tokens")
            p = limit - o.new_tokens
        if p >= 1 and p not in prompt_lens:
            prompt_lens.append(p)
    if not prompt_lens:
        raise CannotRun(f"--new-tokens {o.new_tokens} leaves no room for a prompt in {limit} positions", "")
    return prompt_lens


def profile_generation(o: GenerationOptions, reporter: Any) -> StepResult:
    """Measure generation per backend (see the module docstring). Raises ``CannotRun``
    when it cannot start: bad options, a model that does not load or is not a causal LM,
    no backend besides eager that can run here."""
    validate(o)
    env, device, dtype = resolve(o.device, o.dtype)
    if o.memory_limit is not None and device.startswith("cuda") and env.gpus:
        gpu = env.gpus[int(device.split(":")[1]) if ":" in device else 0]
        if o.memory_limit * 1024 > gpu.memory_mb:
            raise CannotRun(f"--memory-limit {o.memory_limit} GB is more than {gpu.name}'s "
                            f"{gpu.memory_mb / 1024:.1f} GB", "leave it out to search the whole GPU")
    session = open_session(o.model, device=o.device, dtype=o.dtype, batch_size=1, seq_len=16,
                           trust_remote_code=o.trust_remote_code, reporter=reporter, env=env)
    loaded = session.loaded
    if loaded.family != "causal-lm" or not loaded.is_transformers or not hasattr(loaded.model, "generate"):
        raise CannotRun(f"{loaded.spec} is not a transformers causal language model ({type(loaded.model).__name__}): "
                        "there is no generate() to measure", "use profile_attention.py for forward passes")
    notes = list(session.notes)
    names = list(dict.fromkeys(o.backends or default_backends()))
    if "eager" not in names:
        names.insert(0, "eager")
        notes.append("eager added: it is the reference for greedy agreement")
    verdicts = {n: availability(n, env=env, device=device, dtype=dtype, model=loaded.model) for n in names}
    skipped = []
    if not o.backends:  # the default list holds what can run here; the others are listed apart
        skipped = [{"backend": n, "reason": verdicts[n].reason} for n in names if not verdicts[n].available]
        names = [n for n in names if verdicts[n].available or n == "eager"]
    runnable = [n for n in names if verdicts[n].available]
    if "eager" not in runnable:
        raise CannotRun(f"eager attention cannot run here: {verdicts['eager'].reason}", "")
    if len(runnable) < 2:
        raise CannotRun("no backend besides eager can run here: " + "; ".join(
            f"{n}: {verdicts[n].reason}" for n in names if n != "eager"), "see check_env.py")
    limit = loaded.max_seq_len()
    prompt_lens = _prompt_lens(o, limit, notes)
    for note in notes[len(session.notes):]:
        reporter.note(note)

    entries = {n: {"backend": n, "available": verdicts[n].available, "reason": verdicts[n].reason,
                   "prefill_ms": None, "decode_ms_per_token": None, "decode_tokens_per_s": None,
                   "peak_memory_mb": None, "kv_cache_mb": None, "floor_percent": None, "greedy_agreement": None,
                   "max_context": None, "runs": [], "agreement": [], "teacher_forced": [], "longest_context": None}
               for n in names}
    data = ProfileGenerationData(  # no one shape: each run has its own; notes: the session's and this step's
        **{**session.fields(), "shape": None, "notes": notes}, prompt_lens=prompt_lens, new_tokens=o.new_tokens,
        batch_sizes=list(dict.fromkeys(o.batch_sizes)), caches=list(dict.fromkeys(o.caches)), compiled=o.compile,
        min_run_time=o.min_run_time, kv_cache_formula=gen.KV_FORMULA,
        weights_mb=sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**20,
        timing="prefill = generate(1 token); decode per token = (generate(N) - prefill) / (N - 1); "
               "tokens/s = batch x 1000 / decode ms per token; medians of torch.utils.benchmark",
        backends=list(entries.values()), not_available=skipped)
    interrupted = ""
    base = None
    try:
        ids, mask, lengths = gen.left_padded(loaded, longest=min(gen.AGREEMENT_LEN, max(4, (limit or 10**9) // 2)))
        data.agreement_batch = {"rows": len(lengths), "prompt_lens": lengths, "padding": "left",
                                "new_tokens": o.new_tokens, "reference": "eager, dynamic cache"}
        with reporter.stage(f"greedy reference: eager on a left-padded batch of prompts of {lengths} tokens"):
            base = gen.greedy(loaded, "eager", "dynamic", ids, mask, o.new_tokens)
        for n in runnable:
            for cache in data.caches:
                if n == "eager" and cache == "dynamic":
                    continue
                with reporter.stage(f"greedy agreement: {n}, {cache} cache"):
                    cand = gen.greedy(loaded, n, cache, ids, mask, o.new_tokens)
                    row = ({"backend": n, "cache": cache, "agreement": None, "error": cand.error} if cand.error or
                           base.error else gen.agreement(loaded, base, cand, ids, mask))
                entries[n]["agreement"].append(row)
        if base.error is None:
            entries["eager"]["agreement"].insert(0, {"backend": "eager", "cache": "dynamic", "agreement": 1.0,
                                                     "tokens_compared": int(base.tokens.numel()), "rows_differing": 0,
                                                     "divergences": [], "note": "the reference itself"})
            _teacher_forced(loaded, entries, runnable, data.caches, ids, mask, base.tokens, reporter)
        # the search before the timing: it is short, and a time limit that stops the run keeps it
        if o.max_context:
            for n in runnable:
                with reporter.stage(f"{n}: searching the longest prompt that fits"):
                    entries[n]["longest_context"] = gen.longest_context(
                        loaded, n, batch_size=data.batch_sizes[0], new_tokens=min(4, o.new_tokens),
                        memory_limit_gb=o.memory_limit, trust_remote_code=o.trust_remote_code)
        _time_runs(loaded, o, data, entries, runnable, reporter)
    except KeyboardInterrupt:
        interrupted = "interrupted (Ctrl-C); what was measured is kept"
    for e in entries.values():
        _headline(e, prompt_lens[0], data.batch_sizes[0], data.caches[0])
    data.chosen = choose(entries, prompt_lens[0], data.batch_sizes[0], o.new_tokens, o.compile)
    result = _verdict(data, entries, runnable, base, dtype, interrupted)
    if o.save:
        _save(loaded, data, result.status, o.save, reporter)
    if o.write_report:
        write_run_folder(result, Path(o.report_dir) if o.report_dir else default_run_folder(STEP, loaded.name))
    return result


def _time_runs(loaded: Any, o: GenerationOptions, data: ProfileGenerationData, entries: dict[str, dict],
               runnable: list[str], reporter: Any) -> None:
    """Measure the copy bandwidth (``data.bandwidth_gb_s``, GB/s), then time every prompt
    length, batch size, cache and backend (``measure.generation.measure_generation``, with
    the decode floor); each run goes to ``entries[backend]["runs"]``."""
    with reporter.stage("memory bandwidth: a device-to-device copy, for the decode floor"):
        bandwidth = gen.copy_bandwidth(str(loaded.device))
    data.bandwidth_gb_s = bandwidth / 1e9
    data.floor_formula = gen.FLOOR_FORMULA
    for p in data.prompt_lens:
        for b in data.batch_sizes:
            for cache in data.caches:
                for n in runnable:
                    with reporter.stage(f"{n}: prompt {p}, batch {b}, {cache} cache, {o.new_tokens} new tokens"):
                        run = gen.measure_generation(loaded, n, batch_size=b, prompt_len=p, new_tokens=o.new_tokens,
                                                     cache=cache, min_run_time=o.min_run_time, compile=o.compile,
                                                     bandwidth=bandwidth)
                    entries[n]["runs"].append(run.to_dict())


def _save(loaded: Any, data: ProfileGenerationData, status: str, folder: str, reporter: Any) -> None:
    """--save: write the chosen configuration (``write_chosen``) only when the step passed and
    one qualified; else a note says why nothing was written."""
    if status == "pass" and data.chosen:
        data.saved_to = write_chosen(loaded, data.chosen, Path(folder))
        reporter.note(f"chosen configuration written to {data.saved_to}")
    else:
        data.notes.append(f"--save {folder}: nothing written, " + (
            "no configuration qualified" if not data.chosen else f"the step did not pass ({status})"))


def _headline(e: dict[str, Any], prompt_len: int, batch_size: int, cache: str) -> None:
    """The headline figures of a backend: its run at the first prompt length, batch size and
    cache; its lowest greedy agreement; its longest context."""
    for r in e["runs"]:
        if (r["prompt_len"], r["batch_size"], r["cache"]) == (prompt_len, batch_size, cache) and not r["error"]:
            for key in ("prefill_ms", "decode_ms_per_token", "decode_tokens_per_s", "peak_memory_mb", "kv_cache_mb",
                        "floor_percent"):
                e[key] = r[key]
    scores = [a["agreement"] for a in e["agreement"] if a.get("agreement") is not None]
    e["greedy_agreement"] = min(scores) if scores else None
    if e["longest_context"] and not e["longest_context"].get("error"):
        e["max_context"] = e["longest_context"]["max_context"]


def agreement_check(entries: dict[str, dict], dtype: torch.dtype, base_error: str | None) -> Check:
    """Greedy agreement with eager, per backend and cache.

    float32: every generated token must equal eager's (agreement 1.0). bf16/fp16: two
    correct kernels round differently, so where eager's top two tokens are closer than
    that rounding, greedy decoding may pick the other one and the rows go apart from
    there. A divergence passes only when, at its first step (same prefix in both runs),
    the backend's logits are as close to a float64 reference as eager's own are (within
    2 x eager's error + eps(dtype) x max|ref|): a near-tie, reported, never hidden.
    """
    if base_error:
        return Check("greedy_agreement", False, f"eager could not generate the reference tokens: {base_error}")
    half = dtype in (torch.float16, torch.bfloat16)
    parts, ok = [], True
    for e in entries.values():
        for a in e["agreement"]:
            if a.get("note"):
                continue
            label = f"{a['backend']} ({a['cache']})"
            if a.get("agreement") is None:
                parts.append(f"{label}: could not generate: {a.get('error')}")
                ok = False
                continue
            text = f"{label}: {a['agreement']:.3f}"
            if a["divergences"]:
                ties = [d for d in a["divergences"] if d["near_tie"]]
                text += " (" + "; ".join(
                    f"row {d['row']} from step {d['first_divergence']}: "
                    + ("near-tie" if d["near_tie"] else "NOT a near-tie")
                    + f", eager margin {d['eager_margin']:.2e}, logit err {d['max_abs_err']:.1e} vs tol "
                      f"{d['tolerance']:.1e}" for d in a["divergences"]) + ")"
                if not half or len(ties) < len(a["divergences"]):
                    ok = False
            parts.append(text)
    rule = ("float32: every token must equal eager's" if not half else
            f"{dtype_name(dtype)}: divergences pass only as near-ties (logits within 2 x eager's error + eps of "
            "float64 at the first divergent step)")
    return Check("greedy_agreement", ok, f"{rule}; " + "; ".join(parts))


def _teacher_forced(loaded: Any, entries: dict[str, dict], runnable: list[str], caches: list[str], ids: torch.Tensor,
                    mask: torch.Tensor, tokens: torch.Tensor, reporter: Any) -> None:
    """Teacher-forced agreement of every (backend, cache) with eager's dynamic cache, all fed
    eager's greedy ``tokens`` [rows, N] (``measure.generation.forced_agreement``); each
    result goes to ``entries[backend]["teacher_forced"]``."""
    with reporter.stage("teacher-forced reference: float64 eager per row, and eager with a dynamic cache"):
        reference = gen.forced_reference(loaded, ids, mask, tokens)
        base = gen.teacher_forced(loaded, "eager", "dynamic", ids, mask, tokens)
    if base.error:
        entries["eager"]["teacher_forced"].append({"backend": "eager", "cache": "dynamic", "agreement": None,
                                                   "error": base.error})
        return
    for n in runnable:
        for cache in caches:
            with reporter.stage(f"teacher-forced agreement: {n}, {cache} cache"):
                cand = base if (n, cache) == ("eager", "dynamic") else gen.teacher_forced(loaded, n, cache, ids, mask,
                                                                                           tokens)
                row = ({"backend": n, "cache": cache, "agreement": None, "error": cand.error} if cand.error else
                       gen.forced_agreement(base, cand, reference, loaded.dtype))
            entries[n]["teacher_forced"].append(row)


def forced_check(entries: dict[str, dict], dtype: torch.dtype) -> Check:
    """Teacher-forced agreement: every (backend, cache), fed eager's tokens, gives at every
    step logits as close to a float64 reference as eager's own (within 2 x eager's error +
    eps(dtype) x max|ref|, ``accuracy.compare``). Unlike greedy text, one sequence for all,
    so a near tie cannot send two correct kernels down different paths: 1.0 is required in
    every dtype."""
    parts, ok = [], True
    for e in entries.values():
        for a in e.get("teacher_forced", []):
            label = f"{a['backend']} ({a['cache']})"
            if a.get("agreement") is None:
                parts.append(f"{label}: could not run: {a.get('error')}")
                ok = False
                continue
            good = a["agreement"] == 1.0
            ok &= good
            parts.append(f"{label}: {a['steps'] - a['steps_failed']}/{a['steps']} steps" + (
                "" if good else f" (worst step {a['worst_step']}: err {a['worst_max_abs_err']:.1e} > tol "
                                f"{a['worst_tolerance']:.1e}{'; ' + a['note'] if a.get('note') else ''})"))
    if not parts:
        return Check("teacher_forced", False, "no configuration was compared")
    return Check("teacher_forced", ok, "per decode step, logits within 2 x eager's error + eps of float64 eager "
                                       "(every row, eager's tokens fed); " + "; ".join(parts))


def _qualified(entries: dict[str, dict]) -> set[tuple[str, str]]:
    """(backend, cache) pairs whose teacher-forced agreement is 1.0."""
    return {(a["backend"], a["cache"]) for e in entries.values() for a in e.get("teacher_forced", [])
            if a.get("agreement") == 1.0}


def choose(entries: dict[str, dict], prompt_len: int, batch_size: int, new_tokens: int,
           compiled: bool) -> dict[str, Any] | None:
    """The configuration to use, at the first prompt length and batch size: among the runs
    whose (backend, cache) passed teacher-forced agreement, the lowest request time
    ``prefill_ms + (N - 1) x decode_ms_per_token`` (medians, ms). Also the backends with the
    fastest prefill and the fastest decode on their own, with the chosen cache: where they
    differ, what a split between them would save is reported, not applied (transformers'
    ``generate`` runs one attn_implementation for both phases). None when no run qualified."""
    ok = _qualified(entries)
    runs = [r for e in entries.values() for r in e["runs"]
            if (r["backend"], r["cache"]) in ok and not r["error"] and r["prompt_len"] == prompt_len
            and r["batch_size"] == batch_size and r["prefill_ms"] and r["decode_ms_per_token"]]
    if not runs:
        return None

    def request(r: dict) -> float:
        return r["prefill_ms"] + (new_tokens - 1) * r["decode_ms_per_token"]

    best = min(runs, key=request)
    same_cache = [r for r in runs if r["cache"] == best["cache"]]  # a cache object serves both phases
    prefill = min(same_cache, key=lambda r: r["prefill_ms"])
    decode = min(same_cache, key=lambda r: r["decode_ms_per_token"])
    split = prefill["prefill_ms"] + (new_tokens - 1) * decode["decode_ms_per_token"]
    fields = {"cache_implementation": "static" if best["cache"] == "static" else None,
              "disable_compile": not compiled}
    code = [f'model.set_attn_implementation("{best["backend"]}")  # or from_pretrained(..., '
            f'attn_implementation="{best["backend"]}")']
    if best["cache"] == "static":
        code.append('model.generation_config.cache_implementation = "static"')
    code.append(f"model.generation_config.disable_compile = {not compiled}")
    return {"backend": best["backend"], "cache": best["cache"], "compiled": compiled, "prompt_len": prompt_len,
            "batch_size": batch_size, "new_tokens": new_tokens, "request_ms": request(best),
            "prefill_ms": best["prefill_ms"], "decode_ms_per_token": best["decode_ms_per_token"],
            "floor_percent": best.get("floor_percent"),
            "rule": f"lowest prefill + (N - 1) x decode at prompt {prompt_len}, batch {batch_size}, N {new_tokens}, "
                    "among configurations whose teacher-forced agreement is 1.0 (medians)",
            "fastest_prefill": prefill["backend"], "fastest_decode": decode["backend"],
            "split_would_save_ms": max(0.0, request(best) - split),
            "generation_config": {k: v for k, v in fields.items() if v is not None}, "code": "\n".join(code)}


def write_chosen(loaded: Any, chosen: dict[str, Any], folder: Path) -> str:
    """Write ``chosen`` into ``folder`` (new or empty; checked before the run): the model's
    own generation config with the chosen fields (``generation_config.json``, by
    ``GenerationConfig.save_pretrained``) and ``use_chosen.py``, the lines that apply it.
    Returns the folder's path."""
    import copy

    gc = copy.deepcopy(loaded.model.generation_config)
    for key, value in chosen["generation_config"].items():
        setattr(gc, key, value)
    folder.mkdir(parents=True, exist_ok=True)
    gc.save_pretrained(folder)
    (folder / "use_chosen.py").write_text(
        f'"""The configuration profile_generation chose for {loaded.spec}: {chosen["rule"]}."""\n'
        "# model: the loaded transformers model\n" + chosen["code"] + "\n")
    return str(folder)


def kernel_evidence(entries: dict[str, dict], runnable: list[str]) -> Check:
    """Each backend's own attention kernel ran during generation (profiler names), and
    eager ran no fused one."""
    parts, ok = [], True
    for n in runnable:
        seen: dict[str, int] = {}
        for r in entries[n]["runs"]:
            for k, c in (r.get("kernels") or {}).items():
                seen[k] = seen.get(k, 0) + c
        if not seen and not any(not r["error"] for r in entries[n]["runs"]):
            parts.append(f"{n}: no run finished")
            continue
        if n == "eager":
            good = not fused(list(seen))
        else:
            good = any(m in k for k in seen for m in BACKENDS[n].kernel_markers)
        ok &= good
        parts.append(f"{n}: " + (", ".join(sorted(seen)) or "no attention op seen") + ("" if good else " (NOT its own)"))
    return Check("kernels", ok, "; ".join(parts))


def _verdict(data: ProfileGenerationData, entries: dict[str, dict], runnable: list[str], base: Any, dtype: torch.dtype,
             interrupted: str) -> StepResult:
    checks = []
    if base is not None:
        if base.error is None:
            checks.append(forced_check(entries, dtype))
        checks.append(agreement_check(entries, dtype, base.error))
    runs = [r for n in runnable for r in entries[n]["runs"]]
    if runs:
        checks.append(kernel_evidence(entries, runnable))
        oom = [r for r in runs if r["error"] and r["error"].startswith("out of memory")]
        other = [r for r in runs if r["error"] and not r["error"].startswith("out of memory")]
        evidence = f"{len(runs) - len(oom) - len(other)} of {len(runs)} runs finished"
        if oom:
            evidence += "; out of memory (a measured limit): " + ", ".join(
                f"{r['backend']} P{r['prompt_len']} B{r['batch_size']} {r['cache']}" for r in oom)
        if other:
            evidence += "; failed: " + "; ".join(f"{r['backend']} P{r['prompt_len']} B{r['batch_size']} {r['cache']}: "
                                                 f"{r['error']}" for r in other)
        checks.append(Check("runs", not other, evidence))
    for n in runnable:
        lc = entries[n]["longest_context"]
        if lc and lc.get("error"):
            checks.append(Check("max_context", False, f"{n}: {lc['error']}"))
    skipped = [f"{n} ({e['reason'].split('; ')[0]})" for n, e in entries.items() if not e["available"]]
    summary = _summary(data, entries, runnable)
    if skipped:
        summary += "; asked for but cannot run here: " + "; ".join(skipped)
    if interrupted or base is None:
        return StepResult(STEP, "error", f"{interrupted or 'not finished'}: {summary}", checks, data, "rerun to finish")
    if base.error:
        return StepResult(STEP, "error", f"eager could not generate the reference: {base.error}", checks, data,
                          "lower --new-tokens, or free memory")
    ok = all(c.passed for c in checks)
    chosen = data.chosen
    nxt = ((f"use the chosen configuration, {chosen['backend']} with a {chosen['cache']} cache (data.chosen.code; "
            "--save DIR writes it); " if chosen else "") +
           "rerun with --max-context to see how long a prompt fits" if ok else
           "read the failed check: a greedy disagreement that is not a near-tie means the backend changes what the "
           "model generates (often a padding or KV-cache bug): do not use it for generation")
    return StepResult(STEP, "pass" if ok else "fail", summary, checks, data, nxt)


def _summary(data: ProfileGenerationData, entries: dict[str, dict], runnable: list[str]) -> str:
    head = (f"{data.model} on {data.device} {data.dtype}, prompt {data.prompt_lens[0]}, "
            f"batch {data.batch_sizes[0]}, {data.caches[0]} cache, {data.new_tokens} new tokens: ")
    parts = []
    for n in runnable:
        e = entries[n]
        if e["prefill_ms"] is None:
            errors = [r["error"] for r in e["runs"] if r["error"]]
            parts.append(f"{n} " + (errors[0] if errors else "not measured"))
            continue
        text = (f"{n} prefill {fmt_ms(e['prefill_ms'])}, decode "
                + (f"{fmt_ms(e['decode_ms_per_token'])}/token ({e['decode_tokens_per_s']:.0f} tokens/s)"
                   if e["decode_ms_per_token"] else "n/a"))
        if e["greedy_agreement"] is not None and n != "eager":
            text += f", greedy agreement {e['greedy_agreement']:.3f}"
        if e["max_context"] is not None:
            text += f", longest prompt {e['max_context']}" + (" (the model's limit)" if e["longest_context"]["capped"]
                                                              else "")
        parts.append(text)
    batch = data.agreement_batch or {}
    tail = (f"; agreement on a left-padded batch of {batch['rows']} prompts of {batch['prompt_lens']} tokens"
            if batch else "")
    return head + "; ".join(parts) + tail


def generation_backends(d: dict) -> list[dict]:
    """The per-backend entries of a generation step's data (``data.backends``), else []."""
    rows = d.get("backends")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) and "decode_ms_per_token" in r for r in rows):
        return rows
    return []


def _floor(r: dict) -> str:
    """A run's decode floor per step and the % of it reached, for the runs table."""
    if r.get("decode_floor_ms") is None:
        return "n/a"
    return f"{fmt_ms(r['decode_floor_ms'])} ({r['floor_percent']:.1f} %)"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def generation_tables(d: dict) -> list[Table]:
    """profile_generation's tables: every timed run, then per backend agreement and longest context."""
    entries = generation_backends(d)
    if not entries:
        return []
    runs = []
    for e in entries:
        for r in e.get("runs", []):
            if r.get("error"):
                runs.append([e["backend"], str(r["prompt_len"]), str(r["batch_size"]), r["cache"], "error", "", "",
                             "", "", "", r["error"]])
                continue
            kv = fmt_mb(r.get("kv_cache_mb"))
            if r.get("kv_cache_matches_formula") is False:
                kv += f" (object: {fmt_mb(r.get('kv_cache_measured_mb'))})"
            runs.append([e["backend"], str(r["prompt_len"]), str(r["batch_size"]), r["cache"], fmt_ms(r["prefill_ms"]),
                         fmt_ms(r.get("decode_ms_per_token")), _rate(r.get("decode_tokens_per_s")),
                         _floor(r), fmt_mb(r.get("peak_memory_mb")), kv,
                         ", ".join(sorted(r.get("kernels") or {})) or "-"])
    out = []
    if runs:
        out.append((f"generation on {d.get('device', '?')} {d.get('dtype', '')}, {d.get('new_tokens')} new tokens "
                    f"(greedy)", ["backend", "prompt", "batch", "cache", "prefill", "decode / token", "tokens/s",
                                  "floor / step (% reached)", "peak memory", "KV cache", "attention kernels seen"],
                    runs))
    rows = []
    for e in entries:
        if not e.get("available", True):
            rows.append([e["backend"], "not run", "", "", e.get("reason", "").split("; ")[0]])
            continue
        forced = "; ".join(f"{a['cache']}: " + ("error: " + str(a.get("error")) if a.get("agreement") is None else
                                               f"{a['steps'] - a['steps_failed']}/{a['steps']} steps")
                           for a in e.get("teacher_forced", []))
        agree = "; ".join(f"{a['cache']}: " + ("error: " + str(a.get("error")) if a.get("agreement") is None else
                                              f"{a['agreement']:.3f}" + (f" ({a['rows_differing']} rows differ)"
                                                                          if a.get("rows_differing") else ""))
                          for a in e.get("agreement", []))
        lc = e.get("longest_context") or {}
        if lc.get("error"):
            ctx = "error: " + lc["error"]
        elif lc:
            ctx = f"{lc['max_context']}" + (" (the model's limit)" if lc.get("capped") else
                                            f" (fails at {lc.get('first_failure')})")
            ctx += f"; limit {lc.get('memory_limit_gb', 0):.2f} GB, {lc.get('enforced_by', '')}"
        else:
            ctx = "not searched (--max-context)"
        rows.append([e["backend"], forced or "n/a", agree or "n/a", ctx, ""])
    batch = d.get("agreement_batch") or {}
    title = "agreement with eager (teacher-forced logits per step; greedy tokens) and longest prompt that fits"
    if batch:
        title += f" (agreement: left-padded batch of prompts of {batch.get('prompt_lens')} tokens)"
    out.append((title, ["backend", "teacher-forced", "greedy agreement", "longest prompt", "note"], rows))
    chosen = d.get("chosen")
    if chosen:
        out.append((f"chosen configuration ({chosen['rule']}); apply it with data.chosen.code or --save",
                    ["backend", "cache", "request", "prefill", "decode / token", "% of floor", "generation_config"],
                    [[chosen["backend"], chosen["cache"], fmt_ms(chosen["request_ms"]), fmt_ms(chosen["prefill_ms"]),
                      fmt_ms(chosen["decode_ms_per_token"]),
                      "n/a" if chosen.get("floor_percent") is None else f"{chosen['floor_percent']:.1f} %",
                      ", ".join(f"{k}={v}" for k, v in chosen["generation_config"].items())]]))
    if d.get("not_available"):
        out.append(("backends not available here (not run)", ["backend", "reason"],
                    [[r["backend"], r["reason"].split("; ")[0]] for r in d["not_available"]]))
    return out


def plot_generation(d: dict, path: Path) -> Path | None:
    """Prefill (ms) and decode (ms per token) per backend, a bar per (prompt, batch, cache), as PNG."""
    entries = generation_backends(d)
    configs = list(dict.fromkeys((r["prompt_len"], r["batch_size"], r["cache"]) for e in entries
                                 for r in e.get("runs", []) if not r.get("error")))
    if not configs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["backend"] for e in entries if e.get("runs")]
    width = 0.8 / len(configs)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(names) * 2), 3.6))
    for ax, key, unit in ((axes[0], "prefill_ms", "prefill (ms)"), (axes[1], "decode_ms_per_token",
                                                                     "decode (ms per token)")):
        shown = []
        for i, cfg in enumerate(configs):
            values = []
            for name in names:
                run = next((r for e in entries if e["backend"] == name for r in e["runs"]
                            if (r["prompt_len"], r["batch_size"], r["cache"]) == cfg), None)
                values.append(run.get(key) if run and run.get(key) else 0.0)
            xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(names))]
            bars = ax.bar(xs, values, width, label=f"P{cfg[0]} B{cfg[1]} {cfg[2]}")
            if len(configs) * len(names) <= 12:
                ax.bar_label(bars, labels=[f"{v:.3g}" if v else "" for v in values], fontsize=7)
            shown += [v for v in values if v]
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(unit)
        if shown and max(shown) / min(shown) > 30:  # prompts of 512 and 32768 tokens on one axis
            ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{d.get('model', '')} on {d.get('device', '')} {d.get('dtype', '')}, {d.get('new_tokens')} new "
                 "tokens, greedy; a missing bar: out of memory or not run", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _generation_figure(d: dict[str, Any], folder: Path) -> Path | None:
    return plot_generation(d, folder / "report.png")


#: How a result of this step is drawn (report.View): every timed run, agreement and longest context, a plot.
VIEW = register_view(STEP, Sections((generation_tables,), _generation_figure))
