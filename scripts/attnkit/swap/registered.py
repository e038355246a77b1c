"""Backends transformers does not name, registered with its ``AttentionInterface``.

transformers 5 looks a model's attention function up by ``config._attn_implementation``
in ``AttentionInterface`` (``ALL_ATTENTION_FUNCTIONS``); ``AttentionInterface.register(name,
fn)`` adds a name for every model that uses the interface (Llama, Qwen2, Mistral, ...), and
``set_attn_implementation(name)`` then switches to it like to a built-in one
(transformers/modeling_utils.py, 5.17 and 5.23 alike; docs: "attention_interface").

``register(record)`` installs, for a registry record with ``hf=False`` and a ``call``
(``backends/calls.py``'s signature, [B, S, H, D]), an attention function that:

* takes transformers' q [B, H, S_q, D], k and v [B, H_kv, S_k, D] and returns
  (out [B, S_q, H, D], None), as ``sdpa_attention_forward`` does;
* refuses what the record's kernel does not compute, with the reason, rather than
  computing something else: any attention mask, dropout, softcap;
* is causal when the layer is (``module.is_causal``) and S_q > 1, as SDPA's ``is_causal``.

The mask: transformers skips building a mask for a name it does not know, and would hand
the raw 2-D padding mask through. So the name is also registered with
``AttentionMaskInterface`` as ``sdpa_mask``, transformers' own SDPA mask builder, which
returns None exactly when the mask is plainly causal (no padding, no window, S_q == S_k
or a single query: ``_ignore_causal_mask_sdpa``) and a 4-D mask otherwise. None runs;
a 4-D mask is refused.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from ..backends import Backend
from ..report import CannotRun, Unsupported

_REGISTERED: dict[str, Callable] = {}
_OBSERVERS: list[Callable] = []


@contextlib.contextmanager
def observe(fn: Callable) -> Iterator[None]:
    """Inside the block, every call of a registered attention function also calls
    ``fn(module, query, key, value, out, causal, scale)``: query [B, H, S_q, D], key and
    value [B, H_kv, S_k, D] as transformers passed them, out [B, S_q, H, D] as returned.
    ``measure.accuracy.attention_errors`` uses it to judge each layer on its own inputs."""
    _OBSERVERS.append(fn)
    try:
        yield
    finally:
        _OBSERVERS.remove(fn)


def attention_function(record: Backend) -> Callable:
    """transformers' attention-function signature around ``record.call``."""
    name, call = record.name, record.call

    def forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        # query [B, H, S_q, D], key/value [B, H_kv, S_k, D]
        where = type(module).__name__
        if attention_mask is not None:
            raise Unsupported(f"{name} takes no attention mask, and this batch needs one (padding, a sliding window or "
                              f"a custom mask: {list(attention_mask.shape)}): {record.description}", where,
                              "call the model without attention_mask on unpadded batches of a model without sliding "
                              "windows, or use attn_implementation='sdpa'")
        if dropout:
            raise Unsupported(f"{name} has no attention dropout (p={dropout}); it runs inference only", where,
                              "call model.eval() first")
        if kwargs.get("softcap"):
            raise Unsupported(f"{name} takes no logit soft-capping", where,
                              "use attn_implementation='eager' or 'flex_attention' for softcap")
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(is_causal) and query.shape[2] > 1  # one query token sees every cached key
        out = call(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),  # [B, S, H, D] views
                   causal=causal, scale=scaling)
        for fn in _OBSERVERS:
            fn(module, query, key, value, out, causal, scaling)
        return out, None

    forward.__name__ = f"{name}_attention_forward"
    forward.__doc__ = f"transformers attention function for the {name} backend: {record.description}"
    return forward


def register(record: Backend) -> None:
    """Register ``record`` (``hf=False``, with a ``call``) under its name with transformers'
    ``AttentionInterface`` and ``AttentionMaskInterface`` (once per process). Raises
    ``CannotRun`` for a record without a ``call``."""
    if record.name in _REGISTERED:
        return
    if record.call is None:
        raise CannotRun(f"{record.name} has no call to register with transformers", "")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    fn = attention_function(record)
    AttentionInterface.register(record.name, fn)
    AttentionMaskInterface.register(record.name, sdpa_mask)
    _REGISTERED[record.name] = fn


def registered(name: str) -> bool:
    """True once ``register`` installed ``name`` in this process."""
    return name in _REGISTERED
