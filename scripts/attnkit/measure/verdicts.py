"""Verdicts on two measurements: did the backend's kernel run, is it faster, smaller?"""

from __future__ import annotations

from ..backends import BACKENDS, SDPA
from ..report import Check, fmt_iqr, fmt_kernels, fmt_mb, fmt_ms
from .timing import MATH_OP, Measurement, quartiles

#: The fewest interleaved samples of each side a speed claim rests on.
MIN_SAMPLES = 5


def kernel_check(before: Measurement, after: Measurement, backend: str, sdpa_kernel: str | None = None) -> Check:
    """The kernel of ``backend`` ran after and not before (profiler names as evidence): its
    fused kernel, or, when ``sdpa_kernel`` names the one SDPA kernel that was allowed (the
    autotuner's choice), that kernel's op, fused or not.

    Never a pass: the same attention ops before and after (nothing changed), and, on a GPU,
    SDPA's math kernel, which does the work of eager attention in the same unfused ops; the
    evidence then gives torch's reasons why no fused kernel took the inputs
    (``Measurement.fallback_reason``)."""
    markers = BACKENDS[backend].kernel_markers
    if sdpa_kernel is not None:
        markers = SDPA.kernel(sdpa_kernel).ops
    expected = [k for k in after.kernels if any(mark in k for mark in markers)]
    already = [k for k in before.kernels if any(mark in k for mark in markers)]
    evidence = (f"before ({before.label or before.backend}): {fmt_kernels(before.kernel_counts)}; "
                f"after ({after.label or backend}): {fmt_kernels(after.kernel_counts)}")
    if not markers:
        return Check("kernels", False, evidence + f"; {backend} has no fused kernel to look for")
    if after.kernel_counts and after.kernel_counts == before.kernel_counts:
        return Check("kernels", False, evidence + "; the same attention ops ran before and after: nothing changed")
    on_gpu = (after.device or "").startswith("cuda")
    if on_gpu and MATH_OP in after.kernels:
        return Check("kernels", False, evidence + "; SDPA ran its unfused math kernel on the GPU, the same work as "
                     f"eager attention: {after.fallback_reason or 'torch gave no reason'}")
    if sdpa_kernel is not None and not SDPA.kernel(sdpa_kernel).fused:
        evidence += f"; {sdpa_kernel} is SDPA's unfused kernel, chosen because it measured fastest here"
    elif MATH_OP in after.kernels and not expected:
        evidence += "; sdpa fell back to its unfused math kernel"
    if already:
        evidence += "; the fused kernel already ran before"
    return Check("kernels", bool(expected) and not already, evidence)


def speed_check(before: Measurement, after: Measurement) -> Check:
    """``after`` is measurably faster: the interquartile ranges of the two sides'
    interleaved samples (``timing.paired``, at least 5 a side) do not overlap and ``after``'s
    is the lower. Overlapping ranges are "no measurable change"; the same attention ops
    before and after make no speed claim at all (whatever the clock said, nothing that runs
    changed); fewer than 5 samples a side is not evidence either."""
    if not before.latency_ms or not after.latency_ms:
        return Check("speed", False, "no speed claim: the two sides were not both timed")
    speedup = before.latency_ms / after.latency_ms
    text = f"median {fmt_ms(before.latency_ms)} -> {fmt_ms(after.latency_ms)} ({speedup:.2f}x; IQR {fmt_iqr(before)} / " \
           f"{fmt_iqr(after)}"
    n_before, n_after = len(before.latency_samples_ms), len(after.latency_samples_ms)
    text += f", {min(n_before, n_after)} interleaved samples a side)"
    if before.kernel_counts and before.kernel_counts == after.kernel_counts:
        return Check("speed", False, text + "; no speed claim: the same attention ops ran before and after")
    if min(n_before, n_after) < MIN_SAMPLES:
        return Check("speed", False, text + f"; no speed claim: fewer than {MIN_SAMPLES} interleaved samples a side")
    b1, _, b3 = quartiles(before.latency_samples_ms)
    a1, _, a3 = quartiles(after.latency_samples_ms)
    if a3 < b1:
        return Check("speed", True, text + f"; after's IQR [{a1:.3g}, {a3:.3g}] ms below before's [{b1:.3g}, {b3:.3g}]")
    if b3 < a1:
        return Check("speed", False, text + "; measurably slower: the IQRs do not overlap")
    return Check("speed", False, text + "; no measurable change: the IQRs overlap")


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
