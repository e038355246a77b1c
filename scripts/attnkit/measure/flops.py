"""Useful FLOPs: the same count for every backend, so TFLOP/s compare.

2 FLOPs per multiply-add in every ``nn.Linear`` (and transformers' ``Conv1D``) over B*S
tokens (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1), plus
``attention_flops`` per layer (flash-attn's benchmarks/benchmark_flash_attention.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn


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


def site_flops(calls: list[tuple[Any, list[int]]]) -> float:
    """Useful forward FLOPs of recorded attention calls (``live.Swapper.capture``: pairs of
    a site and its [batch, S_q, S_k, D]): 4 x batch x pairs x D, with causal sites counting
    only the lower triangle, as ``attention_flops``."""
    total = 0.0
    for live, dims in calls:
        if len(dims) != 4 or not dims[3]:
            continue
        batch, sq, sk, d = dims
        causal = live.site is not None and live.site.mask.startswith("causal") and sq == sk
        pairs = sq * (sq + 1) // 2 if causal else sq * sk
        total += 4.0 * batch * pairs * d
    return total
