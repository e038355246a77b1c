"""The inputs of one forward pass: token ids and masks, or a factory's own tensors.

``Inputs`` holds positional ``args`` (factory models) or ``kwargs`` (``input_ids`` and
``attention_mask`` [B, S] for transformers models) and ``valid`` [B, S], True at real
tokens. Padding is on the right: row 0 is full, later rows lose up to ``pad_fraction``
of S (``row_lengths``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

#: Text for realistic token inputs (our own words), repeated to fill a sequence.
TEXT = (
    "Attention compares every query with every key, so its cost grows with the square of the "
    "sequence length. The eager implementation writes the whole score matrix to memory, applies "
    "the mask and the softmax, and reads it back to weight the values. A fused kernel keeps each "
    "block of scores in fast on-chip memory instead, rescales a running softmax as new blocks "
    "arrive, and never stores the full matrix. The result is the same function, computed with "
    "less traffic to memory, which is why long sequences become both faster and smaller. "
    "Padding tokens carry no meaning; the mask removes them from every softmax, and a careful "
    "comparison leaves them out. Grouped-query attention shares each key and value head among "
    "several query heads, which shrinks the cache that generation keeps for every past token. "
)


@dataclass
class Inputs:
    """Inputs of one forward pass.

    ``kwargs`` for transformers models (``input_ids`` [B, S], ``attention_mask`` [B, S]),
    ``args`` for factory models; ``valid`` [B, S] bool is True at real tokens and False at
    padding (None when the model takes no mask).
    """

    batch_size: int
    seq_len: int
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    valid: torch.Tensor | None = None
    description: str = ""

    def cast(self, dtype: torch.dtype) -> "Inputs":
        """The same inputs with floating tensors cast to ``dtype`` (token ids untouched)."""
        return Inputs(self.batch_size, self.seq_len, cast_floating(self.args, dtype),
                      cast_floating(self.kwargs, dtype), self.valid, self.description)

    @property
    def padding_positions(self) -> int:
        return 0 if self.valid is None else int((~self.valid).sum())


def cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating tensor in it, through nested tuples, lists and dicts, cast
    to ``dtype``; everything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(cast_floating(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [cast_floating(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: cast_floating(v, dtype) for k, v in obj.items()}
    return obj


def row_lengths(batch_size: int, seq_len: int, pad_fraction: float) -> list[int]:
    """Real-token length of each row: row 0 is full, row i loses ``pad_fraction * S * i / (B-1)``.

    >>> row_lengths(4, 100, 0.5)
    [100, 83, 67, 50]
    """
    if batch_size == 1:
        return [seq_len]
    return [max(1, seq_len - round(pad_fraction * seq_len * i / (batch_size - 1))) for i in range(batch_size)]
