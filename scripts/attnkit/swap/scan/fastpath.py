"""Calls that already take a fast path, and ``nn.MultiheadAttention`` calls.

``F.scaled_dot_product_attention`` and ``flash_attn_func`` calls come with what keeps them
off the flash kernel (an explicit mask, fp32 inputs); an ``nn.MultiheadAttention`` call
leaving ``need_weights=True`` materialises the weights, and is swappable
(``need_weights=False``) when no caller reads them.
"""

from __future__ import annotations

import ast

from .site import Site
from .syntax import FLASH_FUNCS, SDPA_FUNCS, Function, const, dotted, kwarg


class FastPathReader:
    """Over a ``syntax.Function`` (see the module docstring)."""

    def __init__(self, f: Function):
        self.f = f

    def fast_path(self, call: ast.Call, st: ast.stmt, block, index) -> Site | None:
        name = dotted(call.func)
        if name in SDPA_FUNCS or name.endswith(".scaled_dot_product_attention"):
            site = Site(self.f.file, self.f.qualname, call.lineno, call.end_lineno, "sdpa", "scaled_dot_product_attention",
                        reason="already SDPA")
            mask = kwarg(call, "attn_mask", 3)
            if mask is not None and const(mask) is not None:
                site.blockers.append("an explicit attn_mask: on CUDA it rules out SDPA's flash kernel (efficient or "
                                     "cuDNN run instead); use is_causal=True when the mask is causal")
            self.fp32_blocker(call.args[:3], site)
            return site
        if name in FLASH_FUNCS or name.split(".")[-1] in ("flash_attn_func", "flash_attn_varlen_func"):
            site = Site(self.f.file, self.f.qualname, call.lineno, call.end_lineno, "flash_attn", name.split(".")[-1],
                        reason="already flash-attn")
            self.fp32_blocker(call.args[:3], site)
            return site
        hinted = call.lineno in self.f.hints.get("__mha_lines__", ())  # a live run saw the module's fast path here
        if hinted and self.f.attr_type(call.func) in ("TransformerEncoderLayer", "TransformerDecoderLayer"):
            site = Site(self.f.file, self.f.qualname, call.lineno, call.end_lineno, "mha",
                        f"nn.{self.f.attr_type(call.func)}",
                        reason="in eval mode on CPU the layer's fast path computes bmm + softmax")
            site.swappable, site.call, site.edits = True, self.f.seg(call), []
            site.notes.append("the run-time swap turns the layer's fast path off for this module "
                              "(torch.backends.mha.set_fastpath_enabled(False) around its call), so that its "
                              "attention calls SDPA; the source is unchanged")
            return site
        mha_line = hinted and (len(call.args) >= 3 or kwarg(call, "query") is not None)
        if self.f.attr_type(call.func) == "MultiheadAttention" or mha_line:
            need = kwarg(call, "need_weights", 5)
            if need is not None and const(need) is False:
                site = Site(self.f.file, self.f.qualname, call.lineno, call.end_lineno, "mha", "nn.MultiheadAttention",
                            reason="need_weights=False: PyTorch runs SDPA inside, except in eval mode on CPU, where "
                                   "the module's fast path computes bmm + softmax")
                site.swappable, site.call, site.edits = True, self.f.seg(call), []
                site.needs["mha_fastpath"] = True
                site.notes.append("the run-time swap turns nn.MultiheadAttention's fast path off for this module "
                                  "(torch.backends.mha.set_fastpath_enabled(False) around its call), so that it calls "
                                  "SDPA; the source is unchanged")
                return site
            site = Site(self.f.file, self.f.qualname, call.lineno, call.end_lineno, "mha", "nn.MultiheadAttention",
                        mask="attn_mask" if kwarg(call, "attn_mask", 4) is not None else "none")
            site.reason = "need_weights left at its default True: the [B, S, S] attention weights are materialised"
            used = self.mha_weights_used(call, st, block, index)
            if used:
                site.notes.append(used)
                return site
            site.swappable = True
            site.notes.append("in eval mode on CPU, nn.MultiheadAttention's fast path computes bmm + softmax even "
                              "with need_weights=False: the run-time swap also turns the fast path off for this "
                              "module; in your code, call torch.backends.mha.set_fastpath_enabled(False)")
            text = self.f.seg(call)
            new_call = text[:-1].rstrip() + (", " if call.args or call.keywords else "") + "need_weights=False)"
            site.call = new_call
            lines = self.f.lines[call.lineno - 1: call.end_lineno]
            prefix = lines[0][: self.f.char(lines[0], call.col_offset)]
            suffix = lines[-1][self.f.char(lines[-1], call.end_col_offset):]
            site.edits = [(call.lineno, call.end_lineno, [prefix + new_call + suffix])]
            return site
        return None

    def fp32_blocker(self, args, site: Site) -> None:
        for a in args:
            if isinstance(a, ast.Call) and isinstance(a.func, ast.Attribute) and a.func.attr in ("float", "double"):
                site.blockers.append(f"{self.f.seg(a)} is fp32/fp64: the flash kernels take fp16 and bf16 only")
                return

    def mha_weights_used(self, call: ast.Call, st: ast.stmt, block, index) -> str:
        """Why the weights MHA returns are needed, or '' when only the output is used."""
        parent = None
        for node in ast.walk(st):
            for child in ast.iter_child_nodes(node):
                if child is call:
                    parent = node
        if isinstance(parent, ast.Subscript) and const(parent.slice) == 0:
            return ""
        if isinstance(st, ast.Assign) and st.value is call and isinstance(st.targets[0], ast.Tuple) and \
                len(st.targets[0].elts) == 2:
            second = st.targets[0].elts[1]
            if isinstance(second, ast.Name):
                if second.id == "_":
                    return ""
                later = [n for s in block[index + 1:] for n in ast.walk(s)
                         if isinstance(n, ast.Name) and n.id == second.id and isinstance(n.ctx, ast.Load)]
                if not later:
                    return ""
                return f"the attention weights '{second.id}' are used at line {later[0].lineno}"
        return "the call's result is used whole: the attention weights may be needed"
