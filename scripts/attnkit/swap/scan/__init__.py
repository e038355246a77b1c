"""scan: hand-written attention read from source, without importing it.

A *site* is the chain ``scores = Q Kᵀ`` -> optional scale / mask / upcast -> ``softmax``
over the last dimension -> optional dropout / cast -> ``P V``, written with ``@``,
``torch.matmul``, ``torch.bmm``, ``torch.baddbmm`` or ``torch.einsum``, in one block of
statements of one function. ``analyze_source`` finds every site in a file (no import) and
also reports the calls that already take a fast path (``F.scaled_dot_product_attention``,
``flash_attn_func``) with what keeps them off the flash kernel, and the
``nn.MultiheadAttention`` calls that leave ``need_weights`` at its default of True (which
materialises the attention matrix).

For a site it can prove equivalent, ``Site.edits`` holds the source change: the chain's
statements removed and its value product replaced by one call::

    F.scaled_dot_product_attention(Q, K, V, attn_mask=..., dropout_p=..., is_causal=...,
                                   scale=..., enable_gqa=...)

with the same Q, K and V operands, ``scale`` = the product of every scalar factor applied
to the scores between the product and the softmax (1.0 when none: the raw product is not
SDPA's default 1/sqrt(d)), masks carried over (``masked_fill(M, -inf)`` keeps ``~M``, an
added mask stays additive, a causal ``tril``/``triu`` mask becomes ``is_causal``), dropout
applied only when the original applied it, and a key/value ``repeat_interleave`` on the
head dimension turned into ``enable_gqa=True``. 3-D (``bmm``) sites get a leading batch
dimension, since SDPA's fused kernels take 4-D inputs. What cannot be proved is reported
with its reason and left as it is.

The passes are modules of their own; ``analysis`` runs them.
"""

from .analysis import analyze_path, analyze_source, python_files
from .site import Site

__all__ = ["Site", "analyze_path", "analyze_source", "python_files"]
