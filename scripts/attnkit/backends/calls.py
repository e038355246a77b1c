"""How each backend is called on tensors: one function per backend, one signature.

Every function takes q [B, S, H, D], k and v [B, S, H_kv, D] (H a multiple of H_kv: GQA
and MQA) in the layout transformers and flash-attn store, and returns out [B, S, H, D].
SDPA and flex_attention are given ``transpose(1, 2)`` views in their [B, H, S, D] layout,
without a copy, as transformers' ``sdpa_attention_forward`` does.

Keyword arguments, all optional: ``causal`` (bool), ``scale`` (float, default
1/sqrt(D)), ``window`` ((left, right) in tokens, -1 unbounded; flash-attn's
``window_size`` convention), ``softcap`` (float), ``sdpa_kernel`` (SDPA only). A backend
that does not take an argument raises ``ValueError`` saying so, rather than computing
something else.

Causal alignment differs between libraries when S_q != S_k: SDPA's ``is_causal`` is
top-left aligned (query i sees keys 0..i), flash-attn's ``causal`` bottom-right (query i
sees keys 0..i + S_k - S_q). ``causal`` here means the backend's own; for S_q == S_k
they agree.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def _check(name: str, window, softcap) -> None:
    if window is not None and tuple(window) != (-1, -1):
        raise ValueError(f"{name} takes no window here")
    if softcap:
        raise ValueError(f"{name} takes no softcap")


def eager(q, k, v, *, causal=False, scale=None, window=None, softcap=None, **_):
    """matmul -> softmax -> matmul, in the inputs' dtype; materialises [B, H, S_q, S_k]."""
    _check("eager", window, None)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    rep = qh.shape[1] // kh.shape[1]
    if rep > 1:
        kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
    scores = (qh @ kh.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if causal:
        s_q, s_k = scores.shape[-2:]
        keep = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
        scores = scores.masked_fill(~keep, float("-inf"))
    return (scores.softmax(dim=-1) @ vh).transpose(1, 2)


def sdpa(q, k, v, *, causal=False, scale=None, window=None, softcap=None, sdpa_kernel=None, **_):
    """``F.scaled_dot_product_attention`` on [B, H, S, D] views, optionally restricted to one
    of its kernels (``sdpa_kernel``, a ``record.SdpaKernel``, allowed alone through
    ``torch.nn.attention.sdpa_kernel``); GQA through ``enable_gqa``."""
    _check("sdpa", window, softcap)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    gqa = qh.shape[1] != kh.shape[1]
    if sdpa_kernel is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=gqa)
    else:
        from torch.nn.attention import SDPBackend
        from torch.nn.attention import sdpa_kernel as allow

        with allow([getattr(SDPBackend, sdpa_kernel.sdp_backend)]):
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


#: The profiler range around each call of a backend's attention function: how a compiled
#: backend's kernels, which carry no name of their own, are told apart (measure.kernels).
CALL_RANGE = "attnkit.call: "


@functools.lru_cache(maxsize=None)
def compiled_flex():
    """``torch.compile(flex_attention, dynamic=False)``, as transformers compiles it: one
    kernel per shape and score_mod (uncompiled, flex_attention runs a reference that forms
    the whole score matrix: torch.nn.attention.flex_attention docs). Dynamo's recompile
    limit (8 per code object) is raised to 256 here: past it Dynamo silently runs the
    uncompiled reference, which a grid of 12 shapes reached (H100, 2026-12-07)."""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _causal_block_mask(s_q: int, s_k: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = s_k - s_q  # bottom-right, as flash-attn; equal to top-left for S_q == S_k

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return create_block_mask(causal, None, None, s_q, s_k, device=device)


def flex(q, k, v, *, causal=False, scale=None, window=None, softcap=None, **_):
    """``flex_attention`` compiled once per shape (``torch.compile``), causal through a block
    mask, softcap through a score_mod."""
    if window is not None and tuple(window) != (-1, -1):
        raise ValueError("flex_attention takes a window as a block mask; not built here")
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    mask = _causal_block_mask(q.shape[1], k.shape[1], str(q.device)) if causal else None
    score_mod = None
    if softcap:
        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)
    out = compiled_flex()(qh, kh, vh, score_mod=score_mod, block_mask=mask, scale=scale,
                  enable_gqa=qh.shape[1] != kh.shape[1])
    return out.transpose(1, 2)


def _first(out):
    """flash-attn functions return the output, or (output, softmax_lse, ...)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _flash_kwargs(window, softcap) -> dict:
    kw = {}
    if window is not None:
        kw["window_size"] = tuple(window)
    if softcap:
        kw["softcap"] = softcap
    return kw


def flash_attn_2(q, k, v, *, causal=False, scale=None, window=None, softcap=None, **_):
    """``flash_attn.flash_attn_func`` (FlashAttention-2), [B, S, H, D] as is."""
    from flash_attn import flash_attn_func

    return _first(flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, **_flash_kwargs(window, softcap)))


def flash_attn_3(q, k, v, *, causal=False, scale=None, window=None, softcap=None, **_):
    """``flash_attn_interface.flash_attn_func`` (FlashAttention-3), [B, S, H, D] as is."""
    from flash_attn_interface import flash_attn_func

    return _first(flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, **_flash_kwargs(window, softcap)))


def flash_attn_4(q, k, v, *, causal=False, scale=None, window=None, softcap=None, **_):
    """``flash_attn.cute.flash_attn_func`` (FlashAttention-4, CuTe DSL), [B, S, H, D] as is.
    Its window is ``window_size=(left, right)`` with None for unbounded."""
    from flash_attn.cute import flash_attn_func

    kw = {}
    if window is not None and tuple(window) != (-1, -1):
        kw["window_size"] = tuple(None if w < 0 else w for w in window)
    if softcap:
        kw["softcap"] = softcap
    return _first(flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, **kw))
