"""Hand-written attention in Python source: find each site, read its facts, rewrite it.

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
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SOFTMAX_FUNCS = {"F.softmax", "torch.softmax", "torch.nn.functional.softmax", "nn.functional.softmax",
                 "functional.softmax"}
DROPOUT_FUNCS = {"F.dropout", "torch.dropout", "torch.nn.functional.dropout", "nn.functional.dropout"}
SDPA_FUNCS = {"F.scaled_dot_product_attention", "torch.nn.functional.scaled_dot_product_attention",
              "nn.functional.scaled_dot_product_attention", "scaled_dot_product_attention"}
FLASH_FUNCS = {"flash_attn_func", "flash_attn.flash_attn_func", "flash_attn_varlen_func",
               "flash_attn_interface.flash_attn_func", "flash_attn_qkvpacked_func"}
UPCASTS = {"float", "double"}
CASTS = {"type_as", "to", "half", "bfloat16", "float", "type"}


def dotted(node: ast.AST) -> str:
    """'torch.nn.functional.softmax' for an attribute chain of names, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def kwarg(call: ast.Call, name: str, pos: int | None = None) -> ast.AST | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    if pos is not None and len(call.args) > pos:
        return call.args[pos]
    return None


def const(node: ast.AST | None) -> Any:
    """The value of a literal (numbers, -x, strings, booleans, None), else a marker."""
    try:
        return ast.literal_eval(node) if node is not None else None
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return Ellipsis


def is_minus_inf(node: ast.AST) -> bool:
    """-inf, float('-inf'), -float('inf'), -math.inf, -torch.inf, torch.finfo(..).min, or <= -1e4."""
    text = ast.unparse(node).replace(" ", "")
    if re.fullmatch(r"(-(math|torch|np|numpy)\.inf|float\(['\"]-inf['\"]\)|-float\(['\"]inf['\"]\)|"
                    r"torch\.finfo\(.*\)\.min|-torch\.finfo\(.*\)\.max)", text):
        return True
    value = const(node)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value <= -1e4


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
    edits: list[tuple[int, int, list[str]]] = field(default_factory=list)  # (first, last line, new lines)
    needs: dict[str, Any] = field(default_factory=dict)  # facts a live model must confirm

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("edits")
        d["where"] = f"{self.file}:{self.line}"
        return d


# ----------------------------------------------------------------------------- analysis


class FunctionAnalysis:
    """Sites in one function (def) of one file."""

    def __init__(self, fn: ast.FunctionDef, source: str, file: str, qualname: str, attr_types: dict[str, str],
                 functional: str):
        self.fn, self.source, self.file, self.qualname = fn, source, file, qualname
        self.attr_types = attr_types  # self.<attr> -> class name (nn.Dropout, nn.Softmax, ...)
        self.functional = functional  # how this file names torch.nn.functional: "F" or "torch.nn.functional"
        self.lines = source.splitlines()

    # --- helpers over the function's statements
    def seg(self, node: ast.AST | str) -> str:
        if isinstance(node, str):
            return node
        return ast.get_source_segment(self.source, node) or ast.unparse(node)

    def blocks(self):
        """Every statement list in the function (body, branches, loop bodies, with bodies)."""
        todo = [self.fn.body]
        while todo:
            block = todo.pop()
            yield block
            for st in block:
                for name in ("body", "orelse", "finalbody"):
                    inner = getattr(st, name, None)
                    if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt) and \
                            not isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        todo.append(inner)
                for handler in getattr(st, "handlers", []) or []:
                    todo.append(handler.body)

    def definition(self, name: str, block: list[ast.stmt], before: int) -> tuple[int, ast.AST] | None:
        """The latest ``name = value`` in ``block`` before index ``before`` (None when the
        name is last set some other way: tuple unpacking, +=, inside a branch)."""
        for i in range(before - 1, -1, -1):
            st = block[i]
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name) \
                    and st.targets[0].id == name:
                return i, st.value
            if name in self.stored(st):
                return None
        return None

    def resolve(self, name: str, block: list[ast.stmt], before: int, ops: list, chain: list[int]):
        """Walk back from index ``before`` to ``name``'s definition, collecting what happens
        to it on the way: in-place ``masked_fill_``, and ``if M is not None: name = name + M``
        (a conditional additive mask). Returns (index, value) of the definition, or None
        when something else sets or changes the name."""
        for i in range(before - 1, -1, -1):
            st = block[i]
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name) \
                    and st.targets[0].id == name:
                return i, st.value
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) and \
                    isinstance(st.value.func, ast.Attribute) and dotted(st.value.func.value) == name:
                call = st.value
                if call.func.attr == "masked_fill_":
                    ops.append(("masked_fill", kwarg(call, "mask", 0), kwarg(call, "value", 1)))
                    chain.append(i)
                    continue
                if call.func.attr in ("mul_", "div_") and call.args:
                    ops.append(("mul" if call.func.attr == "mul_" else "div", call.args[0]))
                    chain.append(i)
                    continue
                return None
            if isinstance(st, ast.If) and name in self.stored(st):
                mask = self.conditional_mask(st, name)
                if mask is None:
                    return None
                ops.append(("add", mask))
                chain.append(i)
                continue
            if name in self.stored(st):
                return None
        return None

    def conditional_mask(self, st: ast.If, name: str) -> str | None:
        """``if T: [tmp = e;] name = name + A`` -> the source of 'A if T else None' (simplified to A
        when T is 'A is not None'); None for any other shape."""
        if st.orelse or not st.body:
            return None
        *temps, last = st.body
        if not (isinstance(last, ast.Assign) and len(last.targets) == 1 and dotted(last.targets[0]) == name and
                isinstance(last.value, ast.BinOp) and isinstance(last.value.op, ast.Add)):
            return None
        left, right = last.value.left, last.value.right
        added = right if dotted(left) == name else left if dotted(right) == name else None
        if added is None:
            return None
        subs = {}
        for t in temps:
            if not (isinstance(t, ast.Assign) and len(t.targets) == 1 and isinstance(t.targets[0], ast.Name)):
                return None
            subs[t.targets[0].id] = t.value

        class Inline(ast.NodeTransformer):
            def visit_Name(self, node):
                return subs.get(node.id, node) if isinstance(node.ctx, ast.Load) else node

        added_src = ast.unparse(Inline().visit(ast.parse(ast.unparse(added), mode="eval")).body)
        test = st.test
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.IsNot) and \
                const(test.comparators[0]) is None and ast.unparse(test.left) == added_src:
            return added_src
        return f"({added_src} if {ast.unparse(test)} else None)"

    @staticmethod
    def stored(st: ast.stmt) -> set[str]:
        return {n.id for n in ast.walk(st) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}

    def attr_type(self, node: ast.AST) -> str:
        name = dotted(node)
        return self.attr_types.get(name[5:], "") if name.startswith("self.") else ""

    def is_softmax(self, call: ast.AST) -> tuple[ast.AST, ast.AST | None, bool] | None:
        """(input, dim node, upcast) when ``call`` is a softmax over some dim."""
        if not isinstance(call, ast.Call):
            return None
        name = dotted(call.func)
        upcast = False
        dtype = kwarg(call, "dtype")
        if dtype is not None and dotted(dtype) in ("torch.float32", "torch.float"):
            upcast = True
        if self.attr_type(call.func) == "Softmax":  # self.softmax = nn.Softmax(dim=...)
            if not call.args:
                return None
            dim = self.attr_types.get("__softmax_dim__" + dotted(call.func)[5:], -1)
            return call.args[0], ast.Constant(dim), False
        if name in SOFTMAX_FUNCS and call.args:
            return call.args[0], kwarg(call, "dim", 1), upcast
        if isinstance(call.func, ast.Attribute) and call.func.attr == "softmax" and name not in SOFTMAX_FUNCS \
                and dotted(call.func.value) not in ("self", "torch", "F", "nn.functional"):
            return call.func.value, kwarg(call, "dim", 0), upcast
        return None

    # --- the score side: from the softmax input back to Q Kᵀ
    def score_chain(self, expr: ast.AST, block, index, chain_stmts: list[int], ops: list[tuple]) -> dict | None:
        """Walk back from the softmax input to the score product, collecting ops (last first)."""
        while True:
            if isinstance(expr, ast.Name):
                found = self.resolve(expr.id, block, index, ops, chain_stmts)
                if found is None:
                    return None
                index, expr = found
                chain_stmts.append(index)
                continue
            if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr in UPCASTS \
                    and not expr.args:
                ops.append(("upcast",))
                expr = expr.func.value
                continue
            if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "to" \
                    and len(expr.args) == 1 and dotted(expr.args[0]) in ("torch.float32", "torch.float"):
                ops.append(("upcast",))
                expr = expr.func.value
                continue
            if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Div):
                ops.append(("div", expr.right))
                expr = expr.left
                continue
            if isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Mult, ast.Add)):
                # commutative: the side that leads back to Q Kᵀ is the scores, the other the factor or mask
                right_is_score = self.looks_like_score(expr.right, block, index) and \
                    not self.looks_like_score(expr.left, block, index)
                score, other = (expr.right, expr.left) if right_is_score else (expr.left, expr.right)
                ops.append(("mul" if isinstance(expr.op, ast.Mult) else "add", other))
                expr = score
                continue
            if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "masked_fill":
                mask, fill = kwarg(expr, "mask", 0), kwarg(expr, "value", 1)
                if mask is None or fill is None:
                    return None
                ops.append(("masked_fill", mask, fill))
                expr = expr.func.value
                continue
            if isinstance(expr, ast.Call) and dotted(expr.func) == "torch.where" and len(expr.args) == 3:
                ops.append(("where", expr.args[0], expr.args[2]))
                expr = expr.args[1]
                continue
            product = self.score_product(expr)
            if product is None:
                return None
            product["stmt"] = index
            return product

    def looks_like_score(self, expr: ast.AST, block, index) -> bool:
        """Does ``expr`` lead back to a Q Kᵀ product (by name definitions)?"""
        seen = 0
        while seen < 20:
            seen += 1
            if self.score_product(expr) is not None:
                return True
            if isinstance(expr, ast.Name):
                found = self.definition(expr.id, block, index)
                if not found:
                    return False
                index, expr = found
                continue
            if isinstance(expr, ast.BinOp):
                return self.looks_like_score(expr.left, block, index) or self.looks_like_score(expr.right, block, index)
            if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
                expr = expr.func.value
                continue
            return False
        return False

    def score_product(self, expr: ast.AST) -> dict | None:
        """Q Kᵀ as {form, q, kt, extra}; None when ``expr`` is no product."""
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.MatMult):
            return {"form": "matmul", "q": expr.left, "kt": expr.right}
        if isinstance(expr, ast.Call):
            name = dotted(expr.func)
            if name in ("torch.matmul",) and len(expr.args) == 2:
                return {"form": "matmul", "q": expr.args[0], "kt": expr.args[1]}
            if name == "torch.bmm" and len(expr.args) == 2:
                return {"form": "bmm", "q": expr.args[0], "kt": expr.args[1]}
            if name == "torch.baddbmm" and len(expr.args) >= 3:
                return {"form": "baddbmm", "q": expr.args[1], "kt": expr.args[2], "bias": expr.args[0],
                        "beta": kwarg(expr, "beta"), "alpha": kwarg(expr, "alpha")}
            if name == "torch.einsum" and len(expr.args) == 3 and isinstance(const(expr.args[0]), str):
                return {"form": "einsum", "q": expr.args[1], "kt": expr.args[2], "eq": const(expr.args[0])}
        return None

    # --- the value side: from the softmax result forward to P V
    def value_chain(self, st_index: int, block, prob_name: str | None, chain_stmts: list[int]) -> dict | None:
        """Follow ``prob_name`` through dropout and casts to the value product."""
        dropout = None
        name = prob_name
        for i in range(st_index + 1, len(block)):
            st = block[i]
            uses = [n for n in ast.walk(st) if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)]
            if not uses:
                if name in self.stored(st):
                    return None
                continue
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
                value = st.value
                drop = self.dropout_of(value, name)
                if drop is not None:
                    dropout = drop
                    chain_stmts.append(i)
                    name = st.targets[0].id
                    continue
                if self.is_cast_of(value, name):
                    chain_stmts.append(i)
                    name = st.targets[0].id
                    continue
            product = self.find_value_product(st, name)
            if product is None:
                return None
            product.update({"stmt": i, "dropout": dropout, "prob": name, "prob_name": prob_name})
            return product
        return None

    def dropout_of(self, value: ast.AST, name: str) -> tuple | None:
        if not isinstance(value, ast.Call) or not value.args or not (isinstance(value.args[0], ast.Name) and
                                                                     value.args[0].id == name):
            return None
        fname = dotted(value.func)
        if fname in DROPOUT_FUNCS:
            return ("functional", kwarg(value, "p", 1), kwarg(value, "training", 2))
        if self.attr_type(value.func) == "Dropout":
            return ("module", value.func)
        return None

    @staticmethod
    def is_cast_of(value: ast.AST, name: str) -> bool:
        return (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr in CASTS
                and isinstance(value.func.value, ast.Name) and value.func.value.id == name)

    def find_value_product(self, st: ast.stmt, name: str) -> dict | None:
        """The P V product using ``name`` as P inside statement ``st``."""
        def is_p(node):
            while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CASTS:
                node = node.func.value
            return isinstance(node, ast.Name) and node.id == name

        for node in ast.walk(st):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult) and is_p(node.left):
                return {"vform": "matmul", "v": node.right, "node": node}
            if isinstance(node, ast.Call):
                fname = dotted(node.func)
                if fname in ("torch.matmul", "torch.bmm") and len(node.args) == 2 and is_p(node.args[0]):
                    return {"vform": "bmm" if fname == "torch.bmm" else "matmul", "v": node.args[1], "node": node}
                if fname == "torch.einsum" and len(node.args) == 3 and is_p(node.args[1]) \
                        and isinstance(const(node.args[0]), str):
                    return {"vform": "einsum", "v": node.args[2], "node": node, "eq": const(node.args[0])}
        return None

    # --- putting a site together
    def sites(self) -> list[Site]:
        out = []
        for block in self.blocks():
            for index, st in enumerate(block):
                for node in ast.walk(st):
                    soft = self.is_softmax(node)
                    if soft is not None:
                        site = self.build(block, index, st, node, soft)
                        if site is not None:
                            out.append(site)
                    if isinstance(node, ast.Call):
                        fast = self.fast_path(node, st, block, index)
                        if fast is not None:
                            out.append(fast)
        return out

    def build(self, block, index, st, softmax_call, soft) -> Site | None:
        src, dim, upcast = soft
        chain_stmts: list[int] = [index]
        ops: list[tuple] = []
        product = self.score_chain(src, block, index, chain_stmts, ops)
        if product is None:
            return None  # a softmax that is not attention
        site = Site(self.file, self.qualname, block[product["stmt"]].lineno, st.end_lineno, "manual",
                    product["form"], softmax_line=softmax_call.lineno)
        ops.reverse()  # in application order, product first
        site.softmax_upcast = upcast or any(op[0] == "upcast" for op in ops)
        dim_value = const(dim) if dim is not None else Ellipsis
        if dim is None:
            return self.refuse(site, "softmax without an explicit dim")
        if dim_value != -1:
            site.needs["softmax_dim"] = dim_value  # must be the last dimension: a live model checks
        if not (isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name)):
            return self.refuse(site, "the softmax result is not assigned to a name")
        wrapped_dropout = self.softmax_is_whole_value(st.value, softmax_call, site)
        if wrapped_dropout is False:
            return self.refuse(site, "the softmax result is used inside a larger expression")
        value = self.value_chain(index, block, st.targets[0].id, chain_stmts)
        if value is not None and wrapped_dropout is not True:
            if value.get("dropout") is not None:
                return self.refuse(site, "dropout applied twice to the attention weights")
            value["dropout"] = wrapped_dropout
        if value is None:
            return self.refuse(site, "no value product (P @ V) follows the softmax in the same block")
        site.end_line = block[value["stmt"]].end_lineno
        chain_stmts.append(value["stmt"])
        if product["form"] == "einsum" and value["vform"] != "einsum" or \
                product["form"] != "einsum" and value["vform"] == "einsum":
            return self.refuse(site, "score and value products use different forms (einsum with matmul)")
        return self.finish(site, block, sorted(set(chain_stmts)), product, value, ops)

    def softmax_is_whole_value(self, value: ast.AST, softmax_call: ast.AST, site: Site):
        """True when the statement's value is the softmax (up to casts); a dropout tuple when
        a dropout wraps it; False otherwise."""
        node, dropout = value, None
        while node is not softmax_call:
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CASTS \
                    and not node.args[1:]:
                node = node.func.value
                continue
            if isinstance(node, ast.Call) and node.args and dropout is None:
                if dotted(node.func) in DROPOUT_FUNCS:
                    dropout, node = ("functional", kwarg(node, "p", 1), kwarg(node, "training", 2)), node.args[0]
                    continue
                if self.attr_type(node.func) == "Dropout":
                    dropout, node = ("module", node.func), node.args[0]
                    continue
            return False
        return dropout if dropout is not None else True

    def refuse(self, site: Site, reason: str) -> Site:
        site.swappable, site.reason = False, reason
        return site

    def finish(self, site: Site, block, chain: list[int], product: dict, value: dict, ops: list[tuple]) -> Site:
        # names defined by the chain must not be read anywhere else
        chain_names = set()
        for i in chain[:-1]:
            st = block[i]
            if isinstance(st, ast.Assign):
                chain_names |= {t.id for t in st.targets if isinstance(t, ast.Name)}
        chain_nodes = {id(n) for i in chain for n in ast.walk(block[i])}
        returned: list[ast.Name] = []
        returns = {id(n): r for r in ast.walk(self.fn) if isinstance(r, ast.Return) and r.value is not None
                   for n in ([r.value] + (list(r.value.elts) if isinstance(r.value, ast.Tuple) else []))}
        for node in ast.walk(self.fn):
            if isinstance(node, ast.Name) and node.id in chain_names and isinstance(node.ctx, ast.Load) \
                    and id(node) not in chain_nodes:
                if id(node) in returns and node is not returns[id(node)].value and node.id == value.get("prob_name"):
                    returned.append(node)
                    continue
                return self.refuse(site, f"'{node.id}' (scores or attention weights) is also used at line "
                                         f"{node.lineno}: the weights would be lost")
        # scale and masks
        factors: list[str] = []
        masks: list[tuple[str, ast.AST, ast.AST | None]] = []
        if product["form"] == "baddbmm":
            beta, alpha = const(product.get("beta")), product.get("alpha")
            if alpha is not None:
                factors.append(self.seg(alpha))
            if product.get("beta") is None or beta == 1 or beta == 1.0:
                masks.append(("add", product["bias"], None))
            elif beta not in (0, 0.0):
                return self.refuse(site, "baddbmm with beta other than 0 or 1")
        for op in ops:
            if op[0] in ("mul", "div"):
                if any(m[0] == "add" for m in masks):
                    return self.refuse(site, "a scale applied after an additive mask (the mask would be scaled too): "
                                             "move the scale before the mask by hand")
                factors.append(self.seg(op[1]) if op[0] == "mul" else f"1.0 / {self.paren(self.seg(op[1]))}")
            elif op[0] in ("add", "masked_fill", "where"):
                masks.append(op if op[0] != "add" else ("add", op[1], None))
        site.scale = " * ".join(f"({f})" if " " in f else f for f in factors) if factors else "1.0"
        if not factors:
            site.notes.append("no scale in the chain: scale=1.0 (the raw product), not SDPA's default 1/sqrt(d)")
        if len(masks) > 1:
            return self.refuse(site, "more than one mask in the chain (combine them into one attn_mask by hand)")
        mask_kw, causal = None, False
        if masks:
            kind, m, fill = masks[0]
            if kind == "add":
                site.mask, mask_kw = "additive", self.seg(m)
            else:
                if not is_minus_inf(fill):
                    return self.refuse(site, f"{kind} with {self.seg(fill)}, which is not -inf or a large negative "
                                             "number: not a mask")
                keep = self.keep_mask(m) if kind == "masked_fill" else self.seg(m)
                defined = m
                if isinstance(m, ast.Name):
                    found = self.definition(m.id, block, chain[-1])
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
                    site.notes.append(f"fill {self.seg(fill)}: rows with every key masked would average all keys "
                                      "in eager and give zeros in SDPA")
        layout = self.layout(site, product, value)
        if layout is None:
            return site
        q_src, k_src, v_src, out_perm = layout
        k_src, v_src, gqa = self.gqa(k_src, v_src, block, product["stmt"], site)
        three_d = product["form"] in ("bmm", "baddbmm") or value["vform"] == "bmm"
        site.flash_call = self.flash_variant(q_src, k_src, v_src, three_d, mask_kw, causal, value.get("dropout"),
                                             site, out_perm)
        if three_d:
            q_src, k_src, v_src = (f"{self.paren(s)}.unsqueeze(0)" for s in (q_src, k_src, v_src))
            if mask_kw:
                mask_kw = f"{self.paren(mask_kw)}.unsqueeze(0)"
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
        call = f"{self.functional}.scaled_dot_product_attention({', '.join(args)})"
        if three_d:
            call = f"{call}.squeeze(0)"
        if out_perm:
            call = f"{call}.permute({', '.join(map(str, out_perm))})"
        site.call = call
        site.edits = self.edits(block, chain, value["node"], call)
        for node in returned:  # the weights were returned: None takes their place, as in transformers' SDPA path
            ret = returns[id(node)]
            site.edits.append((ret.lineno, ret.end_lineno, self.replace_name(ret, node)))
            site.notes.append(f"line {ret.lineno} returned the attention weights '{node.id}'; after the swap it returns "
                              "None in their place, as transformers' sdpa_attention_forward does (a fused kernel "
                              "never forms them)")
        site.swappable = True
        return site

    def replace_name(self, st: ast.stmt, node: ast.Name) -> list[str]:
        lines = self.lines[st.lineno - 1: st.end_lineno]
        row = node.lineno - st.lineno
        line = lines[row]
        a, b = self.char(line, node.col_offset), self.char(line, node.end_col_offset)
        lines = list(lines)
        lines[row] = line[:a] + "None" + line[b:]
        return lines

    def flash_variant(self, q: str, k: str, v: str, three_d: bool, mask_kw, causal: bool, dropout, site: Site,
                      out_perm) -> str:
        """The same site as ``flash_attn_func`` (layout [B, S, H, D]); '' when it takes no mask
        other than causal. For S_q == S_k the causal masks of both libraries agree; a causal
        site here always has S_q == S_k (a square tril/triu mask)."""
        if mask_kw:
            return ""
        if three_d:  # [B*H, S, D] -> [B*H, S, 1, D]
            q, k, v = (f"{self.paren(x)}.unsqueeze(2)" for x in (q, k, v))
        else:  # [B, H, S, D] -> [B, S, H, D]
            q, k, v = (f"{self.paren(x)}.transpose(1, 2)" for x in (q, k, v))
        args = [q, k, v]
        site_drop = self.dropout_kw(dropout, Site("", "", 0, 0, "")) if dropout else ""
        if site_drop:
            args.append(f"dropout_p={site_drop}")
        args.append(f"softmax_scale={site.scale}")
        if causal:
            args.append("causal=True")
        call = f"flash_attn_func({', '.join(args)})"
        call += ".squeeze(2)" if three_d else ".transpose(1, 2)"
        if out_perm:
            call = f"{call}.permute({', '.join(map(str, out_perm))})"
        return call

    @staticmethod
    def paren(src: str) -> str:
        return src if re.fullmatch(r"[\w.]+(\([^()]*\))?", src) else f"({src})"

    def keep_mask(self, m: ast.AST) -> str:
        """The SDPA boolean mask (True = take part) for masked_fill(m, -inf)."""
        if isinstance(m, ast.Compare) and len(m.ops) == 1 and isinstance(m.ops[0], ast.Eq) and \
                const(m.comparators[0]) in (0, 0.0, False):
            return f"{self.seg(m.left)} != 0"
        if isinstance(m, ast.UnaryOp) and isinstance(m.op, ast.Invert):
            return self.seg(m.operand)
        if isinstance(m, ast.Call) and isinstance(m.func, ast.Attribute) and m.func.attr == "logical_not" and \
                not m.args:
            return self.seg(m.func.value)
        return f"~{self.paren(self.seg(m))}"

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

    def layout(self, site: Site, product: dict, value: dict):
        """(q, k, v sources in [..., S, D] layout, permutation of SDPA's output or None)."""
        if product["form"] != "einsum":
            rank = 3 if product["form"] in ("bmm", "baddbmm") else 4
            k = self.untranspose(product["kt"], rank, site)
            return self.seg(product["q"]), k, self.seg(value["v"]), None
        return self.einsum_layout(site, product, value)

    def untranspose(self, kt: ast.AST, rank: int, site: Site) -> str:
        """K for an operand that is Kᵀ: strips .transpose(-2, -1), .transpose(rank-2, rank-1),
        .mT, or a permute that swaps the last two dims; else transposes the operand."""
        if isinstance(kt, ast.Call) and isinstance(kt.func, ast.Attribute):
            if kt.func.attr == "transpose" and len(kt.args) == 2:
                dims = sorted(const(x) for x in kt.args)
                if dims == [-2, -1]:
                    return self.seg(kt.func.value)
                if dims == [rank - 2, rank - 1]:
                    site.needs["rank"] = rank  # the transpose is Kᵀ only for this rank: a live model checks
                    return self.seg(kt.func.value)
            if kt.func.attr == "permute":
                dims = [const(x) for x in kt.args]
                if all(isinstance(d, int) for d in dims) and len(dims) >= 2 and \
                        dims == list(range(len(dims) - 2)) + [len(dims) - 1, len(dims) - 2]:
                    return self.seg(kt.func.value)
        if isinstance(kt, ast.Attribute) and kt.attr == "mT":
            return self.seg(kt.value)
        return f"{self.paren(self.seg(kt))}.transpose(-2, -1)"

    def einsum_layout(self, site: Site, product: dict, value: dict):
        eq1, eq2 = product["eq"].replace(" ", ""), value["eq"].replace(" ", "")
        try:
            (sq, sk), ss = eq1.split("->")[0].split(","), eq1.split("->")[1]
            (sp, sv), so = eq2.split("->")[0].split(","), eq2.split("->")[1]
        except ValueError:
            return self.refuse(site, f"einsum equations {eq1!r}, {eq2!r} are not two-operand with '->'") and None
        if "." in eq1 + eq2 or len(set(ss)) != len(ss):
            return self.refuse(site, "einsum with '...' or repeated letters") and None
        contract = (set(sq) & set(sk)) - set(ss)
        i_set, j_set = (set(sq) & set(ss)) - set(sk), (set(sk) & set(ss)) - set(sq)
        batch = [c for c in ss if c in sq and c in sk]
        if len(contract) != 1 or len(i_set) != 1 or len(j_set) != 1 or ss[-1] not in j_set or \
                set(ss) != set(batch) | i_set | j_set or set(sq) != set(batch) | i_set | contract or \
                set(sk) != set(batch) | j_set | contract:
            return self.refuse(site, f"einsum {eq1!r} is not batch x query x key with the key last") and None
        (d,), (i,), (j,) = contract, i_set, j_set
        ren = dict(zip(sp, ss)) if len(sp) == len(ss) else {}
        if not ren or sorted(sp) != sorted(set(sp)):
            return self.refuse(site, f"einsum {eq2!r} does not take the scores in their own layout") and None
        vj = {v: k for k, v in ren.items()}.get(j)
        e_set = set(sv) - set(sp)
        if vj is None or vj not in sv or len(e_set) != 1:
            return self.refuse(site, f"einsum {eq2!r} does not contract over the key dimension") and None
        (e,) = e_set
        vbatch = [{v: k for k, v in ren.items()}[c] for c in batch]
        if set(sv) != set(vbatch) | {vj, e} or set(so) != set(vbatch) | {{v: k for k, v in ren.items()}[i], e}:
            return self.refuse(site, f"einsum {eq2!r} has unexpected dimensions") and None

        def perm(src: str, have: str, want: str) -> str:
            order = [have.index(c) for c in want]
            return src if order == list(range(len(order))) else f"{self.paren(src)}.permute({', '.join(map(str, order))})"

        q = perm(self.seg(product["q"]), sq, "".join(batch) + i + d)
        k = perm(self.seg(product["kt"]), sk, "".join(batch) + j + d)
        v = perm(self.seg(value["v"]), sv, "".join(vbatch) + vj + e)
        out_have = "".join(vbatch) + {v: k for k, v in ren.items()}[i] + e
        order = [out_have.index(c) for c in so]
        return q, k, v, None if order == list(range(len(order))) else order

    def gqa(self, k_src: str, v_src: str, block, before: int, site: Site) -> tuple[str, str, bool]:
        """Key/value repeated over the head dimension (repeat_interleave(n, dim=1), repeat_kv):
        SDPA takes the unrepeated ones with enable_gqa=True."""
        def base(src):
            if not re.fullmatch(r"\w+", src):
                return None, None
            found = self.definition(src, block, before + 1)
            if not found:
                return None, None
            value = found[1]
            if isinstance(value, ast.Call):
                name = dotted(value.func)
                if name == "torch.repeat_interleave" and len(value.args) >= 2 and const(kwarg(value, "dim", 2)) == 1:
                    return self.seg(value.args[0]), self.seg(value.args[1])
                if isinstance(value.func, ast.Attribute) and value.func.attr == "repeat_interleave" and \
                        name != "torch.repeat_interleave" and const(kwarg(value, "dim", 1)) == 1 and value.args:
                    return self.seg(value.func.value), self.seg(value.args[0])
                if name.split(".")[-1] == "repeat_kv" and len(value.args) == 2:
                    return self.seg(value.args[0]), self.seg(value.args[1])
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

    def dropout_kw(self, dropout: tuple | None, site: Site) -> str:
        if dropout is None:
            return ""
        if dropout[0] == "module":
            mod = self.seg(dropout[1])
            site.dropout = f"nn.Dropout {mod}"
            return f"{mod}.p if {mod}.training else 0.0"
        p, training = dropout[1], dropout[2]
        p_src = self.seg(p) if p is not None else "0.5"
        if training is None:
            site.dropout = f"F.dropout p={p_src} (always, training defaults to True)"
            return p_src
        site.dropout = f"F.dropout p={p_src} when {self.seg(training)}"
        return f"{p_src} if {self.seg(training)} else 0.0"

    def edits(self, block, chain: list[int], product_node: ast.AST, call: str) -> list[tuple[int, int, list[str]]]:
        """Remove the chain's statements; replace the value product inside the last one."""
        out = []
        for i in chain[:-1]:
            st = block[i]
            out.append((st.lineno, st.end_lineno, []))
        last = block[chain[-1]]
        lines = self.lines[last.lineno - 1: last.end_lineno]
        # replace [product_node] span inside these lines
        rel_start = product_node.lineno - last.lineno
        rel_end = product_node.end_lineno - last.lineno
        prefix = lines[rel_start][: self.char(lines[rel_start], product_node.col_offset)]
        suffix = strip_comment(lines[rel_end][self.char(lines[rel_end], product_node.end_col_offset):])
        new = lines[:rel_start] + wrap(prefix, call, suffix) + lines[rel_end + 1:]
        out.append((last.lineno, last.end_lineno, new))
        return out

    @staticmethod
    def char(line: str, byte_offset: int) -> int:
        """ast column offsets count UTF-8 bytes."""
        return len(line.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore"))

    # --- calls that already take a fast path, and nn.MultiheadAttention
    def fast_path(self, call: ast.Call, st: ast.stmt, block, index) -> Site | None:
        name = dotted(call.func)
        if name in SDPA_FUNCS or name.endswith(".scaled_dot_product_attention"):
            site = Site(self.file, self.qualname, call.lineno, call.end_lineno, "sdpa", "scaled_dot_product_attention",
                        reason="already SDPA")
            mask = kwarg(call, "attn_mask", 3)
            if mask is not None and const(mask) is not None:
                site.blockers.append("an explicit attn_mask: on CUDA it rules out SDPA's flash kernel (efficient or "
                                     "cuDNN run instead); use is_causal=True when the mask is causal")
            self.fp32_blocker(call.args[:3], site)
            return site
        if name in FLASH_FUNCS or name.split(".")[-1] in ("flash_attn_func", "flash_attn_varlen_func"):
            site = Site(self.file, self.qualname, call.lineno, call.end_lineno, "flash_attn", name.split(".")[-1],
                        reason="already flash-attn")
            self.fp32_blocker(call.args[:3], site)
            return site
        if self.attr_type(call.func) == "MultiheadAttention":
            need = kwarg(call, "need_weights", 5)
            if need is not None and const(need) is False:
                return Site(self.file, self.qualname, call.lineno, call.end_lineno, "mha", "nn.MultiheadAttention",
                            reason="need_weights=False: PyTorch runs SDPA inside")
            site = Site(self.file, self.qualname, call.lineno, call.end_lineno, "mha", "nn.MultiheadAttention",
                        mask="attn_mask" if kwarg(call, "attn_mask", 4) is not None else "none")
            site.reason = "need_weights left at its default True: the [B, S, S] attention weights are materialised"
            used = self.mha_weights_used(call, st, block, index)
            if used:
                site.notes.append(used)
                return site
            site.swappable = True
            text = self.seg(call)
            new_call = text[:-1].rstrip() + (", " if call.args or call.keywords else "") + "need_weights=False)"
            site.call = new_call
            lines = self.lines[call.lineno - 1: call.end_lineno]
            prefix = lines[0][: self.char(lines[0], call.col_offset)]
            suffix = lines[-1][self.char(lines[-1], call.end_col_offset):]
            site.edits = [(call.lineno, call.end_lineno, [prefix + new_call + suffix])]
            return site
        return None

    def fp32_blocker(self, args, site: Site) -> None:
        for a in args:
            if isinstance(a, ast.Call) and isinstance(a.func, ast.Attribute) and a.func.attr in ("float", "double"):
                site.blockers.append(f"{self.seg(a)} is fp32/fp64: the flash kernels take fp16 and bf16 only")
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


# ----------------------------------------------------------------------------- files


def attribute_types(cls: ast.ClassDef) -> dict[str, str]:
    """self.<attr> -> nn class name, from ``self.x = nn.Dropout(...)`` in the class's methods."""
    out: dict[str, str] = {}
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.value, ast.Call):
            target = dotted(node.targets[0])
            if target.startswith("self.") and target.count(".") == 1:
                cname = dotted(node.value.func).split(".")[-1]
                if cname in ("Dropout", "Softmax", "MultiheadAttention"):
                    out[target[5:]] = cname
                    if cname == "Softmax":
                        dim = kwarg(node.value, "dim", 0)
                        out["__softmax_dim__" + target[5:]] = const(dim) if dim is not None else None
    return out


def functional_alias(tree: ast.Module) -> str:
    """How the file can name torch.nn.functional: its own alias ('F' after `import
    torch.nn.functional as F`), else through `import torch`, else through `from torch import nn`."""
    has_torch = has_nn = False
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.nn.functional" and a.asname:
                    return a.asname
                has_torch |= a.name == "torch" and a.asname is None
        if isinstance(node, ast.ImportFrom) and node.module == "torch.nn":
            for a in node.names:
                if a.name == "functional":
                    return a.asname or "functional"
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            has_nn |= any(a.name == "nn" and a.asname is None for a in node.names)
    return "torch.nn.functional" if has_torch or not has_nn else "nn.functional"


def functions(tree: ast.Module):
    """(qualname, def node, enclosing class or None) for every function in a module."""
    def walk(body, prefix, cls):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}{node.name}", node, cls
                yield from walk(node.body, f"{prefix}{node.name}.", cls)
            elif isinstance(node, ast.ClassDef):
                yield from walk(node.body, f"{prefix}{node.name}.", node)
    yield from walk(tree.body, "", None)


def analyze_source(source: str, file: str, attr_types: dict[str, dict[str, str]] | None = None) -> list[Site]:
    """Every attention site in ``source`` (a module's text). ``attr_types`` (class name ->
    attribute -> nn class) may come from a live model; otherwise from the classes' own
    ``self.x = nn.X(...)`` assignments. Raises SyntaxError for source that does not parse."""
    tree = ast.parse(source)
    alias = functional_alias(tree)
    out = []
    for qualname, fn, cls in functions(tree):
        types = attribute_types(cls) if cls is not None else {}
        if cls is not None and attr_types and cls.name in attr_types:
            types.update(attr_types[cls.name])
        out += FunctionAnalysis(fn, source, file, qualname, types, alias).sites()
    seen, unique = set(), []
    for s in sorted(out, key=lambda s: (s.line, s.kind)):
        key = (s.function, s.line, s.kind)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


def analyze_path(path: Path) -> tuple[list[Site], list[str]]:
    """Sites in a .py file or every .py file under a folder; also files that did not parse."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    sites, problems = [], []
    for f in files:
        try:
            sites += analyze_source(f.read_text(encoding="utf-8"), str(f))
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{f}: {type(exc).__name__}: {exc}")
    return sites, problems


def strip_comment(text: str) -> str:
    """``text`` (the rest of a line after the replaced product) without its trailing comment,
    which described the old product; code after it is kept."""
    import io
    import tokenize

    try:
        for tok in tokenize.generate_tokens(io.StringIO(text.lstrip() + "\n").readline):
            if tok.type == tokenize.COMMENT:
                cut = len(text) - len(text.lstrip()) + tok.start[1]
                return text[:cut].rstrip()
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return text


def wrap(prefix: str, call: str, suffix: str, width: int = 100) -> list[str]:
    """``prefix + call + suffix`` as one line, or with the call's arguments one per line
    when that is longer than ``width``."""
    line = prefix + call + suffix
    if len(line) <= width:
        return [line]
    head, _, rest = call.partition("(")
    depth, args, current = 0, [], ""
    for i, ch in enumerate(rest):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                args.append(current.strip())
                tail = rest[i + 1:]
                break
            depth -= 1
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
            continue
        current += ch
    else:
        return [line]
    indent = " " * (len(prefix) - len(prefix.lstrip()) + 4)
    return [prefix + head + "("] + [f"{indent}{a}," for a in args if a] + [" " * (len(indent) - 4) + ")" + tail + suffix]


def unified_diff(edits_by_file: dict[str, list[tuple[int, int, list[str]]]]) -> str:
    """The line edits of each file as one unified diff (``git apply`` takes it). Paths are
    relative to the working directory when under it, absolute otherwise."""
    import difflib
    import os

    chunks: list[str] = []
    for file, edits in sorted(edits_by_file.items()):
        old = Path(file).read_text()
        new = apply_edits(old, list({e[0]: e for e in edits}.values()))
        rel = os.path.relpath(file)
        rel = file if rel.startswith("..") else rel
        chunks += difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                       fromfile=f"a/{rel}", tofile=f"b/{rel}")
    return "".join(chunks)


def apply_edits(source: str, edits: list[tuple[int, int, list[str]]]) -> str:
    """``source`` with line-range edits applied (ranges must not overlap)."""
    lines = source.splitlines(keepends=True)
    end = "\n" if source.endswith("\n") else ""
    for first, last, new in sorted(edits, key=lambda e: -e[0]):
        lines[first - 1: last] = [ln + "\n" for ln in new]
    text = "".join(lines)
    return text if text.endswith("\n") or not end else text + end
