"""Pass 1, matching: the chain Q Kᵀ -> scale / mask / upcast -> softmax -> dropout / cast -> P V.

From each softmax, ``ChainMatcher`` walks back through names, scales, masks and casts to
the score product (``@``, ``matmul``, ``bmm``, ``baddbmm``, ``einsum``) and forward through
dropout and casts to the value product, in one block of statements. ``escaping_weights``
then checks that the scores and weights the chain defines are read nowhere else (a
``return`` of the weights is allowed: the swap returns None in their place).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from .site import Site, refuse
from .syntax import CASTS, DROPOUT_FUNCS, SOFTMAX_FUNCS, UPCASTS, Function, const, dotted, kwarg


@dataclass
class Chain:
    """A matched chain: its site (lines, form), the block and the indices of its statements
    (last: the value product), the score product, the value product and the ops between
    the product and the softmax, in the order they are applied."""

    site: Site
    block: list
    stmts: list[int]
    product: dict
    value: dict
    ops: list[tuple]


class ChainMatcher:
    """Pass 1 over a ``syntax.Function`` (see the module docstring)."""

    def __init__(self, f: Function):
        self.f = f

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
            if isinstance(st, ast.If) and name in self.f.stored(st):
                mask = self.conditional_mask(st, name)
                if mask is None:
                    return None
                ops.append(("add", mask))
                chain.append(i)
                continue
            if name in self.f.stored(st):
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

    def is_softmax(self, call: ast.AST) -> tuple[ast.AST, ast.AST | None, bool] | None:
        """(input, dim node, upcast) when ``call`` is a softmax over some dim."""
        if not isinstance(call, ast.Call):
            return None
        name = dotted(call.func)
        upcast = False
        dtype = kwarg(call, "dtype")
        if dtype is not None and dotted(dtype) in ("torch.float32", "torch.float"):
            upcast = True
        if self.f.attr_type(call.func) == "Softmax":  # self.softmax = nn.Softmax(dim=...)
            if not call.args:
                return None
            dim = self.f.attr_types.get("__softmax_dim__" + dotted(call.func)[5:], -1)
            return call.args[0], ast.Constant(dim), False
        if name in SOFTMAX_FUNCS and call.args:
            return call.args[0], kwarg(call, "dim", 1), upcast
        if isinstance(call.func, ast.Attribute) and call.func.attr == "softmax" and name not in SOFTMAX_FUNCS \
                and dotted(call.func.value) not in ("self", "torch", "F", "nn.functional"):
            return call.func.value, kwarg(call, "dim", 0), upcast
        return None

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
                found = self.f.definition(expr.id, block, index)
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

    def value_chain(self, st_index: int, block, prob_name: str | None, chain_stmts: list[int]) -> dict | None:
        """Follow ``prob_name`` through dropout and casts to the value product."""
        dropout = None
        name = prob_name
        for i in range(st_index + 1, len(block)):
            st = block[i]
            uses = [n for n in ast.walk(st) if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)]
            if not uses:
                if name in self.f.stored(st):
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
        if self.f.attr_type(value.func) == "Dropout":
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
                if self.f.attr_type(node.func) == "Dropout":
                    dropout, node = ("module", node.func), node.args[0]
                    continue
            return False
        return dropout if dropout is not None else True

    def build(self, block, index, st, softmax_call, soft) -> "Chain | Site | None":
        """The chain around one softmax: None when it is no attention (no Q Kᵀ behind it), a
        refused ``Site`` when it is attention that cannot be read, else a ``Chain``."""
        src, dim, upcast = soft
        chain_stmts: list[int] = [index]
        ops: list[tuple] = []
        product = self.score_chain(src, block, index, chain_stmts, ops)
        if product is None:
            return None  # a softmax that is not attention
        site = Site(self.f.file, self.f.qualname, block[product["stmt"]].lineno, st.end_lineno, "manual",
                    product["form"], softmax_line=softmax_call.lineno)
        ops.reverse()  # in application order, product first
        site.softmax_upcast = upcast or any(op[0] == "upcast" for op in ops)
        dim_value = const(dim) if dim is not None else Ellipsis
        if dim is None:
            return refuse(site, "softmax without an explicit dim")
        if dim_value != -1:
            site.needs["softmax_dim"] = dim_value  # must be the last dimension: a live model checks
        if not (isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name)):
            return refuse(site, "the softmax result is not assigned to a name")
        wrapped_dropout = self.softmax_is_whole_value(st.value, softmax_call, site)
        if wrapped_dropout is False:
            return refuse(site, "the softmax result is used inside a larger expression")
        value = self.value_chain(index, block, st.targets[0].id, chain_stmts)
        if value is not None and wrapped_dropout is not True:
            if value.get("dropout") is not None:
                return refuse(site, "dropout applied twice to the attention weights")
            value["dropout"] = wrapped_dropout
        if value is None:
            return refuse(site, "no value product (P @ V) follows the softmax in the same block")
        site.end_line = block[value["stmt"]].end_lineno
        chain_stmts.append(value["stmt"])
        if product["form"] == "einsum" and value["vform"] != "einsum" or \
                product["form"] != "einsum" and value["vform"] == "einsum":
            return refuse(site, "score and value products use different forms (einsum with matmul)")
        return Chain(site, block, sorted(set(chain_stmts)), product, value, ops)

    def escaping_weights(self, chain: Chain) -> tuple[list[ast.Name], dict] | None:
        """Names the chain defines (scores, weights) must not be read outside it. Returns
        (the returned weights' Name nodes, Name node id -> its Return), or None with the
        site refused when a name is read elsewhere."""
        site, block, stmts, value = chain.site, chain.block, chain.stmts, chain.value
        chain_names = set()
        for i in stmts[:-1]:
            st = block[i]
            if isinstance(st, ast.Assign):
                chain_names |= {t.id for t in st.targets if isinstance(t, ast.Name)}
        chain_nodes = {id(n) for i in stmts for n in ast.walk(block[i])}
        returned: list[ast.Name] = []
        returns = {id(n): r for r in ast.walk(self.f.fn) if isinstance(r, ast.Return) and r.value is not None
                   for n in ([r.value] + (list(r.value.elts) if isinstance(r.value, ast.Tuple) else []))}
        for node in ast.walk(self.f.fn):
            if isinstance(node, ast.Name) and node.id in chain_names and isinstance(node.ctx, ast.Load) \
                    and id(node) not in chain_nodes:
                if id(node) in returns and node is not returns[id(node)].value and node.id == value.get("prob_name"):
                    returned.append(node)
                    continue
                refuse(site, f"'{node.id}' (scores or attention weights) is also used at line {node.lineno}: the "
                             "weights would be lost")
                return None
        return returned, returns
