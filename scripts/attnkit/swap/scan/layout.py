"""Pass 3, layout: Q, K and V as SDPA takes them ([..., S, D]), and GQA by repetition.

Kᵀ is un-transposed (``.transpose(-2, -1)``, ``.mT``, a permute of the last two dims);
``einsum`` operands are permuted to batch x sequence x head_dim and the output permuted
back; key/value repeated over the head dimension become ``enable_gqa=True`` on the
unrepeated tensors.
"""

from __future__ import annotations

import ast
import re

from .site import Site, refuse
from .syntax import Function, const, dotted, kwarg


class LayoutReader:
    """Pass 3 over a ``syntax.Function`` (see the module docstring)."""

    def __init__(self, f: Function):
        self.f = f

    def layout(self, site: Site, product: dict, value: dict):
        """(q, k, v sources in [..., S, D] layout, permutation of SDPA's output or None)."""
        if product["form"] != "einsum":
            rank = 3 if product["form"] in ("bmm", "baddbmm") else 4
            k = self.untranspose(product["kt"], rank, site)
            return self.f.seg(product["q"]), k, self.f.seg(value["v"]), None
        return self.einsum_layout(site, product, value)

    def untranspose(self, kt: ast.AST, rank: int, site: Site) -> str:
        """K for an operand that is Kᵀ: strips .transpose(-2, -1), .transpose(rank-2, rank-1),
        .mT, or a permute that swaps the last two dims; else transposes the operand."""
        if isinstance(kt, ast.Call) and isinstance(kt.func, ast.Attribute):
            if kt.func.attr == "transpose" and len(kt.args) == 2:
                dims = sorted(const(x) for x in kt.args)
                if dims == [-2, -1]:
                    return self.f.seg(kt.func.value)
                if dims == [rank - 2, rank - 1]:
                    site.needs["rank"] = rank  # the transpose is Kᵀ only for this rank: a live model checks
                    return self.f.seg(kt.func.value)
            if kt.func.attr == "permute":
                dims = [const(x) for x in kt.args]
                if all(isinstance(d, int) for d in dims) and len(dims) >= 2 and \
                        dims == list(range(len(dims) - 2)) + [len(dims) - 1, len(dims) - 2]:
                    return self.f.seg(kt.func.value)
        if isinstance(kt, ast.Attribute) and kt.attr == "mT":
            return self.f.seg(kt.value)
        return f"{self.f.paren(self.f.seg(kt))}.transpose(-2, -1)"

    def einsum_layout(self, site: Site, product: dict, value: dict):
        eq1, eq2 = product["eq"].replace(" ", ""), value["eq"].replace(" ", "")
        try:
            (sq, sk), ss = eq1.split("->")[0].split(","), eq1.split("->")[1]
            (sp, sv), so = eq2.split("->")[0].split(","), eq2.split("->")[1]
        except ValueError:
            return refuse(site, f"einsum equations {eq1!r}, {eq2!r} are not two-operand with '->'") and None
        if "." in eq1 + eq2 or len(set(ss)) != len(ss):
            return refuse(site, "einsum with '...' or repeated letters") and None
        contract = (set(sq) & set(sk)) - set(ss)
        i_set, j_set = (set(sq) & set(ss)) - set(sk), (set(sk) & set(ss)) - set(sq)
        batch = [c for c in ss if c in sq and c in sk]
        if len(contract) != 1 or len(i_set) != 1 or len(j_set) != 1 or ss[-1] not in j_set or \
                set(ss) != set(batch) | i_set | j_set or set(sq) != set(batch) | i_set | contract or \
                set(sk) != set(batch) | j_set | contract:
            return refuse(site, f"einsum {eq1!r} is not batch x query x key with the key last") and None
        (d,), (i,), (j,) = contract, i_set, j_set
        ren = dict(zip(sp, ss)) if len(sp) == len(ss) else {}
        if not ren or sorted(sp) != sorted(set(sp)):
            return refuse(site, f"einsum {eq2!r} does not take the scores in their own layout") and None
        vj = {v: k for k, v in ren.items()}.get(j)
        e_set = set(sv) - set(sp)
        if vj is None or vj not in sv or len(e_set) != 1:
            return refuse(site, f"einsum {eq2!r} does not contract over the key dimension") and None
        (e,) = e_set
        vbatch = [{v: k for k, v in ren.items()}[c] for c in batch]
        if set(sv) != set(vbatch) | {vj, e} or set(so) != set(vbatch) | {{v: k for k, v in ren.items()}[i], e}:
            return refuse(site, f"einsum {eq2!r} has unexpected dimensions") and None

        def perm(src: str, have: str, want: str) -> str:
            order = [have.index(c) for c in want]
            return src if order == list(range(len(order))) else f"{self.f.paren(src)}.permute({', '.join(map(str, order))})"

        q = perm(self.f.seg(product["q"]), sq, "".join(batch) + i + d)
        k = perm(self.f.seg(product["kt"]), sk, "".join(batch) + j + d)
        v = perm(self.f.seg(value["v"]), sv, "".join(vbatch) + vj + e)
        out_have = "".join(vbatch) + {v: k for k, v in ren.items()}[i] + e
        order = [out_have.index(c) for c in so]
        return q, k, v, None if order == list(range(len(order))) else order

    def gqa(self, k_src: str, v_src: str, block, before: int, site: Site) -> tuple[str, str, bool]:
        """Key/value repeated over the head dimension (repeat_interleave(n, dim=1), repeat_kv):
        SDPA takes the unrepeated ones with enable_gqa=True."""
        def base(src):
            if not re.fullmatch(r"\w+", src):
                return None, None
            found = self.f.definition(src, block, before + 1)
            if not found:
                return None, None
            value = found[1]
            if isinstance(value, ast.Call):
                name = dotted(value.func)
                if name == "torch.repeat_interleave" and len(value.args) >= 2 and const(kwarg(value, "dim", 2)) == 1:
                    return self.f.seg(value.args[0]), self.f.seg(value.args[1])
                if isinstance(value.func, ast.Attribute) and value.func.attr == "repeat_interleave" and \
                        name != "torch.repeat_interleave" and const(kwarg(value, "dim", 1)) == 1 and value.args:
                    return self.f.seg(value.func.value), self.f.seg(value.args[0])
                if name.split(".")[-1] == "repeat_kv" and len(value.args) == 2:
                    return self.f.seg(value.args[0]), self.f.seg(value.args[1])
            return None, None

        kb, kn = base(k_src)
        vb, vn = base(v_src)
        if kb and vb and kn == vn and (kb == k_src or vb == v_src):
            site.notes.append(f"key/value are repeated in place ({k_src} = {k_src}.repeat_interleave(...)): keep the "
                              "unrepeated tensors under their own names and pass them with enable_gqa=True to skip "
                              "the copy")
            return k_src, v_src, False
        if kb and vb and kn == vn:
            site.gqa = f"key/value heads repeated {kn} times: enable_gqa=True on the unrepeated {kb}, {vb}"
            site.needs["gqa"] = True
            return kb, vb, True
        return k_src, v_src, False
