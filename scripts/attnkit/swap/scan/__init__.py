"""scan: hand-written attention read from source, without importing it.

A *site* is the chain ``scores = Q Kᵀ`` -> optional scale / mask / upcast -> ``softmax``
over the last dimension -> optional dropout / cast -> ``P V`` (``@``, ``matmul``, ``bmm``,
``baddbmm`` or ``einsum``) in one function. ``analyze_source`` finds every site in a file
(no import), the calls already on a fast path (``F.scaled_dot_product_attention``,
``flash_attn_func``) with what keeps them off the flash kernel, and
``nn.MultiheadAttention`` calls leaving ``need_weights=True`` (the weights materialised).

For a site proved equivalent, ``Site.edits`` removes the chain's statements and replaces
its value product by one call on the same Q, K, V::

    F.scaled_dot_product_attention(Q, K, V, attn_mask=..., dropout_p=..., is_causal=...,
                                   scale=..., enable_gqa=...)

(scale and masks: ``masks``; layout and GQA: ``layout``; dropout only where the original
applied it). What cannot be proved is reported with its reason and left as it is. The
passes are modules of their own; ``analysis`` runs them.
"""

from .analysis import analyze_path, analyze_source, python_files
from .site import Site

__all__ = ["Site", "analyze_path", "analyze_source", "python_files"]
