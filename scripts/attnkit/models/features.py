"""The advanced attention features a model uses: read from its config and its batch.

``needed(loaded, inputs)`` names grouped-query (GQA) or multi-query (MQA) attention, a
sliding window, padding, logit soft-capping, ALiBi and attention dropout; which backends
provide each is in the backend records (``attnkit.backends``).
"""

from __future__ import annotations

from typing import Any


def sliding_window_of(config: Any) -> int | None:
    """The window the model really uses: ``sliding_window``, unless the config turns it off
    (Qwen2's ``use_sliding_window`` defaults to False)."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def needed(loaded: Any, inputs: Any) -> dict[str, str]:
    """The features ``loaded`` (a ``models.LoadedModel``) uses on ``inputs``: feature -> detail."""
    config = loaded.text_config
    out: dict[str, str] = {}
    shape = loaded.attention_shape() or {}
    heads, kv = shape.get("heads"), shape.get("kv_heads")
    if heads and kv == 1:
        out["mqa"] = f"{heads} query heads share 1 key/value head"
    elif heads and kv and kv < heads:
        out["gqa"] = f"{heads} query heads share {kv} key/value heads"
    window = sliding_window_of(config)
    if window:
        used = "exercised" if inputs.seq_len > window else f"not exercised at seq_len {inputs.seq_len}"
        out["sliding_window"] = f"window of {window} tokens ({used})"
    if inputs.padding_positions:
        out["padding"] = f"{inputs.padding_positions} padding positions in this batch"
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap:
        out["softcap"] = f"attn_logit_softcapping = {softcap}"
    if getattr(config, "alibi", False) or getattr(config, "model_type", "") == "bloom":
        out["alibi"] = "ALiBi position bias"
    for key in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        p = getattr(config, key, 0) or 0
        if isinstance(p, (int, float)) and p > 0:
            out["dropout"] = f"{key} = {p} (training only; inference runs without it)"
            break
    return out
