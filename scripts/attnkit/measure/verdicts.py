"""Verdicts on two measurements: did the backend's kernel run, is it faster, smaller?"""

from __future__ import annotations

from ..backends import BACKENDS, SDPA
from ..report import Check, fmt_iqr, fmt_kernels, fmt_mb, fmt_ms
from .timing import Measurement


def kernel_check(before: Measurement, after: Measurement, backend: str, sdpa_kernel: str | None = None) -> Check:
    """The kernel of ``backend`` ran after and not before (profiler names as evidence): its
    fused kernel, or, when ``sdpa_kernel`` names the one SDPA kernel that was allowed (the
    autotuner's choice), that kernel's op, fused or not."""
    markers = BACKENDS[backend].kernel_markers
    if sdpa_kernel is not None:
        markers = SDPA.kernel(sdpa_kernel).ops
    expected = [k for k in after.kernels if any(mark in k for mark in markers)]
    already = [k for k in before.kernels if any(mark in k for mark in markers)]
    evidence = (f"before ({before.label or before.backend}): {fmt_kernels(before.kernel_counts)}; "
                f"after ({after.label or backend}): {fmt_kernels(after.kernel_counts)}")
    if not markers:
        return Check("kernels", False, evidence + f"; {backend} has no fused kernel to look for")
    if sdpa_kernel is not None and not SDPA.kernel(sdpa_kernel).fused:
        evidence += f"; {sdpa_kernel} is SDPA's unfused kernel, chosen because it measured fastest here"
    elif "aten::_scaled_dot_product_attention_math" in after.kernels and not expected:
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
