"""Pass 4, code generation: the replacement call and the line edits that install it.

``write`` builds the ``F.scaled_dot_product_attention`` call (3-D ``bmm`` sites get a
leading batch dimension, since SDPA's fused kernels take 4-D inputs), its FlashAttention
variants ([B, S, H, D]: ``flash_attn_func`` for FA2, ``flash_attn.cute.flash_attn_func``
for FA4, which falls back to the SDPA call where FA4 is missing or the tensors are not on
a GPU) where the site takes no mask but a causal one, and the edits of each: the chain's
statements removed, its value product replaced, returned weights replaced by None. How
each library is called (name, import, tuple result, fallback) is read from its backend
record.
"""

from __future__ import annotations

import ast

from ...backends import BACKENDS
from .chain import Chain
from .site import Site
from .syntax import Function, strip_comment, wrap


class CallWriter:
    """Pass 4 over a ``syntax.Function`` (see the module docstring)."""

    def __init__(self, f: Function):
        self.f = f

    def write(self, chain: Chain, q_src: str, k_src: str, v_src: str, out_perm, mask_kw: str | None, causal: bool,
              gqa: bool, returned: list[ast.Name], returns: dict) -> None:
        """Set ``site.call``, ``site.flash_call`` and ``site.edits``; mark it swappable."""
        site, product, value = chain.site, chain.product, chain.value
        three_d = product["form"] in ("bmm", "baddbmm") or value["vform"] == "bmm"
        lib = (q_src, k_src, v_src, three_d, mask_kw, causal, value.get("dropout"), site, out_perm)
        q_lib = q_src
        if three_d:
            q_src, k_src, v_src = (f"{self.f.paren(s)}.unsqueeze(0)" for s in (q_src, k_src, v_src))
            if mask_kw:
                mask_kw = f"{self.f.paren(mask_kw)}.unsqueeze(0)"
        args = [q_src, k_src, v_src]
        if mask_kw:
            args.append(f"attn_mask={mask_kw}")
        drop = self.dropout_kw(value.get("dropout"), site)
        if drop:
            args.append(f"dropout_p={drop}")
        if causal:
            args.append("is_causal=True")
        args.append(f"scale={site.scale}")
        if gqa:
            args.append("enable_gqa=True")
        call = f"{self.f.functional}.scaled_dot_product_attention({', '.join(args)})"
        if three_d:
            call = f"{call}.squeeze(0)"
        if out_perm:
            call = f"{call}.permute({', '.join(map(str, out_perm))})"
        site.call = call
        returned_edits = [(returns[id(n)].lineno, returns[id(n)].end_lineno, self.replace_name(returns[id(n)], n))
                          for n in returned]
        site.edits = self.edits(chain.block, chain.stmts, value["node"], call) + returned_edits
        for name in ("flash_attention_2", "flash_attention_4"):
            text = self.library_variant(BACKENDS[name], *lib, sdpa_call=call, q_test=q_lib)
            if text:
                site.variant_edits[name] = self.edits(chain.block, chain.stmts, value["node"], text) + returned_edits
        site.flash_call = self.library_variant(BACKENDS["flash_attention_2"], *lib, sdpa_call=call, q_test=q_lib)
        site.fa4_call = self.library_variant(BACKENDS["flash_attention_4"], *lib, sdpa_call=call, q_test=q_lib)
        for node in returned:  # the weights were returned: None takes their place, as in transformers' SDPA path
            site.notes.append(f"line {returns[id(node)].lineno} returned the attention weights '{node.id}'; after the "
                              "swap it returns None in their place, as transformers' sdpa_attention_forward does (a "
                              "fused kernel never forms them)")
        site.swappable = True

    def library_variant(self, record, q: str, k: str, v: str, three_d: bool, mask_kw, causal: bool, dropout,
                        site: Site, out_perm, *, sdpa_call: str, q_test: str) -> str:
        """The same site as a FlashAttention call (``record``: its backend record; layout
        [B, S, H, D]); '' when the site takes a mask other than causal, or dropout the library
        does not have (a library that falls back to SDPA takes the fallback whenever the
        dropout probability is not 0, so training keeps its dropout). For S_q == S_k the causal masks of SDPA (top-left) and flash-attn
        (bottom-right) agree; a causal site here always has S_q == S_k (a square tril/triu
        mask). A record that ``falls_back_to_sdpa`` gives ``(library call if it imported and
        q is on a GPU else sdpa_call)``."""
        if mask_kw:
            return ""
        site_drop = self.dropout_kw(dropout, Site("", "", 0, 0, "")) if dropout else ""
        if site_drop and not record.supports("dropout").supported and not record.falls_back_to_sdpa:
            return ""
        if three_d:  # [B*H, S, D] -> [B*H, S, 1, D]
            q, k, v = (f"{self.f.paren(x)}.unsqueeze(2)" for x in (q, k, v))
        else:  # [B, H, S, D] -> [B, S, H, D]
            q, k, v = (f"{self.f.paren(x)}.transpose(1, 2)" for x in (q, k, v))
        args = [q, k, v]
        if site_drop and record.supports("dropout").supported:
            args.append(f"dropout_p={site_drop}")
        args.append(f"softmax_scale={site.scale}")
        if causal:
            args.append("causal=True")
        call = f"{record.source_name}({', '.join(args)})" + ("[0]" if record.returns_tuple else "")
        call += ".squeeze(2)" if three_d else ".transpose(1, 2)"
        if out_perm:
            call = f"{call}.permute({', '.join(map(str, out_perm))})"
        if record.falls_back_to_sdpa:
            use = f"{record.source_name} is not None and {self.f.paren(q_test)}.is_cuda"
            if site_drop and not record.supports("dropout").supported:  # dropout active: SDPA applies it
                use += f" and ({site_drop}) == 0"
            call = f"({call} if {use} else {sdpa_call})"
        return call

    def dropout_kw(self, dropout: tuple | None, site: Site) -> str:
        if dropout is None:
            return ""
        if dropout[0] == "module":
            mod = self.f.seg(dropout[1])
            site.dropout = f"nn.Dropout {mod}"
            return f"{mod}.p if {mod}.training else 0.0"
        p, training = dropout[1], dropout[2]
        p_src = self.f.seg(p) if p is not None else "0.5"
        if training is None:
            site.dropout = f"F.dropout p={p_src} (always, training defaults to True)"
            return p_src
        site.dropout = f"F.dropout p={p_src} when {self.f.seg(training)}"
        return f"{p_src} if {self.f.seg(training)} else 0.0"

    def edits(self, block, chain: list[int], product_node: ast.AST, call: str) -> list[tuple[int, int, list[str]]]:
        """Remove the chain's statements; replace the value product inside the last one."""
        out = []
        for i in chain[:-1]:
            st = block[i]
            out.append((st.lineno, st.end_lineno, []))
        last = block[chain[-1]]
        lines = self.f.lines[last.lineno - 1: last.end_lineno]
        # replace [product_node] span inside these lines
        rel_start = product_node.lineno - last.lineno
        rel_end = product_node.end_lineno - last.lineno
        prefix = lines[rel_start][: self.f.char(lines[rel_start], product_node.col_offset)]
        suffix = strip_comment(lines[rel_end][self.f.char(lines[rel_end], product_node.end_col_offset):])
        new = lines[:rel_start] + wrap(prefix, call, suffix) + lines[rel_end + 1:]
        out.append((last.lineno, last.end_lineno, new))
        return out

    def replace_name(self, st: ast.stmt, node: ast.Name) -> list[str]:
        lines = self.f.lines[st.lineno - 1: st.end_lineno]
        row = node.lineno - st.lineno
        line = lines[row]
        a, b = self.f.char(line, node.col_offset), self.f.char(line, node.end_col_offset)
        lines = list(lines)
        lines[row] = line[:a] + "None" + line[b:]
        return lines
