"""Pass 2, scale and mask: what the ops between Q Kᵀ and the softmax mean for SDPA.

Every scalar factor goes into ``scale`` (1.0 when none: the raw product is not SDPA's
default 1/sqrt(d)); one under an ``if`` becomes ``(c if T else 1.0)``. Then one of two forms:

* **direct**: the chain lies in one block and adds at most one mask, possibly under ``if
  T:``. ``masked_fill(M, -inf)`` keeps ``~M``, an added mask stays additive, a causal
  ``tril``/``triu`` mask becomes ``is_causal`` (a sliced registered buffer is checked on the
  live model), a conditional mask ``(A if T else None)``.
* **replay**: anything more (several masks, a bias through a 5-D view, a helper, masks in
  ``if`` branches, ...). The chain's statements run as written on an ``expand``ed zero of
  the scores' shape and dtype instead of the product: what they leave is exactly the
  additive mask, SDPA's ``attn_mask`` (``None`` when nothing was added).
"""

from __future__ import annotations

import ast
import re

from .chain import Chain, Refused
from .site import refuse
from .syntax import Function, assigned_name, const, dotted, is_minus_inf

MASK_KINDS = ("add", "sub", "masked_fill", "where", "mulmask", "call")


class MaskReader:
    """Pass 2 over a ``syntax.Function`` (see the module docstring)."""

    def __init__(self, f: Function):
        self.f = f

    def scale(self, chain: Chain) -> str:
        """The product of every scalar factor, with the factors under an ``if`` as (c if T else 1.0)."""
        factors: list[str] = []
        product = chain.product
        if product["form"] == "baddbmm" and product.get("alpha") is not None:
            factors.append(self.f.seg(product["alpha"]))
        for op in chain.ops:
            if op.kind not in ("mul", "div"):
                continue
            f = self.f.seg(op.args[0]) if op.kind == "mul" else f"1.0 / {self.f.paren(self.f.seg(op.args[0]))}"
            if op.cond:
                f = f"({f} if {op.cond} else 1.0)"
            factors.append(f)
        return " * ".join(f"({f})" if " " in f and not f.startswith("(") else f for f in factors) if factors else "1.0"

    def read(self, chain: Chain) -> tuple[str | None, bool] | None:
        """(the attn_mask source or None, is_causal), with ``site.scale``, ``site.mask`` and their
        notes set; ``chain.replay`` True for the replay form. None with the site refused."""
        site = chain.site
        site.scale = self.scale(chain)
        if site.scale == "1.0":
            site.notes.append("no scale in the chain: scale=1.0 (the raw product), not SDPA's default 1/sqrt(d)")
        masks = [op for op in chain.ops if op.kind in MASK_KINDS]
        if chain.product["form"] == "baddbmm":
            beta = const(chain.product.get("beta"))
            if chain.product.get("beta") is None or beta in (1, 1.0):
                masks.insert(0, None)  # the bias operand of baddbmm
            elif beta not in (0, 0.0):
                masks.insert(0, None)
        for op in masks:
            if op is not None and op.kind in ("masked_fill", "where"):
                fill = self.resolved(op.args[1], op.node.lineno)
                if not is_minus_inf(fill):
                    refuse(site, f"{op.kind} with {self.f.seg(fill)} at line {op.node.lineno}: not -inf or a large "
                                 "negative number, so not a mask")
                    return None
        chain.replay = self.needs_replay(chain, masks)
        if chain.replay:
            return self.replay(chain, masks)
        return self.direct(chain, masks)

    def resolved(self, node: ast.AST, line: int) -> ast.AST:
        """A name's value from its latest plain assignment before ``line`` (a fill value kept in
        ``max_neg_value = -torch.finfo(sim.dtype).max``)."""
        if not isinstance(node, ast.Name):
            return node
        best = None
        for st in ast.walk(self.f.fn):
            if isinstance(st, ast.Assign) and st.lineno < line and len(st.targets) == 1 and \
                    isinstance(st.targets[0], ast.Name) and st.targets[0].id == node.id:
                if best is None or st.lineno > best.lineno:
                    best = st
        return best.value if best is not None else node

    def needs_replay(self, chain: Chain, masks: list) -> str:
        """Why the direct form cannot express this chain ('' when it can)."""
        if chain.guards:
            return f"a branch SDPA cannot express, kept eager (line {chain.guards[0][0].lineno})"
        if not chain.same_block:
            return "the chain spans blocks"
        if chain.extra_reads:
            return f"the scores are also read at line {chain.extra_reads[0].lineno}"
        if len(masks) > 1:
            return "more than one mask"
        if any(op.kind in ("shape", "call", "mulmask", "sub") for op in chain.ops):
            kinds = sorted({op.kind for op in chain.ops if op.kind in ("shape", "call", "mulmask", "sub")})
            return f"the scores go through {', '.join(kinds)}"
        seen_mask = False
        for op in chain.ops:
            if op.kind in MASK_KINDS:
                seen_mask = True
            elif op.kind in ("mul", "div") and seen_mask:
                return "a scale applied after the mask"
        if masks and masks[0] is not None and masks[0].cond and self.conditional(chain, masks[0]) is None:
            return "a conditional mask the direct form cannot name"
        if masks and masks[0] is None and chain.product.get("beta") is not None and \
                const(chain.product.get("beta")) not in (1, 1.0):
            return "baddbmm with beta other than 0 or 1"
        return ""

    # --- direct form
    def direct(self, chain: Chain, masks: list) -> tuple[str | None, bool]:
        site, product = chain.site, chain.product
        mask_kw, causal = None, False
        if not masks:
            return None, False
        op = masks[0]
        if op is None:  # baddbmm's bias
            site.mask, mask_kw = "additive", self.f.seg(product["bias"])
            return mask_kw, False
        cond = self.conditional(chain, op) if op.cond else None
        if op.kind == "add":
            site.mask = "additive"
            mask_kw = cond[0] if cond else self.f.seg(op.args[0])
            if cond:
                mask_kw = self.cond_expr(mask_kw, cond[1])
            return mask_kw, False
        m, fill = op.args[0], op.args[1]
        if cond:
            keep = cond[0] if op.kind == "where" else self.keep_mask_src(cond[0])
            site.mask = "boolean"
            return self.cond_expr(keep, cond[1]), False
        keep = self.keep_mask(m) if op.kind == "masked_fill" else \
            (self.f.seg(m) if op.args[2] else f"~{self.f.paren(self.f.seg(m))}")
        defined = m
        if isinstance(m, ast.Name):
            found = self.f.definition(m.id, chain.block, chain.stmts[-1])
            defined = found[1] if found else m
        causal_kind = self.causal_kind(defined, op.kind)
        if causal_kind == "causal":
            site.mask, causal = "causal", True
        elif causal_kind == "buffer":
            site.mask, causal = "causal buffer", True
            site.needs["causal_buffer"] = dotted(self.buffer_of(m))
            site.needs["fallback_mask"] = keep
        else:
            site.mask, mask_kw = "boolean", keep
        if not (isinstance(fill, ast.UnaryOp) or "inf" in ast.unparse(self.resolved(fill, op.node.lineno))):
            site.notes.append(f"fill {self.f.seg(fill)}: rows with every key masked would average all keys "
                              "in eager and give zeros in SDPA")
        return mask_kw, causal

    @staticmethod
    def cond_expr(expr: str, test: str) -> str:
        m = re.fullmatch(r"(.+) is not None", test)
        if m and m.group(1) == expr:
            return expr
        return f"({expr} if {test} else None)"

    def conditional(self, chain: Chain, op) -> tuple[str, str] | None:
        """For a mask under ``if T: [tmp = e; ...] s = s + A`` / ``s.masked_fill_(M, v)`` /
        ``s = s.masked_fill(M, v)``: (A or M with the temporaries inlined, T); None otherwise."""
        st = self.enclosing_if(chain, op)
        if st is None or st.orelse:
            return None
        *temps, last = st.body
        subs = {}
        for t in temps:
            if not assigned_name(t):
                return None
            subs[t.targets[0].id] = ast.parse(f"({ast.unparse(self.inline(t.value, subs))})", mode="eval").body
        if op.kind == "add":
            term = op.args[0]
        elif op.kind in ("masked_fill", "where"):
            term = op.args[0]
        else:
            return None
        nodes = {id(n) for n in ast.walk(last)}
        if id(op.node) not in nodes and op.node is not last:
            return None
        return ast.unparse(self.inline(term, subs)), ast.unparse(st.test)

    @staticmethod
    def inline(node: ast.AST, subs: dict) -> ast.AST:
        class Inline(ast.NodeTransformer):
            def visit_Name(self, n):
                return subs.get(n.id, n) if isinstance(n.ctx, ast.Load) else n

        return Inline().visit(ast.parse(ast.unparse(node), mode="eval").body)

    def enclosing_if(self, chain: Chain, op) -> ast.If | None:
        for i in chain.stmts:
            st = chain.block[i]
            if isinstance(st, ast.If) and any(n is op.node for n in ast.walk(st)):
                return st
        return None

    def keep_mask_src(self, src: str) -> str:
        return self.keep_mask(ast.parse(src, mode="eval").body, ast.unparse)

    def keep_mask(self, m: ast.AST, seg=None) -> str:
        """The SDPA boolean mask (True = take part) for masked_fill(m, -inf)."""
        seg = seg or self.f.seg
        if isinstance(m, ast.Compare) and len(m.ops) == 1 and isinstance(m.ops[0], ast.Eq) and \
                const(m.comparators[0]) in (0, 0.0, False):
            return f"{seg(m.left)} != 0"
        if isinstance(m, ast.UnaryOp) and isinstance(m.op, (ast.Invert, ast.Not)):
            return seg(m.operand)
        if isinstance(m, ast.Call) and isinstance(m.func, ast.Attribute) and m.func.attr == "logical_not" and \
                not m.args:
            return seg(m.func.value)
        return f"~{self.f.paren(seg(m))}"

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

    # --- replay form
    def replay(self, chain: Chain, masks: list) -> tuple[str | None, bool]:
        site = chain.site
        kinds = []
        for op in masks:
            if op is None:
                kinds.append("baddbmm bias")
            elif op.kind in ("add", "sub"):
                kinds.append(f"added `{self.f.seg(op.args[0])[:60]}` (line {op.node.lineno})")
            elif op.kind == "call":
                kinds.append(f"`{self.f.seg(op.node)[:60]}` (line {op.node.lineno})")
            else:
                kinds.append(f"{op.kind} (line {op.node.lineno})")
        site.mask = "replayed" if masks else "none"
        site.notes.append(f"replay form ({chain.replay}): the chain's statements run on a zero tensor of the scores' "
                          "shape instead of the product; what they add is SDPA's attn_mask"
                          + (f" ({'; '.join(kinds)})" if kinds else "")
                          + "; a zero left untouched is passed as None")
        if chain.query_bias:
            site.materialised = chain.query_bias[:80]
            site.notes.append(f"the bias depends on the query ({chain.query_bias[:80]}): it is still materialised, "
                              "[..., S_q, S_k], as SDPA's additive attn_mask")
        return "REPLAY", False


__all__ = ["MaskReader", "Refused"]
