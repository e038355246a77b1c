"""FP8 attention on Hopper with FlashAttention-3 (module ``flash_attn_interface``).

FP8 attention does not come from ``flash_attn.flash_attn_func`` (FlashAttention-2 runs
fp16 and bf16 only). It is FlashAttention-3's separate Hopper build, forward only. The
facts this module relies on, from the flash-attention repository's ``hopper/`` folder:

* ``flash_attn_interface.flash_attn_func(q, k, v, softmax_scale=None, causal=False,
  qv=None, q_descale=None, k_descale=None, v_descale=None, window_size=(-1, -1), ...,
  return_attn_probs=False)``, layout ``[B, S, H, D]``; it returns the output, or
  ``(out, softmax_lse)`` in builds before PR #1851 and with ``return_attn_probs=True``;
* FP8 inputs are ``torch.float8_e4m3fn``; ``q_descale``, ``k_descale``, ``v_descale`` are
  float32 of shape ``(batch, num_heads_k)`` ("(b, h_k), not (b, h)", hopper/flash_api.cpp);
  the output is bf16 ("For FP8 input, output must have dtype BF16"); head_dim must be a
  multiple of 16 for FP8; there is no FP8 backward;
* it needs an H100/H800-class GPU (sm90) and CUDA 12.3+ (flash-attention README,
  FlashAttention-3 section).

``fp8_attention`` quantises random bf16 inputs per (batch, key/value head) with
amax / 448 (the largest e4m3 value, ``torch.finfo(torch.float8_e4m3fn).max``), runs FP8
and bf16 FlashAttention-3, and judges both against a float32 SDPA math reference with
the usual rule, ``err_fp8 <= 2 x err_bf16 + eps(e4m3) x max|ref|`` (eps(e4m3) = 0.125).
Where any requirement is missing it returns ``skip`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backends import BACKENDS, probe
from ..env import architecture, environment
from ..measure.flops import attention_flops
from ..measure.timing import time_it
from ..report import CannotRun, Check, StepResult, fmt_ms

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448.0


@dataclass
class Fp8Options:
    """What ``fp8_attention.py`` takes (see its --help). Shapes: q [B, S, H, D], k/v [B, S, H_kv, D]."""

    batch_size: int = 2
    seq_len: int = 4096
    heads: int = 16
    kv_heads: int = 16
    head_dim: int = 128
    causal: bool = True
    compare_bf16: bool = False
    min_run_time: float = 1.0


def quantize(x: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x [B, S, H, D] to e4m3 with one scale per (batch, key/value head group).

    Returns (x_fp8 [B, S, H, D], descale [B, H_kv] float32), where x ~= x_fp8 * descale
    (descale broadcast over the H / H_kv query heads of each group).
    """
    b, s, h, d = x.shape
    group = h // kv_heads
    amax = x.float().abs().reshape(b, s, kv_heads, group, d).amax(dim=(1, 3, 4))  # [B, H_kv]
    descale = (amax / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    per_head = descale.repeat_interleave(group, dim=1)[:, None, :, None]  # [B, 1, H, 1]
    return (x.float() / per_head).to(E4M3), descale.float().contiguous()


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention in float32 by SDPA's math kernel; [B, S, H, D] in and out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),  # [B, H, S, D]
            is_causal=causal, enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def requirements(env: Any) -> list[str]:
    """Why FP8 FlashAttention-3 cannot run here (empty when it can)."""
    reasons = []
    if not env.cuda_available:
        reasons.append("no CUDA GPU is visible (FP8 FlashAttention-3 needs a Hopper GPU)")
    elif env.capability and env.capability[0] != 9:
        reasons.append(f"GPU 0 is {architecture(env.capability)}; FlashAttention-3's FP8 path needs Hopper (sm90)")
    fa3 = BACKENDS["flash_attention_3"]
    if probe.installed(fa3) is None:
        reasons.append(f"flash_attn_interface: not installed: {fa3.install}")
    elif not probe.imports(fa3).importable:
        reasons.append(f"flash_attn_interface: {probe.imports(fa3).meaning}")
    return reasons


def fp8_attention(o: Fp8Options, reporter: Any) -> StepResult:
    """Run FP8 and bf16 FlashAttention-3 on the same inputs; ``skip`` when it cannot run here.

    Without ``compare_bf16`` the step passes when FP8 runs and returns a finite bf16 output;
    with it, when FP8's error stays within the rule above. Raises ``CannotRun`` for shapes
    FlashAttention-3 does not take (head_dim not a multiple of 16 or over 256, heads not a
    multiple of kv_heads).
    """
    step = "fp8_attention"
    if o.heads % o.kv_heads:
        raise CannotRun(f"--heads {o.heads} is not a multiple of --kv-heads {o.kv_heads}", "")
    if o.head_dim % 16 or o.head_dim > 256:
        raise CannotRun(f"--head-dim {o.head_dim}: FP8 FlashAttention-3 needs a multiple of 16, at most 256", "")
    env = environment()
    shape = {"batch_size": o.batch_size, "seq_len": o.seq_len, "heads": o.heads, "kv_heads": o.kv_heads,
             "head_dim": o.head_dim, "causal": o.causal, "layout": "[B, S, H, D]"}
    data: dict[str, Any] = {"shape": shape, "device": "cuda" if env.cuda_available else "cpu",
                            "gpu": env.gpus[0].name if env.gpus else None,
                            "flash_attn_interface": probe.package_probe("flash_attn_interface").to_dict()}
    missing = requirements(env)
    if missing:
        return StepResult(step, "skip", "FP8 attention not run: " + "; ".join(missing), [], data,
                          "FP8 attention needs FlashAttention-3 on a Hopper GPU; use bf16 (enable_flash.py) here")
    import flash_attn_interface as fa3

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(o.batch_size, o.seq_len, o.heads, o.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(o.batch_size, o.seq_len, o.kv_heads, o.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(o.batch_size, o.seq_len, o.kv_heads, o.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    with reporter.stage("float32 reference (SDPA math)"):
        ref = reference(q, k, v, o.causal)
    q8, qd = quantize(q, o.kv_heads)
    k8, kd = quantize(k, o.kv_heads)
    v8, vd = quantize(v, o.kv_heads)

    def run_bf16():
        return _first(fa3.flash_attn_func(q, k, v, causal=o.causal))

    def run_fp8():
        return _first(fa3.flash_attn_func(q8, k8, v8, causal=o.causal, q_descale=qd, k_descale=kd, v_descale=vd))

    flops = attention_flops(o.batch_size, o.seq_len, o.heads, o.head_dim, 1, o.causal)
    runs = {}
    for name, fn in (("bf16", run_bf16), ("fp8", run_fp8)):
        with reporter.stage(f"FlashAttention-3 {name}"):
            out = fn()
            torch.cuda.synchronize()
            median, iqr, n = time_it(fn, o.min_run_time, name)
        err = float((out.float() - ref).abs().max())
        runs[name] = {"latency_ms": median, "latency_iqr_ms": iqr, "runs": n, "tflops": flops / (median * 1e-3) / 1e12,
                      "max_abs_err": err, "output_dtype": str(out.dtype).replace("torch.", ""),
                      "finite": bool(torch.isfinite(out).all())}
    scale = float(ref.abs().max())
    tol = 2 * runs["bf16"]["max_abs_err"] + torch.finfo(E4M3).eps * scale
    data.update({"runs": runs, "tolerance": tol, "rule": "err_fp8 <= 2 x err_bf16 + eps(e4m3) x max|ref|",
                 "reference": "float32 SDPA math"})
    f8, b16 = runs["fp8"], runs["bf16"]
    ran = Check("fp8_runs", f8["finite"] and f8["output_dtype"] == "bfloat16",
                f"FP8 forward: {fmt_ms(f8['latency_ms'])}, {f8['tflops']:.0f} TFLOP/s, output {f8['output_dtype']}, "
                f"finite {f8['finite']}; bf16: {fmt_ms(b16['latency_ms'])}, {b16['tflops']:.0f} TFLOP/s")
    checks = [ran]
    if o.compare_bf16:
        checks.append(Check("accuracy", f8["max_abs_err"] <= tol,
                            f"fp8 max_abs_err {f8['max_abs_err']:.1e} {'<=' if f8['max_abs_err'] <= tol else '>'} "
                            f"tol {tol:.1e} (2 x bf16 {b16['max_abs_err']:.1e} + eps(e4m3) x max|ref|)"))
    ok = all(c.passed for c in checks)
    summary = (f"FP8 {f8['tflops']:.0f} TFLOP/s vs bf16 {b16['tflops']:.0f} TFLOP/s "
               f"({b16['latency_ms'] / f8['latency_ms']:.2f}x); " + checks[-1].evidence)
    return StepResult(step, "pass" if ok else "fail", summary, checks, data,
                      "FP8 is forward only: use it for inference" if ok else "keep bf16 for this model")
