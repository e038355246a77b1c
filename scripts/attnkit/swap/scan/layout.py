"""Pass 3, layout: Q, K, V (and a replayed mask) as SDPA takes them, [batch..., S, D].

Both products are read as einsum equations, whatever their spelling: ``q @ k.transpose(-2,
-1)`` is '..QD,..KD->..QK'; ``torch.bmm(q, k)`` with K stored [B, D, S] is 'AQD,ADK->AQK';
``torch.bmm(v, w.permute(0, 2, 1))`` names the weights' letters through the permutation.
The score equation names batch, query, key and head_dim letters, the value equation is
renamed into them; each operand is permuted to SDPA's order and the output back. A
key/value missing a batch letter of the query (multi-query) gets it back by ``unsqueeze``
with ``enable_gqa=True``; one repeated over heads (``repeat_interleave``, ``repeat_kv``)
becomes ``enable_gqa=True`` on the unrepeated tensor (``gqa``).
"""

from __future__ import annotations

import ast
import re

from .chain import Chain, Refused
from .site import Site
from .syntax import Function, const, kwarg

BATCH = "ABCDEFGH"


class LayoutReader:
    """Pass 3 over a ``syntax.Function`` (see the module docstring)."""

    def __init__(self, f: Function):
        self.f = f

    # --- operands as letters
    def fold(self, node: ast.AST, letters: str) -> tuple[ast.AST, str]:
        """Strip transposes / permutes written on an operand, moving them into its letters:
        (the operand without them, its own letters)."""
        while True:
            if isinstance(node, ast.Attribute) and node.attr == "mT":
                letters = letters[:-2] + letters[-1] + letters[-2]
                node = node.value
                continue
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                attr, args = node.func.attr, [const(a) for a in node.args]
                if attr == "transpose" and len(args) == 2 and all(isinstance(a, int) for a in args):
                    a, b = (x % len(letters) for x in args)
                    lst = list(letters)
                    lst[a], lst[b] = lst[b], lst[a]
                    letters = "".join(lst)
                    node = node.func.value
                    continue
                if attr == "permute":
                    dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
                    if all(isinstance(d, int) for d in dims) and len(dims) == len(letters):
                        # y = x.permute(p): y's axis i is x's axis p[i]
                        own = [""] * len(letters)
                        for i, p in enumerate(dims):
                            own[p] = letters[i]
                        letters = "".join(own)
                        node = node.func.value
                        continue
            return node, letters

    def equation(self, product: dict, rank: int) -> tuple[str, str, str]:
        """(q letters, kt letters, scores letters) of a product."""
        if product["form"] == "einsum":
            (sq, sk), ss = product["eq"].split("->")[0].split(","), product["eq"].split("->")[1]
            return sq, sk, ss
        r = 3 if product["form"] in ("bmm", "baddbmm") else rank
        b = BATCH[: r - 2]
        return b + "ij", b + "jk", b + "ik"

    @staticmethod
    def apply_perm(letters: str, perm) -> str:
        """The letters after one transpose/permute recorded by the matcher."""
        if perm is None or perm == []:
            return letters
        if perm == [-1]:
            return letters[:-2] + letters[-1] + letters[-2]
        if perm and perm[0] == "T":
            a, b = (x % len(letters) for x in perm[1:])
            lst = list(letters)
            lst[a], lst[b] = lst[b], lst[a]
            return "".join(lst)
        if len(perm) == len(letters):
            return "".join(letters[p] for p in perm)
        return letters

    def perm(self, src: str, have: str, want: str) -> str:
        """``src`` permuted from ``have`` to ``want``; made contiguous when its last axis moves
        (SDPA's fused CPU and GPU kernels need a last dimension of stride 1: K stored as [B, D, S]
        would otherwise send SDPA to its unfused math kernel)."""
        order = [have.index(c) for c in want]
        if order == list(range(len(order))):
            return src
        tail = ".contiguous()" if order[-1] != len(order) - 1 else ""
        if order == list(range(len(order) - 2)) + [len(order) - 1, len(order) - 2]:
            return f"{self.f.paren(src)}.transpose(-2, -1){tail}"
        return f"{self.f.paren(src)}.permute({', '.join(map(str, order))}){tail}"

    # --- the layout
    def layout(self, chain: Chain, q_text=None, k_text=None) -> dict:
        """q, k, v (and the mask's permutation) in SDPA's layout. Raises ``Refused``."""
        site, product, value = chain.site, chain.product, chain.value
        rank = chain.rank or 4
        if product["form"] == "matmul" and chain.rank is None:
            site.needs.setdefault("rank", 4)  # read from source: 4-D assumed; a live run knows (and checks) it
        sq, sk, ss = self.equation(product, rank)
        if len(set(ss)) != len(ss) or "." in sq + sk + ss:
            raise Refused(f"einsum {product.get('eq')!r} (line {product['node'].lineno}) uses '...' or repeats an "
                          "output letter")
        qn, sq = self.fold(product["q"], sq)
        kn, sk = self.fold(product["kt"], sk)
        contract = (set(sq) & set(sk)) - set(ss)
        k_only = [c for c in ss if c in sk and c not in sq]
        q_only = [c for c in ss if c in sq and c not in sk]
        if len(contract) != 1 or len(k_only) != 1 or not q_only:
            raise Refused(f"the score product `{self.f.seg(product['node'])[:70]}` (line {product['node'].lineno}) is not "
                          "batch x query x key over one head dimension")
        (d,), j = contract, k_only[0]
        jpos = ss.index(j)
        i = ss[jpos - 1] if jpos > 0 and ss[jpos - 1] in q_only else q_only[-1]
        batch = [c for c in ss if c not in (i, j)]
        if set(sq) - set(batch) - {i, d} or set(sk) - set(batch) - {j, d}:
            raise Refused(f"the score product `{self.f.seg(product['node'])[:70]}` (line {product['node'].lineno}) sums "
                          "over more than the head dimension")
        dim = chain.site.needs.get("softmax_dim")
        if dim is not None and dim % len(ss) != jpos:
            raise Refused(f"the softmax at line {chain.site.softmax_line} runs over dim {dim}, and the key dimension of "
                          f"the scores ({ss}) is {jpos}: not attention as SDPA computes it")
        if dim is not None:
            chain.site.needs["softmax_dim_is_key"] = True
        # the value product, renamed into the score letters through the weights' layout
        pv_letters = ss
        for p in value.get("p_perm") or []:
            pv_letters = self.apply_perm(pv_letters, p)
        vr = len(pv_letters)
        if value["vform"] == "einsum":
            (a, b), out = value["eq"].split("->")[0].split(","), value["eq"].split("->")[1]
        else:
            vb = BATCH[: vr - 2] if value["vform"] != "bmm" else BATCH[:1]
            a, b, out = vb + "xy", vb + "yz", vb + "xz"
        sp, sv = (a, b) if value["p_first"] else (b, a)
        vn, sv = self.fold(value["v"], sv)
        if len(sp) != len(pv_letters):
            raise Refused(f"the value product `{self.f.seg(value['node'])[:70]}` (line {value['node'].lineno}) takes the "
                          f"weights with {len(sp)} dimensions, the scores have {len(pv_letters)}")
        ren = dict(zip(sp, pv_letters))
        e_set = set(sv) - set(sp)
        if len(e_set) != 1 or ren.get(next(iter(set(sp) & set(sv) - set(out)), "?")) != j:
            raise Refused(f"the value product `{self.f.seg(value['node'])[:70]}` (line {value['node'].lineno}) does not "
                          "sum over the key dimension")
        (e,) = e_set
        ren[e] = "E" if "E" not in ss else "e"
        e2 = ren[e]
        sv2 = "".join(ren.get(c, c) for c in sv)
        out2 = "".join(ren.get(c, c) for c in out)
        if set(out2) != set(batch) | {i, e2} or set(sv2) - set(batch) - {j, e2}:
            raise Refused(f"the value product `{self.f.seg(value['node'])[:70]}` (line {value['node'].lineno}) has "
                          "dimensions the scores do not")
        want_q = "".join(batch) + i + d
        want_k = "".join(batch) + j + d
        want_v = "".join(batch) + j + e2
        q_src = q_text or self.f.seg(qn)
        k_src = k_text or self.f.seg(kn)
        v_src = self.f.seg(vn)
        gqa = False
        letters = (sq, sk, ss)
        q_src, sq = self.pad(q_src, sq, want_q, site, "query")
        k_src, sk, k_gqa = self.pad(k_src, sk, want_k, site, "key", allow_gqa=True)
        v_src, sv2, v_gqa = self.pad(v_src, sv2, want_v, site, "value", allow_gqa=True)
        if k_gqa or v_gqa:
            if not (k_gqa and v_gqa):
                raise Refused(f"the key and the value broadcast over different dimensions of the query (the products "
                              f"at lines {product['node'].lineno} and {value['node'].lineno})")
            gqa = True
            site.gqa = "multi-query: key/value without a head dimension, enable_gqa=True on one head"
        q = self.stride_one(self.perm(q_src, sq, want_q), qn, product["node"].lineno)
        k = self.stride_one(self.perm(k_src, sk, want_k), kn, product["node"].lineno)
        v = self.stride_one(self.perm(v_src, sv2, want_v), vn, value["node"].lineno)
        have_out = "".join(batch) + i + e2
        order = [have_out.index(c) for c in out2]
        out_perm = None if order == list(range(len(order))) else order
        mask_have = "".join(ren.get(c, c) for c in sp)  # the weights' letters where the value product takes them
        mask_order = [mask_have.index(c) for c in "".join(batch) + i + j]
        return {"q": q, "k": k, "v": v, "out_perm": out_perm, "gqa": gqa, "batch": len(batch),
                "mask_perm": None if mask_order == list(range(len(mask_order))) else mask_order,
                "q_node": qn, "k_node": kn, "v_node": vn, "letters": letters}

    def stride_one(self, src: str, node: ast.AST, line: int) -> str:
        """``src`` made contiguous when the tensor it names was permuted with its last axis moved
        (``q = q.permute(0, 2, 1)``, ``rearrange(q, 'b c h w -> b (h w) c')``), as in ``perm``."""
        if src.endswith(".contiguous()") or not isinstance(node, ast.Name):
            return src
        best = None
        for st in ast.walk(self.f.fn):
            if isinstance(st, ast.Assign) and st.lineno < line and any(
                    isinstance(t, ast.Name) and t.id == node.id for t in st.targets):
                if best is None or st.lineno > best.lineno:
                    best = st
        if best is None or len(best.targets) != 1 or not isinstance(best.targets[0], ast.Name):
            return src
        value = best.value
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute):
            attr, args = value.func.attr, [const(a) for a in value.args]
            if attr == "permute" and args and all(isinstance(a, int) for a in args) and args[-1] != len(args) - 1:
                return f"{self.f.paren(src)}.contiguous()"
            if attr == "transpose" and len(args) == 2 and -1 in args:
                return f"{self.f.paren(src)}.contiguous()"
        if isinstance(value, ast.Attribute) and value.attr == "mT":
            return f"{self.f.paren(src)}.contiguous()"
        if isinstance(value, ast.Call) and self.f.canon(value.func) == "einops.rearrange" and len(value.args) >= 2:
            pattern = const(value.args[1])
            if isinstance(pattern, str) and "->" in pattern:
                left, right = pattern.split("->")
                if left.split()[-1:] != right.split()[-1:]:
                    return f"{self.f.paren(src)}.contiguous()"
        return src

    def pad(self, src: str, have: str, want: str, site: Site, what: str, allow_gqa: bool = False):
        """Insert a size-1 dimension for each batch letter of ``want`` the operand lacks."""
        missing = [c for c in want if c not in have]
        if not missing:
            return (src, have, False) if allow_gqa else (src, have)
        if not allow_gqa:
            raise Refused(f"the {what} `{src[:50]}` lacks the dimension(s) {missing} of the scores (the score product "
                          f"at line {site.line})")
        letters = have
        for c in missing:
            pos = want.index(c)
            src = f"{self.f.paren(src)}.unsqueeze({pos})"
            letters = letters[:pos] + c + letters[pos:]
        return src, letters, True

    # --- GQA by repetition
    def gqa(self, k_src: str, v_src: str, chain: Chain, site: Site) -> tuple[str, str, bool]:
        """Key/value repeated over heads (repeat_interleave(n, dim=1), repeat_kv): SDPA takes the
        unrepeated ones with enable_gqa=True, if still under their names at the SDPA call."""
        block, before = chain.product["loc"]
        value_line = chain.site.end_line

        def base(src):
            if not re.fullmatch(r"\w+", src):
                return None, None, None
            found = self.f.definition(src, block, before + 1)
            if not found:
                return None, None, None
            idx, value = found
            if isinstance(value, ast.Call):
                name = self.f.canon(value.func)
                if name == "torch.repeat_interleave" and len(value.args) >= 2 and const(kwarg(value, "dim", 2)) == 1:
                    return value.args[0], self.f.seg(value.args[1]), block[idx]
                if isinstance(value.func, ast.Attribute) and value.func.attr == "repeat_interleave" and \
                        name != "torch.repeat_interleave" and const(kwarg(value, "dim", 1)) == 1 and value.args:
                    return value.func.value, self.f.seg(value.args[0]), block[idx]
                if name.split(".")[-1] == "repeat_kv" and len(value.args) == 2 and self.heads_first_repeat_kv(name):
                    return value.args[0], self.f.seg(value.args[1]), block[idx]
            return None, None, None

        kb, kn, kst = base(k_src)
        vb, vn, vst = base(v_src)
        if kb is None or vb is None or kn != vn:
            return k_src, v_src, False
        kb_src, vb_src = self.f.seg(kb), self.f.seg(vb)
        # every name the unrepeated tensors are read from must keep its value up to the SDPA call
        names = {n.id for n in ast.walk(kb) if isinstance(n, ast.Name)} | \
                {n.id for n in ast.walk(vb) if isinstance(n, ast.Name)}
        for node in ast.walk(self.f.fn):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and \
                    min(kst.lineno, vst.lineno) <= node.lineno <= value_line and names & self.f.stored(node):
                site.notes.append(f"key/value are repeated {kn} times and line {node.lineno} overwrites "
                                  f"{', '.join(sorted(names & self.f.stored(node)))}: the repeated tensors are passed "
                                  "(keep the unrepeated ones under their own names to use enable_gqa=True)")
                return k_src, v_src, False
        site.gqa = f"key/value heads repeated {kn} times: enable_gqa=True on the unrepeated {kb_src}, {vb_src}"
        site.needs["gqa"] = True
        return kb_src, vb_src, True

    def heads_first_repeat_kv(self, name: str) -> bool:
        """transformers' repeat_kv repeats dim 1 of [B, H, S, D]; meta-llama's repeats dim 2 of
        [B, S, H, D]. A function of that name defined in this file is read: its expand must
        insert the repeat after dim 1."""
        if name.startswith("transformers."):
            return True
        if self.f.module is None:
            return False
        for node in self.f.module.body:
            if isinstance(node, ast.FunctionDef) and node.name == name.split(".")[-1]:
                text = ast.unparse(node)
                return bool(re.search(r"\[:, :, None, :, :\]", text))
        return False
