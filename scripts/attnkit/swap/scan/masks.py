"""Pass 2, scale and mask: what the ops between Q Kᵀ and the softmax mean for SDPA.

Every scalar factor becomes part of ``scale`` (1.0 when there is none: the raw product is
not SDPA's default 1/sqrt(d)); one mask is carried over (``masked_fill(M, -inf)`` keeps
``~M``, an added mask stays additive, a causal ``tril``/``triu`` mask becomes
``is_causal``, a sliced registered buffer is checked on the live model).
"""

from __future__ import annotations

import ast
import re

from .chain import Chain
from .site import refuse
from .syntax import Function, const, dotted, is_minus_inf


class MaskReader:
    """Pass 2 over a ``syntax.Function`` (see the module docstring)."""

    def __init__(self, f: Function):
        self.f = f

    def read(self, chain: Chain) -> tuple[str | None, bool] | None:
        """(the attn_mask source or None, is_causal), with ``site.scale``, ``site.mask`` and
        their notes set; None with the site refused when SDPA cannot take them as written."""
        site, block, product = chain.site, chain.block, chain.product
        factors: list[str] = []
        masks: list[tuple[str, ast.AST, ast.AST | None]] = []
        if product["form"] == "baddbmm":
            beta, alpha = const(product.get("beta")), product.get("alpha")
            if alpha is not None:
                factors.append(self.f.seg(alpha))
            if product.get("beta") is None or beta == 1 or beta == 1.0:
                masks.append(("add", product["bias"], None))
            elif beta not in (0, 0.0):
                refuse(site, "baddbmm with beta other than 0 or 1")
                return None
        for op in chain.ops:
            if op[0] in ("mul", "div"):
                if any(m[0] == "add" for m in masks):
                    refuse(site, "a scale applied after an additive mask (the mask would be scaled too): move the "
                                 "scale before the mask by hand")
                    return None
                factors.append(self.f.seg(op[1]) if op[0] == "mul" else f"1.0 / {self.f.paren(self.f.seg(op[1]))}")
            elif op[0] in ("add", "masked_fill", "where"):
                masks.append(op if op[0] != "add" else ("add", op[1], None))
        site.scale = " * ".join(f"({f})" if " " in f else f for f in factors) if factors else "1.0"
        if not factors:
            site.notes.append("no scale in the chain: scale=1.0 (the raw product), not SDPA's default 1/sqrt(d)")
        if len(masks) > 1:
            refuse(site, "more than one mask in the chain (combine them into one attn_mask by hand)")
            return None
        mask_kw, causal = None, False
        if masks:
            kind, m, fill = masks[0]
            if kind == "add":
                site.mask, mask_kw = "additive", self.f.seg(m)
            else:
                if not is_minus_inf(fill):
                    refuse(site, f"{kind} with {self.f.seg(fill)}, which is not -inf or a large negative number: "
                                 "not a mask")
                    return None
                keep = self.keep_mask(m) if kind == "masked_fill" else self.f.seg(m)
                defined = m
                if isinstance(m, ast.Name):
                    found = self.f.definition(m.id, block, chain.stmts[-1])
                    defined = found[1] if found else m
                causal_kind = self.causal_kind(defined, kind)
                if causal_kind == "causal":
                    site.mask, causal = "causal", True
                elif causal_kind == "buffer":
                    site.mask, causal = "causal buffer", True
                    site.needs["causal_buffer"] = dotted(self.buffer_of(m))
                    site.needs["fallback_mask"] = keep
                else:
                    site.mask, mask_kw = "boolean", keep
                if not (isinstance(fill, ast.UnaryOp) or "inf" in ast.unparse(fill)):
                    site.notes.append(f"fill {self.f.seg(fill)}: rows with every key masked would average all keys "
                                      "in eager and give zeros in SDPA")
        return mask_kw, causal

    def keep_mask(self, m: ast.AST) -> str:
        """The SDPA boolean mask (True = take part) for masked_fill(m, -inf)."""
        if isinstance(m, ast.Compare) and len(m.ops) == 1 and isinstance(m.ops[0], ast.Eq) and \
                const(m.comparators[0]) in (0, 0.0, False):
            return f"{self.f.seg(m.left)} != 0"
        if isinstance(m, ast.UnaryOp) and isinstance(m.op, ast.Invert):
            return self.f.seg(m.operand)
        if isinstance(m, ast.Call) and isinstance(m.func, ast.Attribute) and m.func.attr == "logical_not" and \
                not m.args:
            return self.f.seg(m.func.value)
        return f"~{self.f.paren(self.f.seg(m))}"

    def buffer_of(self, m: ast.AST) -> ast.AST | None:
        """``self.bias`` in ``self.bias[:, :, :T, :T] == 0`` (the registered-buffer causal form)."""
        node = m.left if isinstance(m, ast.Compare) else m
        if isinstance(node, ast.Subscript) and dotted(node.value).startswith("self."):
            return node.value
        return None

    def causal_kind(self, m: ast.AST, kind: str) -> str:
        """'causal' for triu(ones(T, T), 1) / tril(ones(T, T)) == 0 forms; 'buffer' for a sliced
        registered buffer compared with 0 (a live model checks it is lower-triangular)."""
        text = ast.unparse(m).replace(" ", "")
        square = r"ones\((\w+(?:\.\w+)?(?:\(\S*?\))?),\1[,)]"
        if kind == "masked_fill":
            if re.search(r"triu\(.*" + square, text) and re.search(r"diagonal=1|,1\)", text):
                return "causal"
            if re.search(r"tril\(.*" + square, text) and text.endswith("==0"):
                return "causal"
            if re.search(r"ones\((\w+),\1[^)]*\)\.triu\((diagonal=)?1\)", text):
                return "causal"
            buffer = self.buffer_of(m)
            if buffer is not None and isinstance(m, ast.Compare) and const(m.comparators[0]) in (0, 0.0, False):
                sl = m.left.slice
                dims = sl.elts if isinstance(sl, ast.Tuple) else [sl]
                last = [ast.unparse(d) for d in dims[-2:]]
                if len(last) == 2 and last[0] == last[1] and last[0].startswith(":"):
                    return "buffer"
        return ""
