"""Pass 1, matching: the chain Q Kᵀ -> scale / mask / bias -> softmax -> dropout / cast -> P V.

Matching follows the data, not one spelling. From each softmax ``ChainMatcher`` walks
*back* through the names that carry the scores, across blocks (assignments, in-place
updates, an ``if`` updating them in one branch, a helper such as ``maybe_add_mask(attn,
mask)``, a view and back) to the score product (``@``, ``matmul``, ``bmm``, ``baddbmm``,
``einsum``), and *forward* through dropout, casts and transposes to the value product,
wherever it is (a later statement, after an ``if``/``else`` whose branches each take a
softmax: Swin).

Each op between product and softmax is classified (``Op.kind``): scalar factor, additive
term, boolean mask (``masked_fill``, ``where``, GPT-2's ``w * b - 1e10 * (1 - b)``), cast,
shape change, helper call. Anything else is refused with its line: talking heads, a
non-linear function of the scores, the weights blended after the softmax.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from .site import Site, refuse
from .syntax import (CANON_DROPOUT, CANON_EINSUM, CANON_SOFTMAX, CASTS, META_ATTRS, SHAPE_METHODS, UPCASTS, Function,
                     assigned_name, const, dotted, kwarg)


@dataclass
class Op:
    """One operation applied to the scores between the product and the softmax."""

    kind: str  # mul | div | add | sub | masked_fill | where | mulmask | upcast | cast | shape | call | inplace
    args: tuple  # AST nodes: the factor, the added term, (mask, fill), ...
    node: ast.AST  # the expression or statement that applies it
    cond: str | None = None  # the source of the `if` test it runs under, None when always
    stmt: ast.stmt | None = None


@dataclass
class Chain:
    """A matched chain (see the module docstring)."""

    site: Site
    block: list  # the value product's block
    stmts: list[int]  # statements of ``block`` only serving the chain; the value product's last
    product: dict  # form, q, kt, node, stmt; eq (einsum); bias/alpha/beta (baddbmm)
    value: dict  # vform, v, node, stmt, eq, p_first, p_perm, dropout, prob, prob_name
    ops: list[Op]  # in the order they are applied
    softmaxes: list[ast.Call] = field(default_factory=list)
    names: set = field(default_factory=set)  # names that hold the scores or the weights
    weight_names: set = field(default_factory=set)  # those holding the weights (after the softmax)
    all_stmts: list = field(default_factory=list)  # (block, index) of every statement of the chain
    elide: list = field(default_factory=list)  # softmax / dropout call nodes the replay form removes
    inplace: list = field(default_factory=list)  # (block, index, name) of in-place updates of the scores
    same_block: bool = True  # every chain statement in ``block`` (or an `if` there): the simple rewrite
    extra_reads: list = field(default_factory=list)  # metadata reads of the scores outside the chain
    returned: list = field(default_factory=list)  # (Name node, Return) of weights or scores returned
    returned_stmts: list = field(default_factory=list)  # (block, index) of `x = x.detach()` on the way out
    query_bias: str = ""  # an added term computed from the query (materialised as the mask)
    rank: int | None = None  # rank of the scores (a live run knows it)
    guards: list = field(default_factory=list)  # (if statement, its branch's test, why) kept eager
    replay: str = ""  # why the replay form is used ('' for the direct form)


class Refused(Exception):
    """A chain that is attention but cannot be read as SDPA: ``str(self)`` says why, with the
    construct and its line."""


class ChainMatcher:
    """Pass 1 over a ``syntax.Function`` (see the module docstring)."""

    def __init__(self, f: Function):
        self.f = f
        self.parent: dict[int, tuple[list, int, ast.stmt | None, str]] = {}  # id(block) -> (outer block, index, owner, branch)
        self.expr_parent: dict[int, ast.AST] = {}
        self._index(f.fn.body, None)

    # --- structure
    def _index(self, block: list, owner, outer=None, index=0, branch="body") -> None:
        if outer is not None:
            self.parent[id(block)] = (outer, index, owner, branch)
        for i, st in enumerate(block):
            for node in ast.walk(st):
                for child in ast.iter_child_nodes(node):
                    self.expr_parent[id(child)] = node
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            for name in ("body", "orelse", "finalbody"):
                inner = getattr(st, name, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    self._index(inner, st, block, i, name)
            for handler in getattr(st, "handlers", []) or []:
                self._index(handler.body, st, block, i, "handler")

    def block_of(self, st: ast.stmt) -> tuple[list, int] | None:
        for block in self.f.blocks():
            for i, s in enumerate(block):
                if s is st:
                    return block, i
        return None

    def line(self, node: ast.AST) -> int:
        return getattr(node, "lineno", 0)

    def code(self, node: ast.AST, n: int = 80) -> str:
        text = " ".join(self.f.seg(node).split())
        return text if len(text) <= n else text[: n - 3] + "..."

    # --- recognisers
    def is_softmax(self, call: ast.AST):
        """(input, dim node, upcast) when ``call`` is a softmax in any spelling (F.softmax,
        x.softmax, an nn.Softmax attribute or inline, a ``partial(F.softmax, ...)`` on self)."""
        if not isinstance(call, ast.Call):
            return None
        name = self.f.canon(call.func)
        dtype = kwarg(call, "dtype")
        upcast = dtype is not None and dotted(dtype).split(".")[-1] in ("float32", "float", "float64", "double")
        attr = self.f.attr_type(call.func)
        if attr == "Softmax" and call.args:
            dim = self.f.attr_types.get("__softmax_dim__" + dotted(call.func)[5:], -1)
            return call.args[0], ast.Constant(dim), False
        if attr == "partial_softmax" and call.args:
            key = dotted(call.func)[5:]
            dim = self.f.attr_types.get("__softmax_dim__" + key)
            up = self.f.attr_types.get("__softmax_upcast__" + key, False)
            return call.args[0], kwarg(call, "dim", 1) or (ast.Constant(dim) if dim is not None else None), up or upcast
        if isinstance(call.func, ast.Call) and self.f.canon(call.func.func) in ("torch.nn.Softmax", "nn.Softmax") \
                and call.args:  # nn.Softmax(dim=-1)(w)
            return call.args[0], kwarg(call.func, "dim", 0), False
        if name in CANON_SOFTMAX and call.args:
            return call.args[0], kwarg(call, "dim", 1), upcast
        if isinstance(call.func, ast.Attribute) and call.func.attr == "softmax" and name not in CANON_SOFTMAX \
                and not dotted(call.func.value) in ("self", "torch", "F", "nn.functional") \
                and self.f.canon(call.func.value) not in ("torch", "torch.nn.functional"):
            return call.func.value, kwarg(call, "dim", 0), upcast
        return None

    def dropout_of(self, node: ast.AST) -> tuple[tuple, ast.AST] | None:
        """(dropout description, its input) when ``node`` applies dropout."""
        if not isinstance(node, ast.Call) or not node.args:
            return None
        if self.f.canon(node.func) in CANON_DROPOUT:
            return ("functional", kwarg(node, "p", 1), kwarg(node, "training", 2)), node.args[0]
        if self.f.attr_type(node.func) == "Dropout":
            return ("module", node.func), node.args[0]
        return None

    def cast_of(self, node: ast.AST) -> tuple[str, ast.AST] | None:
        """('upcast' | 'cast', input) for x.float(), x.to(dtype), x.type(dtype), x.type_as(y), ..."""
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CASTS):
            return None
        attr = node.func.attr
        if attr in UPCASTS and not node.args:
            return "upcast", node.func.value
        if attr in ("half", "bfloat16") and not node.args:
            return "cast", node.func.value
        if attr in ("to", "type") and len(node.args) + len(node.keywords) >= 1:
            target = node.args[0] if node.args else kwarg(node, "dtype")
            if target is not None and dotted(target).split(".")[-1] in ("float32", "float", "float64", "double"):
                return "upcast", node.func.value
            return "cast", node.func.value
        if attr == "type_as" and len(node.args) == 1:
            return "cast", node.func.value
        return None

    def shape_of(self, node: ast.AST) -> tuple[ast.AST, list[int] | None] | None:
        """(input, permutation or None) for a reshaping call: view/reshape/permute/transpose/
        unsqueeze/contiguous/..., x.mT, einops' rearrange(x, 'pattern')."""
        if isinstance(node, ast.Attribute) and node.attr in ("mT", "T"):
            return node.value, [-1]  # the last two dims swapped
        if not isinstance(node, ast.Call):
            return None
        if isinstance(node.func, ast.Attribute) and node.func.attr in SHAPE_METHODS:
            perm = None
            if node.func.attr == "permute":
                dims = [const(a) for a in node.args]
                if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                    dims = list(dims[0])
                perm = dims if all(isinstance(d, int) for d in dims) else None
            elif node.func.attr == "transpose" and len(node.args) == 2:
                a, b = const(node.args[0]), const(node.args[1])
                if isinstance(a, int) and isinstance(b, int):
                    perm = ["T", a, b]
            elif node.func.attr == "contiguous":
                perm = []
            return node.func.value, perm
        if self.f.canon(node.func) in ("einops.rearrange",) and len(node.args) >= 2 and \
                isinstance(const(node.args[1]), str):
            return node.args[0], self.rearrange_perm(const(node.args[1]))
        return None

    @staticmethod
    def rearrange_perm(pattern: str) -> list[int] | None:
        """The permutation of an einops pattern that only reorders axes ('b i j -> b j i')."""
        try:
            left, right = (side.split() for side in pattern.split("->"))
        except ValueError:
            return None
        if "(" in pattern or sorted(left) != sorted(right) or len(set(left)) != len(left):
            return None
        return [left.index(a) for a in right]

    def score_product(self, expr: ast.AST) -> dict | None:
        """A product of two tensors as {form, q, kt, node, (eq | bias, beta, alpha)}; None
        when ``expr`` is none."""
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.MatMult):
            return {"form": "matmul", "q": expr.left, "kt": expr.right, "node": expr}
        if not isinstance(expr, ast.Call):
            return None
        name = self.f.canon(expr.func)
        method = expr.func.attr if isinstance(expr.func, ast.Attribute) and name.split(".")[0] != "torch" else ""
        if name == "torch.matmul" and len(expr.args) == 2:
            return {"form": "matmul", "q": expr.args[0], "kt": expr.args[1], "node": expr}
        if method == "matmul" and len(expr.args) == 1:
            return {"form": "matmul", "q": expr.func.value, "kt": expr.args[0], "node": expr}
        if name == "torch.bmm" and len(expr.args) == 2:
            return {"form": "bmm", "q": expr.args[0], "kt": expr.args[1], "node": expr}
        if method == "bmm" and len(expr.args) == 1:
            return {"form": "bmm", "q": expr.func.value, "kt": expr.args[0], "node": expr}
        if name == "torch.baddbmm" and len(expr.args) >= 3:
            return {"form": "baddbmm", "q": expr.args[1], "kt": expr.args[2], "bias": expr.args[0],
                    "beta": kwarg(expr, "beta"), "alpha": kwarg(expr, "alpha"), "node": expr}
        if method == "baddbmm":
            a, b = kwarg(expr, "batch1", 0), kwarg(expr, "batch2", 1)
            if a is not None and b is not None:
                return {"form": "baddbmm", "q": a, "kt": b, "bias": expr.func.value, "beta": kwarg(expr, "beta"),
                        "alpha": kwarg(expr, "alpha"), "node": expr}
        if name in CANON_EINSUM and expr.args and isinstance(const(expr.args[0]), str):
            ops = expr.args[1:]
            if len(ops) == 1 and isinstance(ops[0], (ast.Tuple, ast.List)):
                ops = ops[0].elts  # torch.einsum(eq, (a, b)), the old form
            eq = const(expr.args[0]).replace(" ", "")
            if len(ops) == 2 and "->" in eq and eq.split("->")[0].count(",") == 1:
                return {"form": "einsum", "q": ops[0], "kt": ops[1], "node": expr, "eq": eq}
        return None

    def leads_to_product(self, expr: ast.AST, loc: tuple[list, int], depth: int = 0) -> bool:
        """Does ``expr`` come from a tensor product (through names, ops and calls)?"""
        if depth > 25:
            return False
        if self.score_product(expr) is not None:
            return True
        if isinstance(expr, ast.Name):
            found = self.reaching_value(expr.id, loc)
            return found is not None and self.leads_to_product(found[0], found[1], depth + 1)
        if isinstance(expr, ast.BinOp):
            return self.leads_to_product(expr.left, loc, depth + 1) or self.leads_to_product(expr.right, loc, depth + 1)
        if isinstance(expr, ast.Call):
            if isinstance(expr.func, ast.Attribute) and self.f.canon(expr.func).split(".")[0] != "torch" and \
                    not dotted(expr.func).startswith("self."):
                if self.leads_to_product(expr.func.value, loc, depth + 1):
                    return True
            return any(self.leads_to_product(a, loc, depth + 1) for a in expr.args[:3])
        if isinstance(expr, ast.Subscript):
            return self.leads_to_product(expr.value, loc, depth + 1)
        return False

    def reaching_value(self, name: str, loc: tuple[list, int]) -> tuple[ast.AST, tuple[list, int]] | None:
        """The value of the latest plain ``name = value`` before ``loc``, looking into enclosing
        blocks (a quick look, for ``leads_to_product``; ``reach`` is the careful walk)."""
        block, i = loc
        while True:
            for j in range(i - 1, -1, -1):
                st = block[j]
                if assigned_name(st) == name:
                    return st.value, (block, j)
                if isinstance(st, ast.Assign) and any(isinstance(t, ast.Tuple) and any(
                        isinstance(e, ast.Name) and e.id == name for e in t.elts) for t in st.targets):
                    return None
                if isinstance(st, ast.If) and name in self.f.stored(st):
                    for branch in (st.body, st.orelse):
                        for k in range(len(branch) - 1, -1, -1):
                            if assigned_name(branch[k]) == name:
                                return branch[k].value, (branch, k)
            up = self.parent.get(id(block))
            if up is None:
                return None
            block, i = up[0], up[1]

    # --- backward: the scores
    def back(self, expr: ast.AST, loc: tuple[list, int], ops: list[Op], chain: "ChainState",
             stop: list | None = None, target: str | None = None) -> dict | str:
        """Walk from ``expr`` (evaluated at statement ``loc``) back to the score product,
        collecting ``ops`` (last first). With ``stop``/``target``: inside a branch, end with
        'OUTER' when ``target`` is read as it was before the branch. Raises ``Refused``."""
        cond = chain.cond
        while True:
            if isinstance(expr, ast.Name):
                if stop is not None and expr.id == target:
                    found = self.reach(expr.id, loc, ops, chain, stop)
                    if found == "OUTER":
                        return "OUTER"
                else:
                    found = self.reach(expr.id, loc, ops, chain, stop)
                if found == "OUTER":
                    return "OUTER"
                expr, loc = found
                chain.names.add(getattr(loc[0][loc[1]].targets[0], "id", ""))
                chain.add_stmt(loc)
                continue
            cast = self.cast_of(expr)
            if cast is not None:
                ops.append(Op(cast[0], (), expr, cond))
                expr = cast[1]
                continue
            if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Div):
                if self.leads_to_product(expr.right, loc):
                    raise Refused(f"the scores are divided by another product (`{self.code(expr)}`, line "
                                  f"{self.line(expr)})")
                ops.append(Op("div", (expr.right,), expr, cond))
                expr = expr.left
                continue
            if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Sub):
                mulmask = self.gpt2_mask(expr, loc)
                if mulmask is not None:
                    ops.append(Op("mulmask", mulmask[1:], expr, cond))
                    expr = mulmask[0]
                    continue
                if self.leads_to_product(expr.right, loc) and not self.leads_to_product(expr.left, loc):
                    raise Refused(f"the scores are subtracted from something (`{self.code(expr)}`, line "
                                  f"{self.line(expr)})")
                ops.append(Op("sub", (expr.right,), expr, cond))
                expr = expr.left
                continue
            if isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Mult, ast.Add)):
                left, right = self.leads_to_product(expr.left, loc), self.leads_to_product(expr.right, loc)
                score, other = (expr.right, expr.left) if right and not left else (expr.left, expr.right)
                if left and right and isinstance(expr.op, ast.Mult):
                    raise Refused(f"the scores are multiplied by another product (`{self.code(expr)}`, line "
                                  f"{self.line(expr)})")
                ops.append(Op("mul" if isinstance(expr.op, ast.Mult) else "add", (other,), expr, cond))
                if left and right:
                    chain.query_bias = chain.query_bias or self.code(other)
                expr = score
                continue
            if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and \
                    expr.func.attr in ("masked_fill", "masked_fill_"):
                mask, fill = kwarg(expr, "mask", 0), kwarg(expr, "value", 1)
                if mask is None or fill is None:
                    raise Refused(f"masked_fill without a mask and a value (line {self.line(expr)})")
                ops.append(Op("masked_fill", (mask, fill), expr, cond))
                expr = expr.func.value
                continue
            if isinstance(expr, ast.Call) and self.f.canon(expr.func) == "torch.where" and len(expr.args) == 3:
                m, a, b = expr.args
                keep_true = self.leads_to_product(a, loc)
                ops.append(Op("where", (m, b if keep_true else a, keep_true), expr, cond))
                expr = a if keep_true else b
                continue
            if isinstance(expr, (ast.Attribute, ast.Call)):
                shape = self.shape_of(expr)
                if shape is not None:
                    ops.append(Op("shape", (), expr, cond))
                    expr = shape[0]
                    continue
            product = self.product_at(expr, loc)
            if product is not None:
                return product
            if isinstance(expr, ast.Call):
                attr = self.f.attr_type(expr.func)
                if attr in ("Linear", "Conv1d", "Conv2d", "LazyLinear"):
                    raise Refused(f"talking heads: the attention scores are mixed across heads by the {attr} "
                                  f"`{self.code(expr)}` (line {self.line(expr)}) before the softmax; SDPA computes "
                                  "each head on its own")
                arg = next((a for a in expr.args if self.leads_to_product(a, loc)), None)
                if arg is not None and self.f.canon(expr.func).split(".")[0] != "torch":
                    # a helper: maybe_add_mask(attn, mask), add_decomposed_rel_pos(attn, q, ...)
                    others = [a for a in expr.args if a is not arg] + [k.value for k in expr.keywords]
                    names = {n.id for o in others for n in ast.walk(o) if isinstance(n, ast.Name)}
                    if chain.q_names & names:
                        chain.query_bias = chain.query_bias or self.code(expr)
                    ops.append(Op("call", (expr.func,), expr, cond))
                    expr = arg
                    continue
            raise Refused(f"the scores go through `{self.code(expr)}` (line {self.line(expr)}), which is not a "
                          "scale, an added bias or a mask")

    def product_at(self, expr: ast.AST, loc: tuple[list, int]) -> dict | None:
        """``expr`` as the query-key score product (``score_product``) with its ``loc``, or None.
        Raises ``Refused`` for a product of scores with scores (talking heads)."""
        product = self.score_product(expr)
        if product is None:
            return None
        for side in ("q", "kt"):
            if self.leads_to_product(product[side], loc):
                other = product["kt" if side == "q" else "q"]
                raise Refused(f"talking heads: the attention scores are mixed across heads by "
                              f"`{self.code(expr)}` (line {self.line(expr)}) before the softmax, with "
                              f"{self.code(other, 40)}; SDPA computes each head on its own")
        product["loc"] = loc
        return product

    def gpt2_mask(self, expr: ast.BinOp, loc) -> tuple | None:
        """``w * b - C * (1 - b)`` (GPT-2's TF-style mask, C >= 1e4): (w, b, C)."""
        left, right = expr.left, expr.right
        if not (isinstance(left, ast.BinOp) and isinstance(left.op, ast.Mult) and isinstance(right, ast.BinOp)
                and isinstance(right.op, ast.Mult)):
            return None
        for big, one_minus in ((right.left, right.right), (right.right, right.left)):
            c = const(big)
            if isinstance(c, (int, float)) and c >= 1e4 and isinstance(one_minus, ast.BinOp) and \
                    isinstance(one_minus.op, ast.Sub) and const(one_minus.left) in (1, 1.0):
                b = ast.unparse(one_minus.right)
                for w, m in ((left.left, left.right), (left.right, left.left)):
                    if ast.unparse(m) == b and self.leads_to_product(w, loc):
                        return w, m, big
        return None

    def reach(self, name: str, loc: tuple[list, int], ops: list[Op], chain: "ChainState",
              stop: list | None = None):
        """Walk back from statement ``loc`` to the plain assignment of ``name``, collecting what
        is done to it on the way (in-place updates, updates under an ``if``). Returns (value,
        (block, index)), or 'OUTER' when the walk leaves ``stop`` (a branch) first."""
        block, i = loc
        while True:
            for j in range(i - 1, -1, -1):
                st = block[j]
                if assigned_name(st) == name:
                    return st.value, (block, j)
                inplace = self.inplace_op(st, name)
                if inplace is not None:
                    inplace.cond = chain.cond
                    ops.append(inplace)
                    chain.add_stmt((block, j))
                    chain.inplace.append((block, j, name))
                    continue
                if isinstance(st, ast.If) and name in self.updated(st):
                    self.branch_ops(st, name, ops, chain)
                    chain.add_stmt((block, j))
                    continue
                if name in self.f.stored(st):
                    raise Refused(f"'{name}' (the scores) is set at line {st.lineno} by `{self.code(st)}`, "
                                  "which is not a plain assignment")
            if stop is not None and block is stop:
                return "OUTER"
            up = self.parent.get(id(block))
            if up is None:
                raise Refused(f"'{name}' is not assigned before line {loc[0][loc[1]].lineno} in this function")
            outer, index, owner, _ = up
            if isinstance(owner, (ast.For, ast.While, ast.AsyncFor)):
                raise Refused(f"the scores are built inside the loop at line {owner.lineno}")
            block, i = outer, index

    def guardable(self, st: ast.If) -> bool:
        """Can the test of ``st`` be evaluated at the top of the function with the same result?
        Its names must be parameters (or ``self``) that nothing assigns before it."""
        args = self.f.fn.args
        params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
        names = {n.id for n in ast.walk(st.test) if isinstance(n, ast.Name)}
        if not names or not names <= params:
            return False
        for node in ast.walk(self.f.fn):
            if isinstance(node, ast.stmt) and getattr(node, "lineno", 0) < st.lineno and \
                    names & self.f.stored(node) and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return False
        return not any(isinstance(n, ast.Call) for n in ast.walk(st.test))

    def updated(self, st: ast.stmt) -> set[str]:
        """Names ``st`` (and the statements in it) assign or change in place (``x.masked_fill_``)."""
        out = set(self.f.stored(st))
        for node in ast.walk(st):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_") \
                    and not node.func.attr.startswith("_") and isinstance(node.func.value, ast.Name):
                out.add(node.func.value.id)
        return out

    def inplace_op(self, st: ast.stmt, name: str) -> Op | None:
        """An in-place update of ``name``: name.masked_fill_(M, v) / mul_ / div_ / add_ / sub_,
        name op= x."""
        if isinstance(st, ast.AugAssign) and isinstance(st.target, ast.Name) and st.target.id == name:
            kind = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div"}.get(type(st.op))
            if kind is None:
                raise Refused(f"'{name}' is updated with `{self.code(st)}` (line {st.lineno})")
            return Op(kind, (st.value,), st, stmt=st)
        if isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) and isinstance(st.value.func, ast.Attribute) \
                and dotted(st.value.func.value) == name:
            call = st.value
            attr = call.func.attr
            if attr == "masked_fill_":
                return Op("masked_fill", (kwarg(call, "mask", 0), kwarg(call, "value", 1)), st, stmt=st)
            if attr in ("mul_", "div_", "add_", "sub_") and call.args:
                return Op(attr[:-1], (call.args[0],), st, stmt=st)
            if attr.endswith("_"):
                raise Refused(f"'{name}' (the scores) is changed in place by `{self.code(st)}` (line {st.lineno})")
        return None

    def branch_ops(self, st: ast.If, name: str, ops: list[Op], chain: "ChainState") -> None:
        """Updates of ``name`` inside ``if T: ... [else: ...]``: each branch must take the scores
        as they were before the ``if`` through allowed operations; recorded under T / not T."""
        test = ast.unparse(st.test)
        for branch, cond in ((st.body, test), (st.orelse, f"not ({test})")):
            if not branch or name not in {n for s in branch for n in self.updated(s)}:
                continue
            outer_cond = chain.cond
            chain.cond = cond if outer_cond is None else f"({outer_cond}) and ({cond})"
            branch_ops: list[Op] = []
            try:
                found = self.reach(name, (branch, len(branch)), branch_ops, chain, stop=branch)
                if found != "OUTER":
                    value, loc = found
                    chain.add_stmt(loc)
                    if self.back(value, loc, branch_ops, chain, stop=branch, target=name) != "OUTER":
                        raise Refused(f"'{name}' (the scores) is replaced by another product in the branch at line "
                                      f"{branch[0].lineno}")
            except Refused as exc:
                chain.cond = outer_cond
                if outer_cond is not None or not self.guardable(st):
                    raise
                # SDPA cannot express this branch; it only runs when its test holds, and the test reads
                # nothing the function changes before it: the eager path is kept for those calls
                chain.guards.append((st, cond, str(exc)))
                continue
            chain.cond = outer_cond
            ops.extend(branch_ops)

    # --- forward: the weights
    def strip_post(self, node: ast.AST) -> tuple[ast.AST, list, list]:
        """``node`` without the casts, dropout and reshapes applied to the weights: (the core,
        the permutations in the order they are applied, the dropouts as (description, node))."""
        perms, drops = [], []
        while True:
            cast = self.cast_of(node)
            if cast is not None:
                node = cast[1]
                continue
            drop = self.dropout_of(node)
            if drop is not None:
                drops.append((drop[0], node))
                node = drop[1]
                continue
            shape = self.shape_of(node)
            if shape is not None:
                perms.append(shape[1])
                node = shape[0]
                continue
            return node, perms[::-1], drops

    def value_product(self, st: ast.stmt, is_p, chain: "ChainState") -> dict | None:
        """The product in ``st`` that has the weights as one operand (``is_p``)."""
        for node in ast.walk(st):
            prod = self.score_product(node)
            if prod is None:
                continue
            for first, operand, other in ((True, prod["q"], prod["kt"]), (False, prod["kt"], prod["q"])):
                core, perms, drops = self.strip_post(operand)
                if is_p(core):
                    chain.p_perm.extend(perms)
                    for desc, dnode in drops:
                        chain.set_dropout(desc, None, dnode)
                    return {"vform": prod["form"], "v": other, "node": node, "eq": prod.get("eq"), "p_first": first,
                            "p_operand": operand}
        return None

    def forward(self, softmax: ast.Call, st: ast.stmt, block: list, index: int, chain: "ChainState") -> dict:
        """From the softmax to the value product. Raises ``Refused``."""
        # the softmax inside its statement: wrapped by casts / dropout / transposes, then assigned or multiplied
        cur = softmax
        while True:
            par = self.expr_parent.get(id(cur))
            if par is None or par is st:
                break
            if isinstance(par, ast.Attribute) and par.value is cur:  # x.float() / x.type_as(y) / x.mT
                call = self.expr_parent.get(id(par))
                if isinstance(call, ast.Call) and call.func is par:
                    par = call
            if self.cast_of(par) is not None and getattr(par.func, "value", None) is cur:
                cur = par
                continue
            drop = self.dropout_of(par)
            if drop is not None and drop[1] is cur:
                chain.set_dropout(drop[0], None, par)
                cur = par
                continue
            shape = self.shape_of(par)
            if shape is not None and shape[0] is cur:
                chain.p_perm.append(shape[1])
                cur = par
                continue
            if isinstance(par, (ast.Tuple, ast.List)) and self.score_product(self.expr_parent.get(id(par))) is not None:
                par = self.expr_parent[id(par)]  # torch.einsum(eq, (p, v))
            prod = self.score_product(par)
            if prod is not None:
                value = self.value_product(st, lambda n: n is softmax, chain)
                if value is None:
                    raise Refused(f"the attention weights enter `{self.code(par)}` (line {self.line(par)}), not as the "
                                  "weights of a value product")
                value.update(stmt=(block, index), prob=None)
                return value
            raise Refused(f"the attention weights are used in `{self.code(par)}` (line {self.line(par)}): "
                          + ("they are blended with something else, which SDPA cannot express"
                             if isinstance(par, ast.BinOp) else "not as the weights of a value product"))
        if not (assigned_name(st) and st.value is cur):
            raise Refused(f"the softmax result at line {softmax.lineno} is not assigned to a name "
                          f"(`{self.code(st)}`)")
        name = st.targets[0].id
        chain.weight_names.add(name)
        chain.prob_name = chain.prob_name or name
        return self.follow(name, block, index + 1, chain)

    def follow(self, name: str, block: list, start: int, chain: "ChainState") -> dict:
        """Follow the weights held in ``name`` from ``block[start]`` on to the value product."""
        i = start
        while True:
            while i < len(block):
                st = block[i]
                reads = [n for n in ast.walk(st) if isinstance(n, ast.Name) and n.id == name
                         and isinstance(n.ctx, ast.Load)]
                if not reads:
                    if name in self.f.stored(st):
                        raise Refused(f"the attention weights '{name}' are overwritten at line {st.lineno} before any "
                                      "value product")
                    i += 1
                    continue
                if assigned_name(st):
                    core, perms, drops = self.strip_post(st.value)
                    if isinstance(core, ast.Name) and core.id == name:
                        chain.p_perm.extend(perms)
                        for desc, dnode in drops:
                            chain.set_dropout(desc, None, dnode)
                        chain.add_stmt((block, i))
                        chain.post_stmts.append((block, i))
                        name = st.targets[0].id
                        chain.weight_names.add(name)
                        i += 1
                        continue
                if isinstance(st, ast.If) and not st.orelse and len(st.body) == 1 and \
                        isinstance(st.body[0], ast.Assign) and name not in {n.id for n in ast.walk(st.test)
                                                                             if isinstance(n, ast.Name)}:
                    inner = st.body[0]
                    drop = self.dropout_of(inner.value)
                    if drop is not None and isinstance(drop[1], ast.Name) and drop[1].id == name and \
                            dotted(inner.targets[0]) == name:  # `if dropout_p: attn = F.dropout(attn, ...)`
                        chain.set_dropout(drop[0], ast.unparse(st.test), inner.value)
                        chain.add_stmt((block, i))
                        chain.add_stmt((st.body, 0))
                        i += 1
                        continue
                if isinstance(st, (ast.If, ast.For, ast.While, ast.With, ast.Try)):
                    raise Refused(f"the attention weights '{name}' are used inside the block at line {st.lineno} "
                                  f"(`{self.code(st, 50)}`), not by one value product")
                value = self.value_product(st, lambda n: isinstance(n, ast.Name) and n.id == name, chain)
                if value is None:
                    where = reads[0]
                    par = self.expr_parent.get(id(where))
                    what = self.code(par if par is not None and par is not st else st)
                    raise Refused(f"the attention weights '{name}' are used at line {where.lineno} in `{what}`, not "
                                  "as the weights of a value product")
                value.update(stmt=(block, i), prob=name)
                return value
            up = self.parent.get(id(block))
            if up is None:
                raise Refused(f"no value product (P @ V) uses the attention weights '{name}' of the softmax at line "
                              f"{chain.softmax_line}")
            outer, index, owner, branch = up
            if isinstance(owner, ast.If):
                other = owner.orelse if branch == "body" else owner.body
                sib = self.sibling_softmax(other, name)
                if sib is None and self.guardable(owner):
                    # the other branch takes its own, inexpressible path (Perceiver's inverted attention,
                    # softmax over the queries): it keeps the original code, decided by the test
                    test = ast.unparse(owner.test)
                    cond = test if branch == "orelse" else f"not ({test})"
                    last = self.last_store(other, name)
                    chain.guards.append((owner, cond, f"the weights '{name}' come from "
                                         f"`{self.code(last) if last else 'nothing'}` in that branch"))
                    block, i = outer, index + 1
                    continue
                if sib is None:
                    what = f"set by `{self.code(self.last_store(other, name))}`" if self.last_store(other, name) \
                        else "not set"
                    raise Refused(f"the attention weights '{name}' come from the softmax at line "
                                  f"{chain.softmax_line} in one branch of the `if` at line {owner.lineno} and are "
                                  f"{what} in the other")
                chain.siblings.append(sib)
            elif isinstance(owner, (ast.For, ast.While)):
                raise Refused(f"the attention weights '{name}' leave the loop at line {owner.lineno}")
            block, i = outer, index + 1

    def last_store(self, block: list, name: str) -> ast.stmt | None:
        for st in reversed(block):
            if name in self.f.stored(st):
                return st
        return None

    def sibling_softmax(self, block: list, name: str) -> ast.Call | None:
        """The softmax whose result the other branch of an ``if`` stores in ``name`` last."""
        st = self.last_store(block, name)
        if isinstance(st, ast.Assign) and len(st.targets) == 1 and dotted(st.targets[0]) == name:
            node = st.value
            while True:
                cast = self.cast_of(node)
                if cast is None:
                    break
                node = cast[1]
            if self.is_softmax(node) is not None:
                return node
        return None

    # --- the whole chain
    def build(self, block, index, st, softmax_call, soft) -> "Chain | Site | None":
        """The chain around one softmax: None when it is not attention (no product behind it), a
        refused ``Site`` when it is attention that cannot be read, else a ``Chain``."""
        src, dim, upcast = soft
        if not self.leads_to_product(src, (block, index)):
            return None
        state = ChainState(self)
        state.softmax_line = softmax_call.lineno
        state.q_names = self.query_names(src, (block, index))
        site = Site(self.f.file, self.f.qualname, softmax_call.lineno, st.end_lineno, "manual", "",
                    softmax_line=softmax_call.lineno)
        ops: list[Op] = []
        try:
            product = self.back(src, (block, index), ops, state)
        except Refused as exc:
            return refuse(site, str(exc))
        ploc = product["loc"]
        site.form = product["form"]
        site.line = ploc[0][ploc[1]].lineno
        ops.reverse()
        site.softmax_upcast = upcast or any(op.kind == "upcast" for op in ops)
        dim_value = const(dim) if dim is not None else Ellipsis
        if dim is None:
            return refuse(site, f"a softmax without an explicit dim (line {softmax_call.lineno})")
        if not isinstance(dim_value, int):
            return refuse(site, f"a softmax over dim {self.code(dim)} (line {softmax_call.lineno}), not a constant")
        rank = next((r for ln, r in self.f.hints.items() if isinstance(ln, int) and
                     softmax_call.lineno <= ln <= softmax_call.end_lineno), None)  # the live run's rank
        if dim_value != -1:
            site.needs["softmax_dim"] = dim_value
        state.elide.append(softmax_call)
        try:
            value = self.forward(softmax_call, st, block, index, state)
        except Refused as exc:
            return refuse(site, str(exc))
        vblock, vindex = value["stmt"]
        site.end_line = vblock[vindex].end_lineno
        value["dropout"] = state.dropout
        value["dropout_cond"] = state.dropout_cond
        value["p_perm"] = [p for p in state.p_perm if p != []]
        value["prob_name"] = state.prob_name
        chain = Chain(site, vblock, [], product, value, ops, [softmax_call] + state.siblings)
        chain.rank = rank
        chain.names = set(state.names) | set(state.weight_names)
        chain.weight_names = set(state.weight_names)
        chain.elide = state.elide
        chain.inplace = state.inplace
        chain.query_bias = state.query_bias
        chain.guards = state.guards
        for _, cond, why in state.guards:
            site.notes.append(f"when {cond}, the original code runs (eager): {why}")
        all_stmts = list(state.stmts) + [(block, index), (vblock, vindex), ploc]
        chain.all_stmts = all_stmts
        chain.stmts = sorted({i for b, i in all_stmts if b is vblock})
        chain.same_block = not state.siblings and all(self.within(b, vblock, chain.stmts) for b, _ in all_stmts)
        if chain.stmts[-1] != vindex:
            chain.same_block = False
        return chain

    def within(self, block: list, top: list, indices: list[int]) -> bool:
        """Is ``block`` ``top``, or a branch of an ``if`` at one of ``indices`` of ``top``?"""
        while block is not top:
            up = self.parent.get(id(block))
            if up is None:
                return False
            outer, index, owner, _ = up
            if outer is top:
                return isinstance(owner, ast.If) and index in indices
            block = outer
        return True

    def query_names(self, expr: ast.AST, loc) -> set[str]:
        """Names that hold the query of the product behind ``expr`` (to tell a bias computed
        from the query)."""
        names: set[str] = set()
        try:
            scratch = ChainState(self)
            product = self.back(expr, loc, [], scratch)
        except (Refused, RecursionError):
            return names
        q = product["q"]
        for n in ast.walk(q):
            if isinstance(n, ast.Name):
                names.add(n.id)
        return names

    # --- other reads of the chain's names
    def escaping(self, chain: Chain) -> None:
        """Reads of the scores and weights outside the chain: returned (directly or via ``x =
        x.detach()``; the swap returns None, ``chain.returned``), or the scores' shape, dtype or
        device, or a helper's (``chain.extra_reads``, kept by the replay form). Raises
        ``Refused`` for any other read."""
        vb, vi = chain.value["stmt"]
        chain_nodes = {id(n) for b, i in chain.all_stmts if b[i] is not vb[vi] for n in ast.walk(b[i])}
        # in the value product's statement only the product itself is the chain's (`return p @ v, p`)
        chain_nodes |= {id(n) for n in ast.walk(chain.value["node"])}
        # the branches kept eager (``chain.guards``) run on the real scores: what they read is theirs
        chain_nodes |= {id(n) for st, _, _ in chain.guards for n in ast.walk(st)}
        value_block, value_index = chain.value["stmt"]
        product_stmt = chain.product["loc"][0][chain.product["loc"][1]]
        for node in ast.walk(self.f.fn):
            if not (isinstance(node, ast.Name) and node.id in chain.names and isinstance(node.ctx, ast.Load)) \
                    or id(node) in chain_nodes:
                continue
            if node.lineno < product_stmt.lineno:
                continue  # an earlier, unrelated use of the same name
            st = self.stmt_containing(node)
            if self.returned_flow(node, st, chain):
                continue
            par = self.expr_parent.get(id(node))
            after = node.lineno > chain.site.end_line
            scores = node.lineno < chain.site.softmax_line
            if not after and isinstance(par, ast.Attribute) and par.attr in META_ATTRS:
                continue
            if scores and isinstance(par, ast.Call) and node in par.args:
                chain.extra_reads.append(node)
                continue
            if after and self.overwritten_before(node, chain):
                continue
            raise Refused(f"'{node.id}' (the {'scores' if scores else 'attention weights'}) "
                          f"is also used at line {node.lineno} in `{self.code(st)}`: the fused kernel never forms it")

    def stmt_containing(self, node: ast.AST) -> ast.stmt:
        cur = node
        while not isinstance(cur, ast.stmt):
            cur = self.expr_parent[id(cur)]
        return cur

    def overwritten_before(self, node: ast.Name, chain: Chain) -> bool:
        """Is ``node`` a read of a later, unrelated value of the name (reassigned after the value
        product and before this read)?"""
        vline = chain.site.end_line
        for st in ast.walk(self.f.fn):
            if isinstance(st, ast.Assign) and vline < st.lineno < node.lineno and any(
                    isinstance(t, ast.Name) and t.id == node.id for t in st.targets):
                value_names = {n.id for n in ast.walk(st.value) if isinstance(n, ast.Name)}
                if node.id not in value_names:
                    return True
        return False

    def returned_flow(self, node: ast.Name, st: ast.stmt, chain: Chain) -> bool:
        """``return ..., name`` or ``name = name.detach()`` / a cast on the way to such a return."""
        if isinstance(st, ast.Return) and st.value is not None:
            elts = list(st.value.elts) if isinstance(st.value, ast.Tuple) else [st.value]
            if any(e is node for e in elts) and st.value is not node:
                chain.returned.append((node, st))
                return True
            return False
        if assigned_name(st) == node.id and st.lineno > chain.site.end_line:
            core = st.value
            while isinstance(core, ast.Call) and isinstance(core.func, ast.Attribute) and \
                    core.func.attr in CASTS | {"detach", "clone", "cpu"}:
                core = core.func.value
            if core is node:
                loc = self.block_of(st)
                if loc is not None:
                    chain.returned_stmts.append(loc)
                return True
        return False


class ChainState:
    """What one walk collects (statements, names, dropout, conditions)."""

    def __init__(self, matcher: ChainMatcher):
        self.matcher = matcher
        self.stmts: list[tuple[list, int]] = []
        self._seen: set[tuple[int, int]] = set()
        self.names: set[str] = set()
        self.weight_names: set[str] = set()
        self.cond: str | None = None
        self.dropout = None
        self.dropout_cond: str | None = None
        self.p_perm: list = []
        self.elide: list[ast.AST] = []
        self.inplace: list = []
        self.siblings: list[ast.Call] = []
        self.post_stmts: list = []
        self.prob_name: str | None = None
        self.softmax_line = 0
        self.query_bias = ""
        self.q_names: set[str] = set()
        self.guards: list = []

    def add_stmt(self, loc: tuple[list, int]) -> None:
        key = (id(loc[0]), loc[1])
        if key not in self._seen:
            self._seen.add(key)
            self.stmts.append(loc)

    def set_dropout(self, dropout: tuple, cond: str | None, node: ast.AST) -> None:
        if self.dropout is not None and node not in self.elide:
            raise Refused(f"dropout applied twice to the attention weights (line {node.lineno})")
        self.dropout, self.dropout_cond = dropout, cond
        if node not in self.elide:
            self.elide.append(node)
