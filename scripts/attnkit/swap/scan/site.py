"""A site: one attention computation in source, with its facts and (when swappable) its rewrite."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Site:
    """One attention site in source, with its facts and (when swappable) its rewrite."""

    file: str
    function: str
    line: int  # first line of the chain (the score product)
    end_line: int  # last line of the chain (the value product)
    kind: str  # manual | sdpa | flash_attn | mha
    form: str = ""  # matmul | bmm | baddbmm | einsum (manual sites); the call otherwise
    mask: str = "none"  # none | causal | causal buffer | boolean | additive
    scale: str = ""
    dropout: str = "none"
    gqa: str = ""
    softmax_upcast: bool = False
    softmax_line: int = 0
    swappable: bool = False
    reason: str = ""
    blockers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    call: str = ""  # the SDPA call that replaces the chain
    flash_call: str = ""  # the flash_attn_func call, where the site can take one (no mask or causal)
    materialised: str = ""  # a query-dependent term the rewrite still forms as an [S_q, S_k] attn_mask
    fa4_call: str = ""  # the FlashAttention-4 call (flash_attn.cute), falling back to SDPA without it
    variant_edits: dict[str, list] = field(default_factory=dict)  # backend -> edits, as ``edits`` for SDPA
    edits: list[tuple[int, int, list[str]]] = field(default_factory=list)  # (first, last line, new lines)
    needs: dict[str, Any] = field(default_factory=dict)  # facts a live model must confirm

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("edits")
        d.pop("variant_edits")
        d["where"] = f"{self.file}:{self.line}"
        return d


def refuse(site: Site, reason: str) -> Site:
    """Mark ``site`` not swappable, with ``reason`` (naming the construct and its line)."""
    site.swappable, site.reason = False, reason
    return site
