"""Measure one backend: the attention kernels that ran, peak memory, latency, TFLOP/s.

* Kernels: one forward pass under ``torch.profiler`` (``kernels.py`` reads the evidence).
* Peak memory (MB = 2**20 bytes): the most allocated at once during one forward pass
  above what was allocated before (activations, scores, output; not the weights). CUDA:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; CPU (no peak
  counter): the running sum of the profiler's memory events.
* Latency (ms): median and IQR of ``Timer.blocked_autorange`` (synchronises CUDA) after a warm-up.
* FLOPs: useful work, the same for every backend so TFLOP/s compare (``flops.py``).

Out of memory is recorded (``Measurement.error``); the caller goes on with the next backend.
"""

from __future__ import annotations

import gc
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..backends import SDPA
from ..report import NoKernel, OptionError, one_line, said
from ..swap import switch
from .flops import forward_flops
from .kernels import SDPA_OPS, attention_kernels, call_range, fused, profiled


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


@dataclass
class OomCaught:
    """``oom_caught``'s catch: ``message`` (``oom_message``) or None; true when set."""

    message: str | None = None

    def __bool__(self) -> bool:
        return self.message is not None


@contextmanager
def oom_caught(device: str | None = None) -> Iterator[OomCaught]:
    """The library's one out-of-memory catch: OOM ends the block quietly, kept as
    ``caught.message``, and empties the allocator's cache on ``device`` (None: CUDA if any).
    Other errors propagate::

        with oom_caught(device) as oom:
            time_paired(...)
        if oom:
            notes.append(f"the timing ran out of memory ({oom.message})")
    """
    caught = OomCaught()
    try:
        yield caught
    except Exception as exc:
        if not is_oom(exc):
            raise
        caught.message = oom_message(exc)
    if caught:  # outside the handler: the traceback, and the tensors its frames hold, are gone
        free_memory(device or ("cuda" if torch.cuda.is_available() else "cpu"))


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
    peak_memory_by_device: dict[str, float] | None = None  # a device-mapped model: MB per GPU
    implementation: str | None = None  # what switch.current said while it was measured
    device: str | None = None
    fallback_reason: str | None = None  # CUDA ran SDPA's math kernel: torch's reasons the fused kernels refused
    latency_samples_ms: list[float] = field(default_factory=list)  # interleaved rounds (``paired``)
    first_call_s: float | None = None  # the warm-up call, in s: compilation for a backend that compiles per shape

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fused(self) -> list[str]:
        """Fused attention ops seen (SDPA's non-math kernels, flash-attn, flex)."""
        return fused(self.kernels)


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


def cap_cuda_memory(limit_gb: float | None, device: str | int) -> dict[str, Any]:
    """Cap this process on GPU ``device`` ("cuda", "cuda:N" or N) at ``limit_gb`` GB (2**30
    bytes; None lifts it) by ``torch.cuda.set_per_process_memory_fraction``. Returns
    ``memory_limit_gb`` and ``enforced_by``. Raises ``OptionError`` for a limit not in
    (0, the GPU's memory]."""
    index = device if isinstance(device, int) else torch.device(device).index
    index = torch.cuda.current_device() if index is None else index  # "cuda" has no index
    total = torch.cuda.get_device_properties(index).total_memory
    if limit_gb is not None and not 0 < limit_gb * 2**30 <= total:
        raise OptionError("memory_limit", "{memory_limit} {value} GB is not between 0 and the GPU's {total:.1f} GB",
                          "leave it out to use the whole GPU", value=limit_gb, total=total / 2**30)
    fraction = 1.0 if limit_gb is None else limit_gb * 2**30 / total
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return {"memory_limit_gb": total / 2**30 if limit_gb is None else limit_gb,
            "enforced_by": f"torch.cuda.set_per_process_memory_fraction({fraction:.4f}) of {total / 2**30:.1f} GB"}


def fits_in_memory(run: Callable[[], Any], device: str) -> bool:
    """Whether ``run()`` finishes on ``device`` without OOM (other errors raise); the cache is
    emptied after. Every longest-sequence search's probe."""
    with oom_caught(device) as oom:
        run()
        synchronize(device)
    free_memory(device)
    return not oom


def search_longest(fits: Callable[[int], bool], cap: int, start: int = 512, unit: int = 1,
                   name: str = "prompt_len") -> dict[str, Any]:
    """The longest L <= ``cap``, a multiple of ``unit``, with ``fits(L)`` (monotone in L):
    ``cap`` first, else doubling from ``start`` to a failure, then bisecting to within 1/64
    (1.6 %) or one ``unit``. Returns max_context (0: nothing fits), first_failure (None when
    ``cap`` fits), capped, and the probes in order (``{name: L, "fits": bool}``).
    """
    probes: list[dict[str, Any]] = []

    def ok(n: int) -> bool:
        result = fits(n)
        probes.append({name: n, "fits": result})
        return result

    cap = cap // unit * unit
    if ok(cap):
        return {"max_context": cap, "first_failure": None, "capped": True, "probes": probes}
    lo, hi, n = 0, cap, max(unit, min(start, cap // 2) // unit * unit)
    while n < hi:
        if not ok(n):
            hi = n
            break
        lo = n
        n *= 2
    while hi - lo > max(unit, lo // 64):
        mid = (lo + hi) // 2 // unit * unit
        if mid <= lo:
            break
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return {"max_context": lo, "first_failure": hi, "capped": False, "probes": probes}


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def profile_once(run: Callable[[], Any], device: str, measurement: Measurement,
                 devices: list[str] | None = None) -> Any:
    """Run ``run()`` once under torch.profiler, fill kernels and peak memory, return its output.
    ``devices``: a device-mapped model's GPUs; the peak is then the sum of each GPU's
    (``peak_memory_by_device``)."""
    gpus = [d for d in (devices or [device]) if d.startswith("cuda")]
    base = {}
    for gpu in gpus:
        torch.cuda.reset_peak_memory_stats(gpu)
        base[gpu] = torch.cuda.memory_allocated(gpu)
    with profiled(device, memory=not device.startswith("cuda")) as prof:
        out = run()
        for gpu in gpus or [device]:
            synchronize(gpu)
    if gpus:
        peaks = {gpu: (torch.cuda.max_memory_allocated(gpu) - base[gpu]) / 2**20 for gpu in gpus}
        measurement.peak_memory_mb = sum(peaks.values())
        if len(gpus) > 1:
            measurement.peak_memory_by_device = peaks
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


#: Rounds of ``paired``: each side timed once per round, in turn, so a machine slowing down
#: slows both alike; 5, the fewest samples ``verdicts.speed_check`` takes for quartiles.
PAIRED_ROUNDS = 5
#: Warm-up ends when two consecutive block medians agree within this fraction (``warm_up``).
STABLE_WITHIN = 0.05


def warm_up(run: Callable[[], Any], seconds: float, label: str, tries: int = 3) -> int:
    """Time ``run`` in blocks of ``seconds`` until two consecutive medians agree within
    ``STABLE_WITHIN`` (lazy inits, allocator, clocks and caches settle), at most ``tries``
    blocks (the caller already ran it twice); returns how many it took."""
    last = None
    for block in range(1, tries + 1):
        median = time_it(run, seconds, label)[0]
        if last is not None and abs(median - last) <= STABLE_WITHIN * max(median, last):
            return block
        last = median
    return tries


def paired(sides: dict[str, tuple[Callable[[], Any], Callable[[], Any]]], min_run_time: float,
           rounds: int = PAIRED_ROUNDS) -> dict[str, list[float]]:
    """Interleaved timing of ways to run the same work: ``sides`` maps a label to (``scope``, a
    context manager putting the model in that side's state, ``run``, one pass). Each side
    is warmed up (``warm_up``), then timed once per round for ``min_run_time / rounds`` s.
    Returns label -> round medians (ms). Exceptions propagate (the scopes restored the model)."""
    block = max(min_run_time / rounds, 1e-3)
    for label, (scope, run) in sides.items():
        with scope():
            warm_up(run, block, label)
    samples: dict[str, list[float]] = {label: [] for label in sides}
    for _ in range(rounds):
        for label, (scope, run) in sides.items():
            with scope():
                samples[label].append(time_it(run, block, label)[0])
    return samples


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) by ``statistics.quantiles`` (exclusive); one sample is its own."""
    import statistics

    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    q1, q2, q3 = statistics.quantiles(samples, n=4)
    return q1, statistics.median(samples), q3


def set_latency(m: "Measurement", samples: list[float]) -> None:
    """Fill ``m``'s latency (median, IQR, samples) and TFLOP/s from ``paired``'s round medians."""
    q1, median, q3 = quartiles(samples)
    m.latency_ms, m.latency_iqr_ms, m.latency_samples_ms = median, q3 - q1, list(samples)
    m.runs = max(m.runs, len(samples))
    if m.flops and median:
        m.tflops = m.flops / (median * 1e-3) / 1e12


def no_kernel_error(exc: BaseException) -> bool:
    """SDPA's (or a library's) error when no allowed kernel could take the inputs."""
    return any(t in str(exc) for t in ("No available kernel", "No viable backend"))


def no_kernel_reasons(caught: list) -> str:
    """torch's own reasons why no SDPA kernel could take the inputs, from its warnings."""
    reasons = []
    for w in caught:
        text = one_line(w.message)
        text = re.sub(r" ?\(Triggered internally at [^)]*\)\.?", "", text).strip()
        if text and not text.endswith("not used because:") and text not in reasons:
            reasons.append(text)
    return one_line("; ".join(reasons), 600) or "torch gave no reason"


def measure(run: Callable[[], Any], *, backend: str, device: str, min_run_time: float = 1.0,
            flops: float | None = None, mode: str = "forward",
            devices: list[str] | None = None, timed: bool = True) -> tuple[Measurement, Any]:
    """Measure ``run`` (one pass, already on ``backend``): a warm-up (``first_call_s``,
    compilation included), a profiled pass (kernels, peak memory, the output returned), then
    ``time_it`` (with ``timed=False`` the caller times, ``paired``). OOM goes to
    ``Measurement.error``, the output None. Raises ``CannotRun`` (``NoKernel``, with torch's
    reasons) when no allowed SDPA kernel takes the inputs; other exceptions propagate.
    """
    m = Measurement(backend, flops=flops, mode=mode, device=device)
    out = None
    with oom_caught(device) as oom:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                t0 = time.perf_counter()
                run()  # warm-up: lazy inits, allocator growth, kernel selection, torch.compile's compilation
                synchronize(device)
                m.first_call_s = time.perf_counter() - t0
            except RuntimeError as exc:
                if not no_kernel_error(exc):
                    raise
                reasons = no_kernel_reasons(caught)
                if device == "cpu" and reasons == "torch gave no reason":
                    reasons = "on CPU, SDPA has only its flash and math kernels"
                raise NoKernel(backend, reasons) from None
        synchronize(device)
        with call_range(backend):  # a compiled backend's graphs are told apart by the call they ran in
            out = profile_once(run, device, m, devices)
        if not timed:
            return m, out
        m.latency_ms, m.latency_iqr_ms, m.runs = time_it(run, min_run_time, backend)
        if flops and m.latency_ms:
            m.tflops = flops / (m.latency_ms * 1e-3) / 1e12
    if oom:
        m.error, out = oom.message, None
    return m, out


def forward_fn(loaded: Any, inputs: Any, sdpa_kernels: list[str] | None = None) -> Callable[[], torch.Tensor]:
    """A closure running one inference forward pass of ``loaded`` on ``inputs``."""
    def run() -> torch.Tensor:
        # not inference_mode: tensors written in place (a KV cache) must stay writable after
        with torch.no_grad(), switch.sdpa_kernels(sdpa_kernels):
            return loaded.forward(inputs)

    return run


def train_fn(loaded: Any, inputs: Any, sdpa_kernels: list[str] | None = None,
             gradients: bool = True) -> Callable[[], tuple]:
    """A closure running one forward + backward pass of loss sum(output * G), G fixed random
    (seed 0, kept in ``loaded.train_weights`` so every run, float64 included, uses it).
    Returns (output, gradients: parameter name or "input:i" -> grad); ``gradients=False``
    copies none (the copies would add the weights' size to a timing's peak memory)."""
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
        grads = {} if not gradients else {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                          if p.grad is not None}
        if gradients:
            grads.update({f"input:{i}": a.grad.detach().clone() for i, a in enumerate(args)
                          if isinstance(a, torch.Tensor) and a.grad is not None})
        for p in model.parameters():  # zero_grad(set_to_none=True): the next peak starts clean
            p.grad = None
        return out.detach(), grads

    return run


def run_backend(loaded: Any, inputs: Any, backend: str, sdpa_kernels: list[str] | None = None) -> torch.Tensor:
    """One untimed forward pass with ``backend`` inside ``switch.using``; the output. Raises
    ``CannotRun`` when the switch is refused (``switch.apply``)."""
    with switch.using(loaded.model, backend):
        return forward_fn(loaded, inputs, sdpa_kernels)()


def measure_backend(loaded: Any, inputs: Any, backend: str, *, min_run_time: float = 1.0,
                    sdpa_kernels: list[str] | None = None, label: str | None = None, train: bool = False,
                    flops: float | None = None, gradients: bool = True, timed: bool = True) -> tuple[Measurement, Any]:
    """``measure`` one pass on ``inputs`` (forward + backward with ``train``) inside
    ``switch.using(model, backend)``: (measurement, output, or (output, gradients) with
    ``train``; None on OOM). ``flops`` overrides ``forward_flops`` (with ``train`` x3 for
    linear layers, x3.5 for attention: flash-attn's benchmark counts a backward as 2.5
    forwards). Raises ``CannotRun`` when the switch is refused (``switch.apply``).
    """
    if flops is None:
        flops = forward_flops(loaded.model, inputs.batch_size, inputs.seq_len, loaded.attention_shape(), train)
    run = train_fn(loaded, inputs, sdpa_kernels, gradients) if train else forward_fn(loaded, inputs, sdpa_kernels)
    with switch.using(loaded.model, backend):
        m, out = measure(run, backend=backend, device=loaded.device, min_run_time=min_run_time, flops=flops,
                         mode="forward+backward" if train else "forward", devices=getattr(loaded, "devices", None),
                         timed=timed)
        m.implementation = switch.current(loaded.model)
        if m.error is None and loaded.device.startswith("cuda") and MATH_OP in m.kernels:
            m.fallback_reason = fused_refusal(loaded, inputs, sdpa_kernels)
    m.label, m.seq_len = label, inputs.seq_len
    return m, out


def time_paired(sides: list[tuple[Any, Any, str, list[str] | None, Measurement]], min_run_time: float,
                train: bool = False) -> None:
    """Re-time measured runs against each other (``paired``, each inside ``switch.using``) and
    ``set_latency``: ``sides`` holds (``models.LoadedModel``, ``Inputs``, backend, allowed
    SDPA kernels, measurement), before first. Raises what a run raises (OOM included)."""
    runs = {}
    for i, (loaded, inputs, backend, kernels, m) in enumerate(sides):
        run = train_fn(loaded, inputs, kernels, gradients=False) if train else forward_fn(loaded, inputs, kernels)
        runs[f"{i}:{m.label or backend}"] = (lambda loaded=loaded, backend=backend: switch.using(loaded.model, backend),
                                             run)
    samples = paired(runs, min_run_time)
    for values, side in zip(samples.values(), sides):
        set_latency(side[4], values)


#: SDPA's unfused kernel, as the profiler names it: on a GPU, the same work as eager attention.
MATH_OP = "aten::_scaled_dot_product_attention_math"


def fused_refusal(loaded: Any, inputs: Any, sdpa_kernels: list[str] | None) -> str:
    """Why SDPA ran its math kernel on a GPU: a pass with only fused kernels allowed, where
    torch raises "No available kernel" and warns each kernel's reason ("Flash attention
    requires ..."); their text, or that a fused kernel could take the inputs."""
    fused_names = [k.name for k in SDPA.kernels if k.fused and "cuda" in k.devices]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            forward_fn(loaded, inputs, fused_names)()
        except RuntimeError as exc:
            if not no_kernel_error(exc):
                return f"the fused-only pass raised {said(exc, 200)}"
            return no_kernel_reasons(caught)
    allowed = ", ".join(sdpa_kernels) if sdpa_kernels else "torch's own choice"
    return f"a fused kernel can take these inputs; the math kernel ran because it was allowed ({allowed})"


def matmul_peak(device: str, dtype: torch.dtype, n: int | None = None, min_run_time: float = 0.5) -> float:
    """TFLOP/s of [n, n] @ [n, n] in ``dtype`` (2 * n**3 FLOPs, median of ``time_it``; n 8192
    on a GPU, 2048 on CPU): the measured peak attention's % of peak refers to."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    time_it(lambda: a @ b, min_run_time, "matmul")  # warm-up: clocks up, cuBLAS heuristics cached
    median = time_it(lambda: a @ b, min_run_time, "matmul")[0]
    return 2.0 * n**3 / (median * 1e-3) / 1e12


def peak_memory_mb(run: Callable[[], Any], device: str) -> float | None:
    """Peak memory (MB) one call of ``run`` allocates above what was there (module docstring)."""
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with profiled(device, memory=True) as prof, torch.no_grad():
        run()
    return _cpu_peak_mb(prof)
