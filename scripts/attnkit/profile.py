"""Measure one backend: the attention kernels that ran, peak memory, latency, TFLOP/s.

* Kernels: one forward pass under ``torch.profiler``; the op and GPU kernel names it
  records are the evidence of what ran (``aten::_scaled_dot_product_flash_attention_for_cpu``
  for SDPA's fused CPU kernel, ``aten::_softmax`` + ``aten::bmm`` for hand-written
  attention, ``pytorch_flash::flash_fwd_kernel`` on a GPU).
* Peak memory (MB = 2**20 bytes): the most memory allocated at once during one forward
  pass, above what was allocated before it (activations, score matrices, the output;
  not the weights). CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``. CPU: the running sum of the profiler's memory events
  (``profile_memory=True``), since the CPU allocator keeps no peak counter.
* Latency (ms): the median of ``torch.utils.benchmark.Timer.blocked_autorange`` after a
  warm-up pass, with its IQR; the Timer synchronises CUDA and uses all CPU threads here.
* FLOPs: useful work, the same for every backend so TFLOP/s compare: 2 FLOPs per
  multiply-add in every ``nn.Linear`` (and transformers' ``Conv1D``) over B*S tokens
  (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1), plus
  ``attention_flops`` per layer.

A backend that runs out of memory is recorded as such (``Measurement.error``); the
caller goes on with the next one.
"""

from __future__ import annotations

import contextlib
import gc
import re
import warnings
from pathlib import Path
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .report import (CannotRun, Check, StepResult, default_run_folder, fmt_iqr, fmt_kernels, fmt_mb, fmt_ms,
                     write_run_folder)

#: Fused attention ops -> the SDPA kernel they prove ran (names as torch.profiler shows them).
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_attention_math": "math",
}

#: What hand-written attention leaves in a trace: the softmax kernel and batched matmuls.
UNFUSED_OPS = ("aten::_softmax", "aten::bmm")

#: Substrings of flash-attn's and flex_attention's op names (flash_attn::_flash_attn_forward,
#: flash_attn_3::fwd, flex_attention).
LIBRARY_MARKERS = ("flash_attn", "flex_attention")

#: GPU kernels worth naming as attention evidence.
DEVICE_KERNEL = re.compile(r"flash|fmha|attention|sdpa|softmax", re.IGNORECASE)


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error of a CUDA or CPU allocation."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def oom_message(exc: BaseException) -> str:
    first = " ".join(str(exc).split())
    match = re.search(r"(tried to allocate [\d.]+ ?\w+)", first, re.IGNORECASE)
    return "out of memory" + (f" ({match.group(1)})" if match else f": {first[:160]}")


def attention_flops(batch: int, seq_len: int, heads: int, head_dim: int, layers: int, causal: bool,
                    sliding_window: int | None = None, kv_len: int | None = None) -> float:
    """Forward FLOPs of attention: 4 * B * H * D * (query-key pairs) per layer.

    QK^T and PV are each 2 * S_q * S_k * D FLOPs per head (2 per multiply-add); non-causal
    pairs = S_q * S_k; causal pairs = S (S + 1) / 2, which is the ``flops(..., causal)``
    of flash-attn's benchmarks/benchmark_flash_attention.py (4 * B * S**2 * H * D / 2) up
    to the diagonal; a sliding window W keeps min(i + 1, W) keys for query i.
    """
    s_k = kv_len or seq_len
    if not causal:
        pairs = seq_len * s_k
    elif sliding_window and sliding_window < seq_len:
        w = sliding_window
        pairs = w * (w + 1) // 2 + (seq_len - w) * w
    else:
        pairs = seq_len * (seq_len + 1) // 2
    return 4.0 * batch * heads * head_dim * pairs * layers


def matmul_params(model: nn.Module) -> int:
    """Weights used as matmuls: every ``nn.Linear`` and transformers ``Conv1D`` (GPT-2)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None):
            total += m.weight.numel()
    return total


def forward_flops(model: nn.Module, batch: int, seq_len: int, attention: dict[str, Any] | None,
                  train: bool = False, attention_total: float | None = None) -> float | None:
    """Useful FLOPs of a forward pass: 2 * matmul_params * B * S + attention FLOPs (from the
    config's ``attention`` shape, or ``attention_total`` measured from the sites). With
    ``train``, forward + backward: 3x for the linear layers (the backward computes two
    products per forward one) and 3.5x for attention (flash-attn's benchmark counts its
    backward as 2.5 forwards). None when the attention FLOPs are unknown."""
    if attention_total is None:
        if not attention:
            return None
        attention_total = attention_flops(batch, seq_len, attention["heads"], attention["head_dim"],
                                          attention["layers"], attention["causal"], attention.get("sliding_window"))
    linear = 2.0 * matmul_params(model) * batch * seq_len
    return 3.0 * linear + 3.5 * attention_total if train else linear + attention_total


@dataclass
class Measurement:
    """One backend measured on one input. ``error`` set means it could not run."""

    backend: str
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None
    runs: int = 0
    peak_memory_mb: float | None = None
    kernels: list[str] = field(default_factory=list)
    kernel_counts: dict[str, int] = field(default_factory=dict)
    sdpa_kernel: str | None = None
    flops: float | None = None
    tflops: float | None = None
    mode: str = "forward"
    error: str | None = None
    label: str | None = None  # which model / setting, when one step measures several
    seq_len: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fused(self) -> list[str]:
        """Fused attention ops seen (SDPA's non-math kernels, flash-attn, flex)."""
        return [k for k in self.kernels if (k in SDPA_OPS and SDPA_OPS[k] != "math")
                or any(m in k for m in LIBRARY_MARKERS)]


def _short(name: str) -> str:
    """A GPU kernel name without its return type, anonymous namespaces, template and call
    arguments: 'void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>(...)'
    -> 'at::native::cunn_SoftMaxForward'."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    return name.split("<", 1)[0].split("(", 1)[0]


def attention_kernels(events: Any) -> Counter:
    """Count the attention evidence in a profiler's events: fused ops, unfused ops,
    library ops, and GPU kernels whose names say attention or softmax."""
    counts: Counter = Counter()
    for e in events:
        name = e.name
        on_device = str(getattr(e, "device_type", "")).endswith("CUDA")
        if on_device:
            if DEVICE_KERNEL.search(name):
                counts["gpu:" + _short(name)] += 1
        elif name in SDPA_OPS or name in UNFUSED_OPS or any(m in name for m in LIBRARY_MARKERS):
            counts[name] += 1
    return counts


def _cpu_peak_mb(prof: Any) -> float | None:
    """Peak of the running sum of CPU allocations in a profile (MB), from its memory events."""
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                  and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:  # a torch whose profiler keeps no kineto results
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


@contextlib.contextmanager
def profiled(device: str = "cpu", memory: bool = False):
    """``torch.profiler.profile`` over CPU (and CUDA on a GPU), without torch 2.11's
    once-per-profile "Profiler clears events" warning."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Profiler clears events")
        with profile(activities=activities, profile_memory=memory) as prof:
            yield prof


def profile_once(run: Callable[[], Any], device: str, measurement: Measurement) -> Any:
    """Run ``run()`` once under torch.profiler; fill kernels and peak memory; return its output."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with profiled(device, memory=not device.startswith("cuda")) as prof:
        out = run()
        synchronize(device)
    if device.startswith("cuda"):
        measurement.peak_memory_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        measurement.peak_memory_mb = _cpu_peak_mb(prof)
    counts = attention_kernels(prof.events())
    measurement.kernel_counts = dict(sorted(counts.items()))
    measurement.kernels = sorted(counts)
    sdpa = sorted({SDPA_OPS[k] for k in counts if k in SDPA_OPS})
    measurement.sdpa_kernel = ", ".join(sdpa) if sdpa else None
    return out


def time_it(run: Callable[[], Any], min_run_time: float, label: str) -> tuple[float, float | None, int]:
    """Median and IQR (ms; None with fewer than 4 timed blocks) and number of runs, from
    ``torch.utils.benchmark``."""
    import torch.utils.benchmark as benchmark

    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads(),
                            label="attention", sub_label=label)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    iqr = m.iqr * 1e3 if len(m.times) >= 4 else None  # quartiles of fewer than 4 blocks mean nothing
    return m.median * 1e3, iqr, len(m.times) * m.number_per_run


def no_kernel_reasons(caught: list) -> str:
    """torch's own reasons why no SDPA kernel could take the inputs, from its warnings."""
    reasons = []
    for w in caught:
        text = " ".join(str(w.message).split())
        text = re.sub(r" ?\(Triggered internally at [^)]*\)\.?", "", text).strip()
        if text and not text.endswith("not used because:") and text not in reasons:
            reasons.append(text)
    return "; ".join(reasons)[:600] or "torch gave no reason"


def measure(run: Callable[[], Any], *, backend: str, device: str, min_run_time: float = 1.0,
            flops: float | None = None, mode: str = "forward") -> tuple[Measurement, Any]:
    """Measure ``run`` (one forward pass of the model, already switched to ``backend``).

    Order: a warm-up pass, a profiled pass (kernels, peak memory, the output returned),
    then ``time_it``. Out-of-memory at any point is recorded in ``Measurement.error`` and
    the output is None. Raises ``CannotRun`` when SDPA has no allowed kernel for the
    inputs (``--sdpa-kernel`` too narrow), with torch's reasons; other exceptions propagate.
    """
    m = Measurement(backend, flops=flops, mode=mode)
    out = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                run()  # warm-up: lazy inits, allocator growth, kernel selection
            except RuntimeError as exc:
                if not any(t in str(exc) for t in ("No available kernel", "No viable backend")):
                    raise
                reasons = no_kernel_reasons(caught)
                if device == "cpu" and reasons == "torch gave no reason":
                    reasons = "on CPU, SDPA has only its flash and math kernels"
                raise CannotRun(f"{backend}: no allowed SDPA kernel can take these inputs: {reasons}", "allow more kernels (drop --sdpa-kernel) or change "
                                "the inputs") from None
        synchronize(device)
        out = profile_once(run, device, m)
        m.latency_ms, m.latency_iqr_ms, m.runs = time_it(run, min_run_time, backend)
        if flops and m.latency_ms:
            m.tflops = flops / (m.latency_ms * 1e-3) / 1e12
    except Exception as exc:
        if not is_oom(exc):
            raise
        m.error = oom_message(exc)
        out = None
        free_memory(device)
    return m, out


def find_attention(loaded: Any, baseline: str = "eager") -> dict[str, int]:
    """One forward pass of ``loaded`` (a ``models.LoadedModel``) at a small shape under the
    profiler, with ``baseline`` attention; returns the attention ops it ran.

    A model without a transformers switch is run under ``rewrite.Swapper.discover``
    instead, which records its attention sites for the swap (see ``rewrite``).

    Raises ``CannotRun`` when the pass fails or when no attention runs.
    """
    from . import switch

    if loaded.is_transformers:
        switch.apply(loaded.model, baseline)
    probe = loaded.probe()
    try:
        if not loaded.is_transformers:
            from .rewrite import Swapper

            sites = Swapper(loaded.model).discover(forward_fn(loaded, probe))
            counts = {f"{s.kind} site at {s.file}:{s.line}": s.calls for s in sites}
        else:
            with torch.inference_mode(), profiled() as prof:
                loaded.forward(probe)
            counts = dict(attention_kernels(prof.events()))
    except CannotRun:
        raise
    except Exception as exc:
        raise CannotRun(f"a forward pass of {loaded.spec} on {probe.description} raised {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]}", "check that the model runs on its own; a factory "
                        "may define example_inputs(batch_size, seq_len)") from None
    if not counts:
        raise CannotRun(f"no attention in {loaded.spec}: a forward pass ran no softmax, SDPA or flash-attn op",
                        "this job speeds up attention; the model has none to switch")
    return counts


def forward_fn(loaded: Any, inputs: Any, sdpa_kernels: list[str] | None = None) -> Callable[[], torch.Tensor]:
    """A closure running one inference forward pass of ``loaded`` on ``inputs``."""
    from . import switch

    def run() -> torch.Tensor:
        with torch.inference_mode(), switch.sdpa_kernels(sdpa_kernels):
            return loaded.forward(inputs)

    return run


def train_fn(loaded: Any, inputs: Any, sdpa_kernels: list[str] | None = None) -> Callable[[], tuple]:
    """A closure running one forward + backward pass, with the loss sum(output * G) for a
    fixed random G (seed 0, the output's shape, made in the output's dtype the first time
    and kept in ``loaded.train_weights`` so every run, the float64 reference included,
    uses the same values). Returns (output, gradients): parameter name -> grad, and
    "input:i" -> grad for floating positional inputs."""
    from . import switch

    model = loaded.model
    probe = loaded.train_weights

    def run() -> tuple:
        for p in model.parameters():
            p.grad = None
        args = tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in inputs.args)
        with torch.enable_grad(), switch.sdpa_kernels(sdpa_kernels):
            out = loaded.forward(type(inputs)(inputs.batch_size, inputs.seq_len, args, inputs.kwargs, inputs.valid))
            if "g" not in probe or probe["g"].shape != out.shape:
                gen = torch.Generator().manual_seed(0)
                probe["g"] = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
            (out * probe["g"].to(out.dtype)).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        grads.update({f"input:{i}": a.grad.detach().clone() for i, a in enumerate(args)
                      if isinstance(a, torch.Tensor) and a.grad is not None})
        return out.detach(), grads

    return run


def run_backend(loaded: Any, inputs: Any, backend: str, sdpa_kernels: list[str] | None = None) -> torch.Tensor:
    """Switch ``loaded`` to ``backend`` and run one forward pass (no timing); the output.

    Raises ``CannotRun`` when the switch is refused (see ``switch.apply``).
    """
    from . import switch

    if switch.has_switch(loaded.model):
        switch.apply(loaded.model, backend)
    return forward_fn(loaded, inputs, sdpa_kernels)()


def measure_backend(loaded: Any, inputs: Any, backend: str, *, min_run_time: float = 1.0,
                    sdpa_kernels: list[str] | None = None, label: str | None = None, train: bool = False,
                    flops: float | None = None) -> tuple[Measurement, Any]:
    """Switch ``loaded`` (a ``models.LoadedModel``) to ``backend`` and ``measure`` its forward
    pass on ``inputs`` (forward + backward with ``train``); returns the measurement and the
    output (with ``train``: the pair (output, gradients)), None on OOM. ``flops`` overrides
    the model's own count (``forward_flops``; x3 for linear layers and x3.5 for attention
    with ``train``, flash-attn's benchmark counts a backward as 2.5 forwards).

    Raises ``CannotRun`` when the switch is refused (see ``switch.apply``).
    """
    from . import switch

    if switch.has_switch(loaded.model):
        switch.apply(loaded.model, backend)
    if flops is None:
        flops = forward_flops(loaded.model, inputs.batch_size, inputs.seq_len, loaded.attention_shape(), train)
    run = train_fn(loaded, inputs, sdpa_kernels) if train else forward_fn(loaded, inputs, sdpa_kernels)
    m, out = measure(run, backend=backend, device=loaded.device, min_run_time=min_run_time, flops=flops,
                     mode="forward+backward" if train else "forward")
    m.label, m.seq_len = label, inputs.seq_len
    return m, out


# ----------------------------------------------------------------------------- verdicts

def kernel_check(before: Measurement, after: Measurement, backend: str) -> Check:
    """The fused kernel of ``backend`` ran after and not before (profiler names as evidence)."""
    from .backends import CATALOGUE

    markers = CATALOGUE[backend].fused_markers
    expected = [k for k in after.kernels if any(mark in k for mark in markers)]
    already = [k for k in before.kernels if any(mark in k for mark in markers)]
    evidence = (f"before ({before.label or before.backend}): {fmt_kernels(before.kernel_counts)}; "
                f"after ({after.label or backend}): {fmt_kernels(after.kernel_counts)}")
    if not markers:
        return Check("kernels", False, evidence + f"; {backend} has no fused kernel to look for")
    if "aten::_scaled_dot_product_attention_math" in after.kernels and not expected:
        evidence += "; sdpa fell back to its unfused math kernel"
    if already:
        evidence += "; the fused kernel already ran before"
    return Check("kernels", bool(expected) and not already, evidence)


def speed_check(before: Measurement, after: Measurement) -> Check:
    """``after`` has the lower median latency."""

    speedup = before.latency_ms / after.latency_ms
    return Check("speed", speedup > 1.0, f"median {fmt_ms(before.latency_ms)} -> {fmt_ms(after.latency_ms)} "
                                         f"({speedup:.2f}x; IQR {fmt_iqr(before)} / {fmt_iqr(after)})")


def memory_check(before: Measurement, after: Measurement, matrix_mb: float | None = None) -> Check | None:
    """``after`` used no more peak memory; None when either peak is unknown. ``matrix_mb``,
    the largest [B, H, S, S] score matrix eager forms, is set beside the peaks when known."""
    if before.peak_memory_mb is None or after.peak_memory_mb is None:
        return None
    ratio = before.peak_memory_mb / after.peak_memory_mb if after.peak_memory_mb else float("inf")
    evidence = f"peak {fmt_mb(before.peak_memory_mb)} -> {fmt_mb(after.peak_memory_mb)} ({ratio:.2f}x less)"
    if matrix_mb:
        evidence += (f"; eager's largest score matrix [B, H, S, S] is {matrix_mb:.1f} MB "
                     + ("and the swapped peak is below it: never materialised"
                        if after.peak_memory_mb < matrix_mb else ""))
    return Check("memory", after.peak_memory_mb <= before.peak_memory_mb, evidence)


def comparison_summary(before: Measurement, after: Measurement) -> str:
    """'2.96x faster, 2.27x less peak memory' (or 'peak memory unchanged')."""
    speed = f"{before.latency_ms / after.latency_ms:.2f}x faster"
    if before.peak_memory_mb and after.peak_memory_mb and before.peak_memory_mb / after.peak_memory_mb >= 1.005:
        return f"{speed}, {before.peak_memory_mb / after.peak_memory_mb:.2f}x less peak memory"
    return f"{speed}, peak memory unchanged"


# ----------------------------------------------------------------------------- the step

@dataclass
class ProfileOptions:
    """What ``profile_attention.py`` takes (see its --help)."""

    model: str | None = None
    against: str | None = None
    backends: list[str] | None = None  # None: eager,auto for one model; each as loaded for two
    batch_size: int = 1
    seq_lens: list[int] = field(default_factory=lambda: [1024])
    pad_fraction: float | None = None
    dtype: str = "auto"
    device: str = "auto"
    min_run_time: float = 1.0
    sdpa_kernels: list[str] | None = None
    trust_remote_code: bool = False
    report_dir: str | None = None
    write_report: bool = True


def profile_attention(o: ProfileOptions, reporter: Any) -> StepResult:
    """Measure backends (or two model specs) side by side, over one or more sequence lengths.

    One model: each of ``backends`` (default eager, then auto's choice) on the same inputs.
    Two models (``against``): each as loaded, or with ``backends[0]`` / ``backends[-1]``.
    Passes when, at the longest sequence, the last run shows its fused kernel, is faster
    than the first and uses no more peak memory. Raises ``CannotRun`` when it cannot start.
    """
    from .backends import BACKENDS, choose
    from .session import open_session, resolve

    names = list(o.backends or [])
    unknown = [b for b in names if b != "auto" and b not in BACKENDS]
    if unknown:
        raise CannotRun(f"unknown backend {', '.join(unknown)}; choose from auto, {', '.join(BACKENDS)}", "")
    if o.against and len(names) > 2:
        raise CannotRun("with --against, give at most two backends: one for each model", "")
    if not o.against and len(names) == 1:
        raise CannotRun("give at least two backends to compare, e.g. --backends eager,sdpa", "")
    if o.min_run_time <= 0:
        raise CannotRun(f"--min-run-time must be positive, not {o.min_run_time}", "")
    seq_lens = sorted(set(o.seq_lens))
    env, device, dtype = resolve(o.device, o.dtype)
    kw = dict(device=device, dtype=o.dtype, batch_size=o.batch_size, seq_len=seq_lens[-1], pad_fraction=o.pad_fraction,
              trust_remote_code=o.trust_remote_code, reporter=reporter, env=env)
    first = open_session(o.model, **kw)
    plan = []  # (session, backend, label)
    if o.against:
        second = open_session(o.against, **kw)
        picks = names or [None, None]
        for s, pick in ((first, picks[0]), (second, picks[-1])):
            b = pick or s.loaded.original_backend or "eager"
            b = choose("auto", env=env, device=device, dtype=dtype, model=s.loaded.model).backend if b == "auto" else b
            plan.append((s, b, f"{s.loaded.name}: {b}"))
    else:
        for b in names or ["eager", "auto"]:
            b = choose(b, env=env, device=device, dtype=dtype, model=first.loaded.model).backend if b == "auto" else b
            plan.append((first, b, b))
    data = first.data()
    data.update({"against": o.against, "measurements": [], "speedup": None, "memory_ratio": None,
                 "sweep": [], "sdpa_kernels_allowed": o.sdpa_kernels, "report_dir": None})
    data["shape"]["seq_lens"] = seq_lens
    runs: list[Measurement] = []
    interrupted = ""
    try:
        for seq_len in seq_lens:
            for s, backend, label in plan:
                limit = s.loaded.max_seq_len()
                inputs = s.loaded.inputs(o.batch_size, min(seq_len, limit or seq_len), o.pad_fraction)
                with reporter.stage(f"measuring {label} at seq_len {inputs.seq_len}"):
                    m, _ = measure_backend(s.loaded, inputs, backend, min_run_time=o.min_run_time,
                                           sdpa_kernels=o.sdpa_kernels, label=label)
                runs.append(m)
                data["measurements"].append(m.to_dict())
    except KeyboardInterrupt:
        interrupted = f"interrupted (Ctrl-C) after {len(runs)} of {len(plan) * len(seq_lens)} runs"
    for seq_len in seq_lens:
        row = [m for m in runs if m.seq_len == seq_len]
        if len(row) == len(plan) and not row[0].error and not row[-1].error:
            data["sweep"].append({"seq_len": seq_len, "speedup": row[0].latency_ms / row[-1].latency_ms})
    last_s = [m for m in runs if m.seq_len == max((m.seq_len or 0) for m in runs)] if runs else []
    if interrupted or len(last_s) < len(plan):
        result = StepResult("profile_attention", "error", interrupted or "not every run finished", [], data,
                            "rerun to finish")
    else:
        before, after = last_s[0], last_s[-1]
        failed_run = next((m for m in (before, after) if m.error), None)
        if failed_run is not None:
            checks = [Check("runs", False, f"{failed_run.label}: {failed_run.error}")]
            summary = f"{failed_run.label} could not run at seq_len {failed_run.seq_len}: {failed_run.error}"
        else:
            checks = [kernel_check(before, after, after.backend)] if after.backend != "eager" else []
            checks.append(speed_check(before, after))
            mem = memory_check(before, after)
            checks += [mem] if mem else []
            data["speedup"] = before.latency_ms / after.latency_ms
            if before.peak_memory_mb and after.peak_memory_mb:
                data["memory_ratio"] = before.peak_memory_mb / after.peak_memory_mb
            summary = f"{before.label} -> {after.label} at seq_len {after.seq_len}: {comparison_summary(before, after)}"
            if len(data["sweep"]) > 1:
                summary += "; speedup by seq_len: " + ", ".join(f"{r['seq_len']}: {r['speedup']:.2f}x"
                                                                for r in data["sweep"])
        ok = all(c.passed for c in checks)
        result = StepResult("profile_attention", "pass" if ok else "fail", summary, checks, data,
                            "run compare_accuracy.py to check that the outputs still match" if ok else
                            "the switch does not pay at this shape: read the kernels each run shows; a longer "
                            "--seq-len raises attention's share of the time")
    if o.write_report:
        write_run_folder(result, Path(o.report_dir) if o.report_dir else
                         default_run_folder("profile_attention", first.loaded.name))
    return result
