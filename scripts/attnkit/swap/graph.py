"""Hand-written attention found in a graph captured from the running model, by data flow,
and rewritten to one fused call per site: the run-time path for the sites the source
matcher (``swap.scan``) refuses, and the only one to flex_attention.

**Capture** (``Capture``): ``torch.compile(forward, backend=ours, dynamic=False)``; each
graph piece Dynamo hands over (helpers inlined, branches resolved, einsum equations
constant) is rewritten and returned to run eagerly, with no inductor.

**Match by data flow** (``find_sites``): in-place ops on the graph's own tensors become
data flow (``functionalize``); a site is a softmax over one axis whose input is a
contraction Q·Kᵀ through scalings, added terms, masks, casts and reshapes, and whose
weights reach ·V (a second contraction over the softmax axis) through casts and dropout.
Index letters give the [B, H, S, D] layout. What SDPA cannot take but is elementwise on
the scores makes the site flex-only (``GraphSite.targets``); anything else refuses it,
naming the construct and its source line. An op is never dropped unexamined.

**Rewrite** (``rewrite``): the value product's readers get the call's output; the chain's
nodes go. The per-site proof belongs to ``measure.verify``. ARCHITECTURE.md ("graph")
describes the targets, score_mod replay, tables of diagonals, sinks and the value-product
push.
"""

from __future__ import annotations

import copy
import math
import operator
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx

#: what a site can be rewritten to: one SDPA call, or one flex_attention call whose score_mod
#: replays the ops between Q·Kᵀ and the softmax element by element
TARGETS = ("sdpa", "flex_attention")
#: a fill at or below this value is a mask: exp(-1e4 - max) is 0 in every float dtype
LARGE_NEGATIVE = -1e4

_SOFTMAX_FUNCS = {torch.softmax, F.softmax, torch.nn.functional.softmax, torch.special.softmax}
_MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.bmm}
_EINSUM_FUNCS = {torch.einsum, torch.functional.einsum}
_CAST_METHODS = {"float", "half", "bfloat16", "double", "to", "type_as", "type", "contiguous", "clone", "detach"}
_INPLACE_FUNCS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                  operator.itruediv: operator.truediv}
#: ops whose output is a new tensor (never a view of an input): mutating one in place is local
_FRESH_FUNCS = {torch.matmul, operator.matmul, torch.bmm, torch.baddbmm, torch.einsum, torch.functional.einsum,
                torch.softmax, F.softmax, operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
                torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.masked_fill, torch.cat,
                torch.zeros, torch.ones, torch.full, torch.empty, torch.zeros_like, torch.ones_like,
                torch.full_like, torch._C._nn.linear, F.linear}
_FRESH_METHODS = {"add", "sub", "mul", "div", "masked_fill", "softmax", "matmul", "bmm", "baddbmm", "clone",
                  "neg", "where"}
_NONLINEAR = {"tanh", "exp", "sigmoid", "clamp", "clip", "pow", "abs", "relu", "log", "sqrt", "erf", "sin", "cos",
              "nan_to_num", "square", "gelu", "softplus", "hardtanh", "maximum", "minimum"}
#: methods that read only a tensor's dtype and device: the scores reaching one are not data flow
_NEW_METHODS = {"new_ones": torch.ones, "new_zeros": torch.zeros, "new_empty": torch.empty, "new_full": torch.full}
#: x.type_as(y), x.view_as(y) and the like read only y's dtype or shape: the method that takes it instead
_LIKE_METHODS = {"type_as": "to", "to": "to", "view_as": "view", "reshape_as": "reshape", "expand_as": "expand"}
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n(.*)')


class Refused(Exception):
    """The site cannot be SDPA; the message names the construct and its source line."""


class Returned(Refused):
    """The weights leave the captured graph: the module around it may drop them."""


@dataclass
class GraphSite:
    """One softmax of a captured graph piece and what the matcher made of it.

    ``key`` is (file, line) of the softmax call in user code (the innermost frame of its
    stack trace: a helper's own line when the softmax is in a helper); ``lines`` the source
    lines of the score product, the softmax and the value product."""

    file: str
    line: int
    function: str = ""
    swappable: bool = False
    reason: str = ""
    form: str = ""  # the score product: matmul | bmm | baddbmm | einsum '<equation>'
    layout: str = ""  # index letters: 'q [b h i d], k [b h j d], v [b h j e] -> [b h i e]'
    scale: float | None = None
    mask: str = "none"  # none | boolean | additive
    mask_terms: list[str] = field(default_factory=list)  # each term with its line
    dropout: float = 0.0
    softmax_upcast: bool = False
    lines: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    external_input: bool = False  # the softmax's input comes from outside this graph piece
    returned: bool = False  # the weights are an output of this graph piece (a caller may drop them)
    #: the backends the rewrite can call here (``TARGETS``), and for each other one why not
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    refused_for: dict[str, str] = field(default_factory=dict)
    score_mod: list[str] = field(default_factory=list)  # the elementwise functions of the scores, with lines

    def reason_for(self, target: str) -> str:
        """'' when the rewrite can call ``target`` here, else why not."""
        if not self.swappable:
            return self.reason
        return "" if target in self.targets else self.refused_for.get(
            target, f"the graph path rewrites to {' or '.join(self.targets)}, not {target}")

    @property
    def key(self) -> tuple[str, int]:
        return (self.file, self.line)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("external_input", "returned")}


# ----------------------------------------------------------------------------- node facts

def frame_of(node: fx.Node) -> tuple[str, int, str, str]:
    """(file, line, function, code) of the innermost user frame that issued ``node``."""
    found = _FRAME.findall(node.meta.get("stack_trace") or "")
    if not found:
        return ("?", 0, "?", "")
    file, line, fn, code = found[-1]
    return file, int(line), fn, code.strip()


def where(node: fx.Node) -> str:
    file, line, _, code = frame_of(node)
    return f"line {line} (`{code}`)" if code else f"line {line}"


def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", "") or ""
        name = getattr(node.target, "__name__", str(node.target))
        mod = {"torch._C._VariableFunctions": "torch", "torch.functional": "torch", "_operator": "operator",
               "torch.nn.functional": "F", "torch._C._nn": "F"}.get(mod, mod)
        return f"{mod}.{name}" if mod else name
    return node.op


def _base(node: fx.Node) -> str:
    """The op's plain name: 'mul' for operator.mul, torch.mul and Tensor.mul."""
    return str(node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target))


def _value(node: Any) -> Any:
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _rank(node: Any) -> int:
    v = _value(node)
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _is_softmax(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _SOFTMAX_FUNCS) or (
        node.op == "call_method" and node.target == "softmax")


def _is_contraction(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _MATMUL_FUNCS or node.target in _EINSUM_FUNCS or node.target is torch.baddbmm
    return node.op == "call_method" and node.target in ("matmul", "bmm", "baddbmm")


def _is_fresh(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _FRESH_FUNCS or getattr(node.target, "__module__", "") in ("torch", "torch.nn.functional") \
            and getattr(node.target, "__name__", "") in _NONLINEAR
    return node.op == "call_method" and (node.target in _FRESH_METHODS or node.target in _NONLINEAR)


# ----------------------------------------------------------------------------- in-place ops as data flow

def functionalize(graph: fx.Graph) -> int:
    """Turn in-place ops on tensors the graph made itself into out-of-place ones, and point
    every later reader of the mutated tensor at the new value. A mutation of a graph input,
    or of a tensor with a view taken before the mutation, is left as it is (the matcher then
    refuses a site that reads it). Returns the number of ops turned."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    fresh = {n for n in graph.nodes if _is_fresh(n)}
    turned = 0
    for node in list(graph.nodes):
        target = None
        if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
                and not node.target.startswith("_") and hasattr(torch.Tensor, node.target[:-1]):
            target = ("call_method", node.target[:-1])
        elif node.op == "call_function" and node.target in _INPLACE_FUNCS:
            target = ("call_function", _INPLACE_FUNCS[node.target])
        if target is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        mutated = node.args[0]
        if mutated not in fresh:
            continue
        earlier = [u for u in mutated.users if u is not node and order[u] < order[node] and mutated in _data_inputs(u)]
        if any(u not in fresh for u in earlier):  # an alias taken before the mutation sees it (m.view_as(x) is none)
            continue
        node.op, node.target = target
        fresh.add(node)
        later = [u for u in mutated.users if u is not node and order[u] > order[node]]
        for user in later:
            user.replace_input_with(mutated, node)
        turned += 1
    return turned


# ----------------------------------------------------------------------------- weights combined before ·V

_BATCH_LINEAR = {"view", "reshape", "getitem", "mul", "truediv", "div", "add", "sub", "neg", "float", "half",
                 "bfloat16", "to", "type_as", "contiguous", "clone"}


def push_value_products(gm: fx.GraphModule, example_inputs: list | None) -> list[str]:
    """Where softmax weights W reach the value product only through ops linear in W and
    acting on its batch axes alone (reshapes keeping the last two axes, batch indexing,
    scaling constant over them, sums and differences), as differential attention's
    ``w[:, :, 0] - λ * w[:, :, 1]``, rewrite ``L(W) @ V`` as ``L(W @ V')``: V' holds for
    each batch index of W the rows of V it meets (a one-hot passed through L on the
    captured values tells which). The softmax then reaches a value product directly: one
    site over all of W's maps, combined after ·V. Returns a note per rewrite."""
    notes = []
    if example_inputs is None:
        return notes
    for softmax in [n for n in gm.graph.nodes if _is_softmax(n)]:
        w = softmax
        while len(w.users) == 1 and _base(next(iter(w.users))) in _CAST_METHODS:
            w = next(iter(w.users))
        tail, todo, vprods = [], list(w.users), []
        while todo:
            n = todo.pop(0)
            if n in tail or n in vprods:
                continue
            if _is_contraction(n):
                vprods.append(n)
                continue
            if n.op not in ("call_function", "call_method") or _base(n) not in _BATCH_LINEAR:
                break
            tail.append(n)
            todo += list(n.users)
        else:
            if not any(_base(n) not in _CAST_METHODS | {"view", "reshape"} for n in tail) or len(vprods) != 1 or \
                    any(u not in tail and u not in vprods for n in tail for u in n.users):
                continue  # reshapes alone are _walk_forward's
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            note = _push(gm, w, sorted(tail, key=order.get), vprods[0], example_inputs)
            if note:
                notes.append(note)
    return notes


def _push(gm: fx.GraphModule, w: fx.Node, tail: list, vprod: fx.Node, example_inputs: list) -> str:
    """``push_value_products`` for one softmax; '' when a condition does not hold."""
    wv, out = _value(w), _value(vprod)
    if not (isinstance(wv, torch.Tensor) and isinstance(out, torch.Tensor)) or vprod.args[0] not in tail or \
            _base(vprod) not in ("matmul", "bmm") or len(vprod.args) != 2:
        return ""
    combined, v = vprod.args
    inside = set(tail) | {w}
    for n in tail:  # every op keeps the last two axes and is linear in W
        val, base = _value(n), _base(n)
        if not isinstance(val, torch.Tensor) or tuple(val.shape[-2:]) != tuple(wv.shape[-2:]):
            return ""
        ins = [a for a in n.all_input_nodes if a in inside]
        others = [a for a in list(n.args) + list(n.kwargs.values()) if a not in ins]
        if base in ("add", "sub") and len(ins) != 2 or base in ("mul", "truediv", "div") and len(ins) != 1:
            return ""
        if base in ("mul", "truediv", "div") and any(
                isinstance(o, fx.Node) and (_rank(o) >= 2 and tuple(_value(o).shape[-2:]) != (1, 1)) for o in others):
            return ""
        if base == "truediv" and n.args[0] not in ins:
            return ""
        if base == "getitem" and isinstance(n.args[1], tuple) and any(
                i is Ellipsis or isinstance(i, fx.Node) for i in n.args[1]):
            return ""
    values = _evaluate(gm, [a for n in tail for a in n.all_input_nodes if a not in inside] or [w], example_inputs)
    if values is None:
        return ""
    batch = int(math.prod(wv.shape[:-2]))
    out_batch = tuple(_value(combined).shape[:-2])

    def replay(x: torch.Tensor) -> torch.Tensor:
        env = dict(values)
        env[w] = x
        for n in tail:
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            if _base(n) in ("view", "reshape"):
                args = (args[0], *_last_free(args[1:], probe=True))
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method" else \
                n.target(*args, **kwargs)
        return env[combined]

    rows = []
    with torch.no_grad():
        for j in range(batch):  # which batch index of the combined weights does W's index j feed?
            one = torch.zeros(batch, dtype=torch.float64, device=wv.device)
            one[j] = 1.0
            got = replay(one.view(*wv.shape[:-2], 1, 1).to(wv.dtype if wv.is_floating_point() else torch.float32))
            got = got.expand(*out_batch, *got.shape[-2:]).reshape(-1)
            fed = torch.nonzero(got).reshape(-1)
            if len(fed) > 1:
                return ""
            rows.append(int(fed[0]) if len(fed) else 0)
    i = 0
    while hasattr(gm, f"_attnkit_value_rows_{i}"):  # one buffer per pushed site of this graph piece
        i += 1
    name = f"_attnkit_value_rows_{i}"
    gm.register_buffer(name, torch.tensor(rows, dtype=torch.long, device=_value(v).device))
    graph = gm.graph
    with graph.inserting_before(vprod):
        index = graph.get_attr(name)
        vs = graph.call_method("expand", (v, *out_batch, -1, -1))
        vs = graph.call_method("reshape", (vs, -1, *_value(v).shape[-2:]))
        vs = graph.call_function(operator.getitem, (vs, index))
        vs = graph.call_method("view", (vs, *wv.shape[:-2], *_value(v).shape[-2:]))
        vs.meta["example_value"] = torch.empty(*wv.shape[:-2], *_value(v).shape[-2:], dtype=_value(v).dtype,
                                               device="meta")
        prod = graph.call_function(torch.matmul, (w, vs))
        env = {w: prod}
        for n in tail:
            new = graph.node_copy(n, lambda a: env.get(a, a))
            if _base(n) in ("view", "reshape"):
                new.args = (new.args[0], *_last_free(new.args[1:]))
            env[n] = new
    for n in [prod] + [env[n] for n in tail]:
        n.meta["stack_trace"] = vprod.meta.get("stack_trace")
    prod.meta["example_value"] = torch.empty(*wv.shape[:-2], wv.shape[-2], _value(v).shape[-1], dtype=out.dtype,
                                             device="meta")
    vprod.replace_all_uses_with(env[combined])
    graph.erase_node(vprod)
    for n in reversed(tail):
        if not n.users:
            graph.erase_node(n)
    gm.recompile()
    return (f"the weights of the softmax at {where(w)} are combined across {batch // max(1, math.prod(out_batch))} "
            f"maps before the value product at {where(vprod)} (as differential attention does): the value product "
            "is taken per map and the combination applied after it, so each map is one fused call")


def _last_free(shape: tuple, probe: bool = False) -> tuple:
    """A view's shape with its last size left to be inferred (-1): S_k becomes D_v; with
    ``probe`` the query size is 1 as well (a one-hot probe is [batch..., 1, 1])."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return (_last_free(tuple(shape[0]), probe),)
    return tuple(shape[:-2]) + ((1,) if probe else tuple(shape[-2:-1])) + (-1,)


# ----------------------------------------------------------------------------- contractions as index letters

@dataclass
class Contraction:
    """A contraction as einsum letters: out[o] = sum over the shared letters of a[a] * b[b],
    times ``alpha``, plus ``beta * bias`` (baddbmm)."""

    node: fx.Node
    a: fx.Node
    b: fx.Node
    a_idx: str
    b_idx: str
    out_idx: str
    form: str
    alpha: float = 1.0
    bias: fx.Node | None = None
    beta: float = 0.0


def contraction(node: fx.Node) -> Contraction:
    """``node`` (matmul, @, bmm, baddbmm, einsum) as index letters; raises ``Refused``."""
    letters = "abcfghklmnopqrtuvwxyz"
    if node.op == "call_function" and node.target in _EINSUM_FUNCS or (
            node.op == "call_method" and node.target == "einsum"):
        eq = node.args[0]
        ops = node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = tuple(ops[0])
        if not isinstance(eq, str) or len(ops) != 2 or "->" not in eq:
            raise Refused(f"torch.einsum({eq!r}) at {where(node)}: not a two-operand equation with explicit "
                          "output indices")
        eq = eq.replace(" ", "")
        ins, out = eq.split("->")
        a_idx, b_idx = ins.split(",")
        if not all(isinstance(o, fx.Node) for o in ops):
            raise Refused(f"torch.einsum at {where(node)} takes a constant operand")
        if "..." in eq:  # the ellipsis as letters of their own, aligned from the right as broadcasting does
            spans = [_rank(o) - len(i.replace("...", "")) for o, i in zip(ops, (a_idx, b_idx))]
            free = [c for c in letters if c not in eq][:max(spans + [0])]
            if min(spans) < 0 or len(free) < max(spans):
                raise Refused(f"torch.einsum({eq!r}) at {where(node)}: an ellipsis of unknown rank")
            a_idx, b_idx = (i.replace("...", "".join(free[len(free) - n:])) for i, n in zip((a_idx, b_idx), spans))
            out = out.replace("...", "".join(free))
            eq = f"{a_idx},{b_idx}->{out}"
        return Contraction(node, ops[0], ops[1], a_idx, b_idx, out, f"einsum '{eq}'")
    if node.target in (torch.baddbmm, "baddbmm"):
        bias = _arg(node, 0, "input")
        a, b = _arg(node, 1, "batch1"), _arg(node, 2, "batch2")
        beta, alpha = node.kwargs.get("beta", 1.0), node.kwargs.get("alpha", 1.0)
        if not isinstance(beta, (int, float)) or not isinstance(alpha, (int, float)):
            raise Refused(f"torch.baddbmm at {where(node)} with a tensor beta or alpha")
        return Contraction(node, a, b, "aid", "adj", "aij", "baddbmm", float(alpha),
                           bias if beta else None, float(beta))
    a, b = node.args[0], node.args[1]
    ra, rb = _rank(a), _rank(b)
    if ra < 2 or ra != rb:
        raise Refused(f"{op_name(node)} at {where(node)} of rank-{ra} and rank-{rb} tensors: not a batched Q·Kᵀ")
    batch = letters[:ra - 2]
    form = "bmm" if node.target in (torch.bmm, "bmm") else "matmul"
    return Contraction(node, a, b, batch + "id", batch + "dj", batch + "ij", form)


# ----------------------------------------------------------------------------- the matcher

@dataclass
class _Term:
    """One part of the mask, in the score layout it was added in."""

    kind: str  # add | fill
    node: Any  # the added tensor, or the fill's condition
    layout: str  # the scores' letters when it was added
    coef: float = 1.0  # the scalings applied after it
    fill: Any = None  # the fill value: a number or a node
    keep_where_true: bool = False  # torch.where(cond, scores, fill): the fill goes where cond is False
    text: str = ""
    #: reshapes of the scores' batch axes before it was added, latest last: (letters after,
    #: batch shape after, letters before, batch shape before), undone to reach the product's layout
    views: list = field(default_factory=list)
    #: flex_attention only: the term as a function of the score's indices (``_IndexProgram``),
    #: computed per score instead of as a [.., S_q, S_k] tensor
    lazy: Any = None
    tables: dict = field(default_factory=dict)  # a lazy term of positions alone: its table per shape


@dataclass
class _Plan:
    """What the rewrite needs for one site."""

    site: GraphSite
    q: fx.Node
    k: fx.Node
    v: fx.Node
    q_perm: list[int]
    k_perm: list[int | None]  # None: an axis K lacks (a batch letter of Q alone), broadcast
    v_perm: list[int | None]
    out_perm: list[int]
    scale: float
    terms: list[_Term]
    mask_layout: str  # the SDPA score letters: batch + query + key
    batch: int  # number of batch letters
    out_node: fx.Node
    removable: list[fx.Node]
    out_dtype: Any = None
    dtype_readers: list = field(default_factory=list)
    mods: list = field(default_factory=list)  # _Folded.mods: what a flex_attention score_mod replays
    sink: tuple | None = None  # _Folded.sink: extra key columns (attention sinks)
    qscales: tuple = ()  # _Folded.qscales: applied to Q before the call
    extra: tuple = ()  # _ExtraQK: products added to the scores, their Q and K joined to the site's along D
    out_contiguous: bool = True  # the value product's output was contiguous: the call's is made so


def _data_inputs(n: fx.Node) -> list:
    """``n``'s inputs whose values it reads: not the tensor of ``x.new_zeros(...)`` nor the
    second tensor of ``x.type_as(y)`` / ``x.view_as(y)`` (``_like``), of which only dtype,
    device or shape are read."""
    if n.op == "call_method" and n.target in _NEW_METHODS:
        return [a for a in n.all_input_nodes if a is not n.args[0]]
    if _like(n) is not None:
        return [a for a in n.all_input_nodes if a is not n.args[1]]
    return n.all_input_nodes


def _like(n: fx.Node) -> fx.Node | None:
    """y of ``x.type_as(y)``, ``x.to(y)``, ``x.view_as(y)`` (``_LIKE_METHODS``), else None."""
    return n.args[1] if n.op == "call_method" and n.target in _LIKE_METHODS and len(n.args) == 2 and \
        isinstance(n.args[1], fx.Node) else None


def _like_meta(n: fx.Node) -> Any:
    """What ``_like`` node ``n`` reads of its second tensor, from its own output: the dtype
    or the shape, the argument of ``_LIKE_METHODS[n.target]`` that replaces it."""
    out = _value(n)
    return out.dtype if _LIKE_METHODS[n.target] == "to" else tuple(out.shape)


def _ancestors(node: Any, stop: int = 4000) -> set:
    seen, todo = set(), [node] if isinstance(node, fx.Node) else []
    while todo and len(seen) < stop:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(_data_inputs(n))
    return seen


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def find_sites(gm: fx.GraphModule, example_inputs: list | None = None) -> list[tuple[GraphSite, _Plan | None]]:
    """Every softmax of ``gm`` as a ``GraphSite``, with the rewrite plan of those that are
    SDPA (``functionalize`` must have run). ``example_inputs`` (the piece's real inputs) let
    a mask's values be checked (an arithmetic mask's zeros and ones)."""
    out = []
    reach: dict = {}
    for node in gm.graph.nodes:
        reach[node] = _is_contraction(node) or any(reach.get(a) for a in _data_inputs(node))
    for node in list(gm.graph.nodes):
        if not _is_softmax(node):
            continue
        file, line, fn, _ = frame_of(node)
        site = GraphSite(file, line, fn)
        try:
            plan = _match(gm, node, site, example_inputs, reach)
            site.swappable = True
            out.append((site, plan))
        except Refused as exc:
            site.reason, site.targets, site.returned = str(exc), [], isinstance(exc, Returned)
            out.append((site, None))
    return out


class _ScoreChain(NamedTuple):
    """The scores from their product to the softmax (``_walk_back``)."""

    product: fx.Node  # the score product Q·Kᵀ
    cont: Contraction  # the product as index letters
    chain: list[fx.Node]  # the softmax, the ops back from it, the product last
    steps: list[tuple]  # (kind, node, data) in forward order, product first
    dtype_readers: list  # (reader, dtype or shape): x.type_as(scores), m.view_as(scores), which read no values


class _Folded(NamedTuple):
    """The steps folded into the scores as they reach the softmax (``_fold_steps``)."""

    layout: str  # the scores' letters at the softmax
    terms: list[_Term]  # the mask, with the scalings after each part
    alpha: float  # the scores' scale
    mul01: list[tuple[fx.Node, str, int]]  # scores times a tensor: (tensor, layout, number of terms before it)
    views: list[tuple]  # the reshapes of the scores' batch axes not undone, as _Term.views
    #: every elementwise step in order, for a score_mod that replays them: ('scale', c),
    #: ('add', _Term, sign), ('fill', _Term), ('mul', _Term), ('fn', callable)
    mods: list[tuple]
    #: attention sinks: extra score columns after the key axis, (a _Term per tensor, width)
    sink: tuple | None = None
    #: tensor factors constant along the key axis (``coef`` 1 multiplies, -1 divides): Q's rows scaled
    qscales: tuple = ()
    #: clean products added to the scores, (a _Term, ``_paired_operands``): joined to Q and K along D
    qk: tuple = ()


class _Axes(NamedTuple):
    """Which operand of the score product is the query and which the key, and their letters
    (``_score_axes``)."""

    key: str  # the key letter, the softmax's axis
    q_node: fx.Node
    k_node: fx.Node
    q_idx: str
    k_idx: str
    batch: list[str]  # the letters both operands keep (or Q alone: K broadcast over it), in the scores' order
    query: list[str]  # the one query letter
    inner: list[str]  # the one contracted (feature) letter


class _ExtraQK(NamedTuple):
    """A second product added to the scores (c·q2·k2ᵀ): its Q and K, permuted as the site's
    Q and K are, join theirs along D, q2 times ``factor`` (c over the site's scale)."""

    q: fx.Node
    k: fx.Node
    q_perm: list[int]
    k_perm: list[int | None]
    factor: float
    text: str


class _Weights(NamedTuple):
    """The softmax's weights as they reach the value product (``_walk_forward``)."""

    vprod: fx.Node  # the value product
    node: fx.Node  # the weights it takes
    layout: str  # their letters, in the score product's terms
    dropout: float  # the dropout probability while training, else 0
    tail: list[fx.Node]  # the casts, dropout and transposes between, in order


def _walk_back(softmax: fx.Node, site: GraphSite, reach: dict) -> _ScoreChain:
    """Back from ``softmax`` to the score product, recording each op on the way
    (``_step_back``), and the check that no intermediate score is read elsewhere except for
    its dtype. Sets ``site.external_input`` when the scores come from outside the graph;
    raises ``Refused``."""
    steps: list[tuple] = []  # backward order: (kind, node, data)
    chain: list[fx.Node] = [softmax]
    node = _back_to_product(softmax.args[0], steps, softmax, reach, chain)
    if isinstance(node, fx.Node) and node.op == "placeholder":
        site.external_input = True
        raise Refused(f"the softmax at {where(softmax)} takes a tensor from outside this graph: "
                      "no score product here")
    if not isinstance(node, fx.Node):
        raise Refused(f"the softmax at {where(softmax)} does not take a query-key product: not attention")
    product = node
    chain.append(product)
    cont = contraction(product)
    _refuse_talking_heads(cont)
    inside = set(chain).union(*(data for kind, _, data in steps if kind == "shift"))
    dtype_readers = []  # x.type_as(scores), m.view_as(scores): only dtype or shape is read, which the graph knows
    for n in chain[1:]:
        readers = [u for u in n.users if _like(u) is n and u.args[0] is not n or
                   u.op == "call_method" and u.target in _NEW_METHODS and u.args[0] is n]
        dtype_readers += [(u, _value(n).dtype if u.target in _NEW_METHODS else _like_meta(u)) for u in readers
                          if isinstance(_value(n), torch.Tensor) and isinstance(_value(u), torch.Tensor)]
        outside = [u for u in n.users if u not in inside and u not in readers]
        if outside:
            raise Refused(f"the scores at {where(n)} are also used by {op_name(outside[0])} at {where(outside[0])}: "
                          "SDPA never forms them")
    steps.reverse()  # forward order, product first
    return _ScoreChain(product, cont, chain, steps, dtype_readers)


def _fold_steps(scores: _ScoreChain, dim: int, apart: frozenset = frozenset()) -> _Folded:
    """The layout of the scores at each of ``scores.steps``, and the mask terms with the
    scalings after them, folded up to the softmax; raises ``Refused`` for a reshape with a
    sequence axis among the batch axes."""
    cont, product = scores.cont, scores.product
    layout = cont.out_idx
    terms: list[_Term] = []
    alpha = cont.alpha
    mods: list[tuple] = [("scale", alpha)] if alpha != 1.0 else []
    if cont.bias is not None:
        terms.append(_Term("add", cont.bias, layout, cont.beta, text=f"baddbmm input x {cont.beta:g}"))
        mods.append(("add", terms[-1], cont.beta))
    mul01: list[tuple[fx.Node, str, int]] = []
    qscales: list[_Term] = []
    qk: list[tuple] = []
    views: list[tuple] = []
    sink = None
    seq = {c for c in cont.out_idx if not (c in cont.a_idx and c in cont.b_idx)}  # the query and key letters
    for kind, n, data in scores.steps:
        if kind == "scale":
            alpha *= data
            for t in terms + [x[0] for x in qk]:
                t.coef *= data
            mods.append(("scale", data))
        elif kind == "fn":
            mods.append(("fn", data))
        elif kind == "perm":
            layout = "".join(layout[p] for p in data)
        elif kind == "view":
            if set(layout[-2:]) != seq:
                raise Refused(f"{op_name(n)} at {where(n)} reshapes the scores with a sequence axis among its batch "
                              "axes: SDPA cannot express it")
            if views and layout == views[-1][0] and data[1] == tuple(_value(product).shape[:-2]) and \
                    layout[-2:] == cont.out_idx[-2:]:
                layout, views = cont.out_idx, []  # reshaped back to the product's shape: its layout again
                continue
            fresh = "".join(chr(ord("A") + len(views) * 8 + i) for i in range(len(data[1])))
            views.append((fresh + layout[-2:], data[1], layout, data[0]))
            layout = fresh + layout[-2:]
        elif kind == "add":
            terms.append(_Term("add", data[0], layout, data[1], text=f"{op_name(n)} at {where(n)}",
                               views=list(views)))
            mods.append(("add", terms[-1], data[1]))
        elif kind == "fill":
            cond, fill, keep = data
            terms.append(_Term("fill", cond, layout, 1.0, fill, keep, text=f"{op_name(n)} at {where(n)}",
                               views=list(views)))
            mods.append(("fill", terms[-1]))
        elif kind == "qscale":
            if terms or mul01 or any(m[0] == "fn" for m in mods):
                raise Refused(f"the scores are scaled by a tensor at {where(n)} after a mask term or a function of "
                              "them: not a scaling of Q")
            qscales.append(_Term("qscale", data[0], layout, data[1], text=f"{op_name(n)} at {where(n)}",
                                 views=list(views)))
        elif kind == "qk":
            other, end, factor = data
            if n not in apart and layout == cont.out_idx and not views and not qscales and \
                    all(m[0] in ("scale", "add") for m in mods) and _value(end).shape == _value(product).shape:
                qk.append((_Term("qk", end, layout, factor, text=f"{op_name(end)} at {where(end)}"), n))
            else:  # any other place or shape: the second product is an added term, formed as a tensor
                terms.append(_Term("add", other, layout, 1.0, text=f"{op_name(n)} at {where(n)}",
                                   views=list(views)))
                mods.append(("add", terms[-1], 1.0))
        elif kind == "mul01":
            mul01.append((data, layout, len(terms)))
            mods.append(("mul", _Term("mul", data, layout, views=list(views))))
        elif kind == "sink":
            if views:
                raise Refused(f"{op_name(n)} at {where(n)} adds key columns to reshaped scores")
            sink = ([_Term("add", x, layout, text=f"{op_name(n)} at {where(n)}") for x in data[0]], data[1])
    key = layout[dim] if dim < len(layout) else ""
    pairs = [(t, _paired_operands(cont, contraction(t.node), key)) for t, _ in qk]
    if any(pair is None for _, pair in pairs) or qk and alpha == 0:  # not laid out as Q·Kᵀ: added terms instead
        return _fold_steps(scores, dim, apart | {n for _, n in qk})
    return _Folded(layout, terms, alpha, mul01, views, mods, sink, tuple(qscales), tuple(pairs))


def _score_axes(scores: _ScoreChain, folded: _Folded, dim: int, softmax: fx.Node, example_inputs: list | None,
                gm: fx.GraphModule) -> _Axes:
    """The key axis (the softmax's ``dim`` of ``folded.layout``) and from it the query and
    key operands of the score product and their batch, query and contracted letters; then
    the checks of the mask terms (no negative scaling after a fill, not computed from the
    scores, a 0/1 multiplier covered: ``_check_mul01``). Raises ``Refused``."""
    cont, product, layout = scores.cont, scores.product, folded.layout
    key = layout[dim]
    if key not in cont.a_idx and key not in cont.b_idx or (key in cont.a_idx and key in cont.b_idx):
        raise Refused(f"the softmax at {where(softmax)} runs over dim {dim} of scores [{' '.join(layout)}] from "
                      f"{cont.form} at {where(product)}, which is not a key axis: not attention")
    k_node, q_node = (cont.a, cont.b) if key in cont.a_idx else (cont.b, cont.a)
    k_idx, q_idx = (cont.a_idx, cont.b_idx) if key in cont.a_idx else (cont.b_idx, cont.a_idx)
    query = [c for c in cont.out_idx if c in q_idx and c not in k_idx]
    if len(query) > 1 and dim > 0 and layout[dim - 1] in query:  # 'bhid,bjd->bhij': K shared by every head
        query = [layout[dim - 1]]  # the others are batch letters K (and V) broadcast over, as MQA does
    batch = [c for c in cont.out_idx if c in cont.a_idx and c in cont.b_idx or c in q_idx and c not in query
             and c not in k_idx]
    inner = [c for c in q_idx if c in k_idx and c not in cont.out_idx]
    stray = [c for c in q_idx + k_idx if c not in cont.out_idx and c not in inner]
    key_side = [c for c in k_idx if c in cont.out_idx and c not in batch]
    if len(query) != 1 or len(inner) != 1 or stray or key_side != [key]:
        raise Refused(f"{cont.form} at {where(product)} is not one query index by one key index over one "
                      "contracted index: not Q·Kᵀ")
    terms, alpha = folded.terms, folded.alpha
    if any(t.coef <= 0 for t in terms if t.kind == "fill") or alpha <= 0 and any(t.kind == "fill" for t in terms):
        raise Refused(f"a mask at {where(softmax)} scaled by a negative factor after it: not a mask")
    for t in terms:  # a mask chosen from the scores themselves (top-k) is no mask
        for part in (t.node, t.fill):
            if isinstance(part, fx.Node) and product in _ancestors(part):
                raise Refused(f"the mask of {t.text} is computed from the scores themselves (weights chosen from "
                              "the scores, as top-k does): SDPA cannot express it")
    return _Axes(key, q_node, k_node, q_idx, k_idx, batch, query, inner)


def _walk_forward(softmax: fx.Node, scores: _ScoreChain, folded: _Folded) -> _Weights:
    """Forward from ``softmax`` through casts, dropout, transposes and the undoing of the
    scores' reshape to the value product, following the weights' letters; raises
    ``Refused`` when the weights are read anywhere else or go through any other op."""
    cont, product, views = scores.cont, scores.product, folded.views
    w_layout, dropout, tail = folded.layout, 0.0, []
    node = softmax
    while True:
        users = list(node.users)
        nan_fill = _zeroes_nan(users, node)
        users = [nan_fill] if nan_fill is not None else users
        if any(u.op == "output" for u in users):
            raise Returned(f"the attention weights of the softmax at {where(softmax)} are returned "
                           "(weights used anywhere but ·V)")
        if len(users) != 1:
            used = ", ".join(f"{op_name(u)} at {where(u)}" for u in users)
            raise Refused(f"the attention weights of the softmax at {where(softmax)} are also used by {used} "
                          "(weights used anywhere but ·V): SDPA never forms them")
        user = users[0]
        if _is_contraction(user):
            break
        if user.op == "call_method" and user.target in _CAST_METHODS and user.args[0] is node:
            pass
        elif user.op == "call_function" and user.target is F.dropout and user.args[0] is node:
            p, training = _arg(user, 1, "p", 0.5), _arg(user, 2, "training", True)
            if training:
                dropout = float(p)
        elif user.op == "call_method" and user.target in ("transpose", "permute") and user.args[0] is node:
            w_layout = _permuted(w_layout, user)
        elif _refills_masked(user, node, folded) or user is nan_fill:
            pass  # softmax(masked_fill(s, m, -inf)).masked_fill(m, 0), or NaN -> 0: zeros where SDPA gives 0 already
        elif folded.sink and _drops_sink(user, node, folded.sink[1]):
            pass  # W[..., :-n]: the sink columns go, the keys' weights stay
        elif user.op == "call_method" and user.target in ("view", "reshape") and views and \
                isinstance(_value(user), torch.Tensor) and tuple(_value(user).shape) == tuple(_value(product).shape) \
                and w_layout[-2:] == cont.out_idx[-2:]:
            w_layout = cont.out_idx  # the scores' reshape undone: back in the product's layout
        else:
            raise Refused(f"the attention weights go through {op_name(user)} at {where(user)} before ·V: "
                          "SDPA cannot express it")
        tail.append(user)
        node = user
    return _Weights(users[0], node, w_layout, dropout, tail)


def _refills_masked(user: fx.Node, node: fx.Node, folded: _Folded) -> bool:
    """``user`` is ``node.masked_fill(m, 0)`` with the very mask ``m`` that filled the scores
    with -inf before the softmax: it zeroes weights that are 0 already, and rows with every
    key masked, where eager's softmax gives NaN and SDPA and flex_attention give 0 (torch
    2.5+); ``measure.verify`` checks the site's output either way."""
    if _base(user) != "masked_fill" or user.args[:1] != (node,) or _number(_arg(user, 2, "value")) != 0.0:
        return False
    cond = _arg(user, 1, "mask")
    return any(t.kind == "fill" and t.node is cond and not t.keep_where_true and _number(t.fill) is not None
               and _number(t.fill) <= LARGE_NEGATIVE for t in folded.terms)


def _zeroes_nan(users: list, node: fx.Node) -> fx.Node | None:
    """The one op among ``users`` that sets the weights' NaNs to 0 (``w.masked_fill(w.isnan(),
    0)``, ``torch.where(torch.isnan(w), 0, w)``, ``torch.nan_to_num(w)``), the isnan its only
    other user; else None. The NaNs are rows with every key masked, where SDPA and
    flex_attention give 0 as it is (``_refills_masked``)."""
    def isnan(n: Any) -> bool:
        return isinstance(n, fx.Node) and _base(n) == "isnan" and n.args[:1] == (node,) and len(n.users) == 1

    checks = [n for n in users if not isnan(n)]
    if len(checks) != 1 or len(users) > 2:
        return None
    fill = checks[0]
    tests = [n for n in users if n is not fill]
    if _base(fill) == "nan_to_num":
        ok = fill.args[:1] == (node,) and _number(_arg(fill, 1, "nan", 0.0)) == 0.0 and not tests
    elif _base(fill) == "masked_fill":
        ok = fill.args[:1] == (node,) and bool(tests) and _arg(fill, 1, "mask") is tests[0] and \
            _number(_arg(fill, 2, "value")) == 0.0
    elif _base(fill) == "where" and len(fill.args) == 3:
        ok = bool(tests) and fill.args[0] is tests[0] and _number(fill.args[1]) == 0.0 and fill.args[2] is node
    else:
        ok = False
    return fill if ok else None


def _drops_sink(user: fx.Node, node: fx.Node, width: int) -> bool:
    """``user`` is ``node[..., :-width]`` (or ``[..., :S_k]``): the weights without the sink columns."""
    if not (user.op == "call_function" and user.target is operator.getitem and user.args[0] is node):
        return False
    idx = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
    before, after = _value(node), _value(user)
    last = idx[-1] if idx else None
    return isinstance(last, slice) and last.start in (None, 0) and last.step in (None, 1) and all(
        i is Ellipsis or i == slice(None) for i in idx[:-1]) and isinstance(after, torch.Tensor) and \
        tuple(after.shape) == tuple(before.shape[:-1]) + (before.shape[-1] - width,)


def _match(gm: fx.GraphModule, softmax: fx.Node, site: GraphSite, example_inputs: list | None,
           reach: dict) -> _Plan:
    """The plan for one softmax, or ``Refused`` naming the construct and its line. ``reach``:
    node -> whether a contraction is among its inputs' ancestors or itself."""
    scores = softmax.args[0]
    dim = _arg(softmax, 1, "dim")
    site.softmax_upcast = any(isinstance(a, torch.dtype)
                              for a in list(softmax.args[2:]) + [softmax.kwargs.get("dtype")])
    rank = _rank(scores)
    if not isinstance(dim, int) or rank < 2:
        raise Refused(f"the softmax at {where(softmax)} has no constant axis: not attention")
    dim = dim % rank
    back = _walk_back(softmax, site, reach)
    cont, product = back.cont, back.product
    folded = _fold_steps(back, dim)
    layout, terms, alpha = folded.layout, folded.terms, folded.alpha
    axes = _score_axes(back, folded, dim, softmax, example_inputs, gm)
    key, batch, query = axes.key, axes.batch, axes.query
    weights = _walk_forward(softmax, back, folded)
    # --- the value product
    vprod, w_layout = weights.vprod, weights.layout
    cv = contraction(vprod)
    if cv.bias is not None:
        raise Refused(f"torch.baddbmm at {where(vprod)} adds a tensor to the value product")
    if cv.alpha != 1.0:
        raise Refused(f"the value product at {where(vprod)} is scaled by {cv.alpha:g}")
    if cv.a is weights.node:
        w_idx, v_node, v_idx = cv.a_idx, cv.b, cv.b_idx
    elif cv.b is weights.node:
        w_idx, v_node, v_idx = cv.b_idx, cv.a, cv.a_idx
    else:
        raise Refused(f"the value product at {where(vprod)} takes the weights twice")
    if any(c not in cont.out_idx for c in w_layout):
        raise Refused(f"the weights reach the value product at {where(vprod)} with their batch axes reshaped: "
                      "SDPA cannot express it")
    role = dict(zip(w_idx, w_layout))  # the value product's letters -> the score letters
    summed = [c for c in w_idx if c in v_idx and c not in cv.out_idx]
    if [role[c] for c in summed] != [key]:
        if any(role[c] in batch for c in summed):
            raise Refused(f"talking heads: the value product at {where(vprod)} sums the weights over the heads "
                          "(weights mixed across heads after the softmax); SDPA computes each head on its own")
        if [role[c] for c in summed] == query:
            raise Refused(f"softmax over the query axis: the softmax at {where(softmax)} normalises over one sequence "
                          f"axis of the scores and the value product at {where(vprod)} sums over the other; SDPA "
                          "cannot express it")
        raise Refused(f"the value product at {where(vprod)} does not sum the weights over the axis the softmax at "
                      f"{where(softmax)} normalises: not attention")
    value_letters = [c for c in v_idx if c not in w_idx]
    if len(value_letters) != 1 or any(c not in v_idx and c in axes.k_idx for c in w_idx if role[c] in batch) or \
            any(c not in cv.out_idx for c in w_idx if role[c] not in (key,)) or value_letters[0] not in cv.out_idx:
        raise Refused(f"the value product at {where(vprod)} ({cv.form}) is not weights [.., i, j] times "
                      "values [.., j, e]: not attention")
    vlet = value_letters[0]
    inv = {r: c for c, r in role.items()}
    # SDPA's layout: batch letters (in the scores' order), then the sequence and feature letters
    q_perm = [axes.q_idx.index(c) for c in batch + query + axes.inner]
    k_perm = [axes.k_idx.index(c) if c in axes.k_idx else None for c in batch + [key] + axes.inner]
    extra = tuple(_extra_qk(t, pair, axes, alpha) for t, pair in folded.qk)
    v_perm = [v_idx.index(inv[c]) if inv[c] in v_idx else None for c in batch + [key]] + [v_idx.index(vlet)]
    sdpa_out = [inv[c] for c in batch + query] + [vlet]  # in the value product's letters
    out_perm = [sdpa_out.index(c) for c in cv.out_idx]
    dtypes = {str(getattr(_value(n), "dtype", None)) for n in (axes.q_node, axes.k_node, v_node)}
    if len(dtypes) != 1:
        raise Refused(f"Q, K and V of the site at {where(softmax)} have different dtypes ({', '.join(sorted(dtypes))})")
    site.form, site.scale = cont.form, float(alpha)
    site.dropout = weights.dropout
    site.layout = (f"q [{' '.join(axes.q_idx)}], k [{' '.join(axes.k_idx)}] -> scores [{' '.join(layout)}], "
                   f"v [{' '.join(v_idx)}] -> [{' '.join(cv.out_idx)}]")
    site.mask_terms = [t.text for t in terms]
    boolean = terms and all(t.kind == "fill" and _number(t.fill) == -math.inf for t in terms)
    site.mask = "none" if not terms else "boolean" if boolean else "additive"
    site.lines = [frame_of(product)[1], frame_of(softmax)[1], frame_of(vprod)[1]]
    try:  # SDPA may drop a 0/1 factor only where a later term masks what it zeroes; score_mod replays any
        for m, lay, after in folded.mul01:
            _check_mul01(m, lay, terms[after:], example_inputs, gm)
        if folded.mul01:
            site.notes.append("a multiplicative 0/1 mask is dropped: every score it zeroes also gets a large "
                              "negative term")
    except Refused as exc:
        site.refused_for["sdpa"] = f"{exc}: SDPA cannot express it (flex_attention's score_mod can: --backend " \
                                   "flex_attention)"
    fns = [m[1] for m in folded.mods if m[0] == "fn"]
    if fns:  # only a score_mod replays a non-linear function of the scores
        site.score_mod = [f.text for f in fns]
        site.refused_for["sdpa"] = (f"an elementwise non-linear function of the scores, {fns[0].text}, between the "
                                    "score product and the softmax: SDPA cannot express it (flex_attention's "
                                    "score_mod can: --backend flex_attention)")
    for x in extra:
        site.notes.append(f"the product {x.text} added to the scores joins Q and K along head_dim "
                          f"(x {x.factor:g} on its Q side): one call, no [S_q, S_k] term")
    if folded.sink:
        site.mask = "additive"
        site.notes.append(f"attention sinks: {folded.sink[1]} score column(s) joined after the keys "
                          f"({folded.sink[0][0].text}) become as many zero keys and values, their logits a mask column")
    site.targets = [t for t in TARGETS if t not in site.refused_for]
    if example_inputs is not None:
        for m in folded.mods:
            if m[0] in ("add", "fill", "mul") and not m[1].views:
                m[1].lazy = _index_program(gm, m[1], "".join(batch + query + [key]), example_inputs)
                if m[1].lazy is not None:
                    site.notes.append(f"flex_attention computes the term of {m[1].text or 'the scores'} per score from "
                                      "its (head, query, key) indices: no [S_q, S_k] tensor is formed")
    removable = [vprod] + weights.tail[::-1] + back.chain
    return _Plan(site, axes.q_node, axes.k_node, v_node, q_perm, k_perm, v_perm, out_perm, float(alpha), terms,
                 "".join(batch + query + [key]), len(batch), vprod, removable, getattr(_value(vprod), "dtype", None),
                 back.dtype_readers, folded.mods, folded.sink, folded.qscales, extra,
                 not isinstance(_value(vprod), torch.Tensor) or _value(vprod).is_contiguous())


def _extra_qk(t: _Term, pair: tuple, axes: _Axes, alpha: float) -> _ExtraQK:
    """The ``_ExtraQK`` of a clean product added to the scores (``_Folded.qk``, with its
    ``_paired_operands``), permuted as the site's Q and K."""
    q, q_idx, k, k_idx, to = pair
    inner = [c for c in q_idx if c in k_idx and c not in to.values()]
    q_letters, k_letters = [to[c] for c in axes.batch + axes.query], [to[c] for c in axes.batch + [axes.key]]
    return _ExtraQK(q, k, [q_idx.index(c) for c in q_letters + inner],
                    [k_idx.index(c) if c in k_idx else None for c in k_letters + inner], t.coef / alpha, t.text)


def _permuted(layout: str, node: fx.Node) -> str:
    dims = [a for a in node.args[1:]]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    r = len(layout)
    if node.target == "transpose":
        a, b = (d % r for d in dims)
        out = list(layout)
        out[a], out[b] = out[b], out[a]
        return "".join(out)
    return "".join(layout[d % r] for d in dims)


def _step_back(node: fx.Node, steps: list, softmax: fx.Node, reach: dict) -> Any:
    """One op between the product and the softmax: record it in ``steps`` and return the
    node that carries the scores into it; raises ``Refused`` for anything else."""
    base = _base(node)
    args = list(node.args)
    kw = node.kwargs
    if base == "cat" and args and isinstance(args[0], (list, tuple)):
        parts, dim = list(args[0]), _arg(node, 1, "dim", 0)
        if parts and isinstance(parts[0], fx.Node) and reach.get(parts[0]) and not steps and \
                not any(reach.get(x) for x in parts[1:]) and all(isinstance(x, fx.Node) for x in parts) and \
                isinstance(dim, int) and dim % _rank(node) == _rank(node) - 1:
            steps.append(("sink", node, (parts[1:], sum(_value(x).shape[-1] for x in parts[1:]))))
            return parts[0]
        raise Refused(f"{op_name(node)} at {where(node)} joins the scores with other tensors: only extra key columns "
                      "after the scores, right before the softmax (attention sinks), are read")
    carriers = [a for a in args if isinstance(a, fx.Node) and reach.get(a)]
    if base == "masked_fill" and args and args[0] in carriers:  # the condition is a mask, whatever it reads
        carriers = [args[0]]
    elif base == "where" and len(args) == 3 and args[0] in carriers and len(carriers) == 2:
        carriers = carriers[1:]
    if node.op == "call_method" and base in _CAST_METHODS and args and isinstance(args[0], fx.Node):
        return args[0]
    if node.op == "call_method" and base in ("transpose", "permute"):
        steps.append(("perm", node, _perm_of(node)))
        return args[0]
    if node.op == "call_method" and base in ("view", "reshape") and isinstance(args[0], fx.Node):
        before, after = _value(args[0]), _value(node)
        if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dim() >= 2 and \
                after.dim() >= 2 and before.shape[-2:] == after.shape[-2:]:
            steps.append(("view", node, (tuple(before.shape[:-2]), tuple(after.shape[:-2]))))
            return args[0]
        raise Refused(f"{op_name(node)} at {where(node)} reshapes the scores' sequence axes before the softmax: "
                      "SDPA cannot express it")
    if base in _NONLINEAR and len(carriers) == 1 and not any(
            isinstance(a, fx.Node) for a in args + list(kw.values()) if a is not carriers[0]):
        steps.append(("fn", node, _unary(node, carriers[0])))
        return carriers[0]
    if base in _NONLINEAR:
        raise Refused(f"an elementwise non-linear function of the scores, {op_name(node)} at {where(node)}, between "
                      "the score product and the softmax: SDPA cannot express it (FlexAttention's score_mod can)")
    if base in ("sub", "add") and len(carriers) == 2 and args[0] is carriers[0] and not kw:
        shift = _row_shift(node, args[0], args[1], steps, softmax, reach)
        if shift is not None:  # x - x.amax(-1, keepdim=True): the softmax does not change
            steps.append(("shift", node, shift))
            return args[0]
    if base == "add" and len(carriers) == 2 and not kw:  # Q·Kᵀ + a term computed from another product
        for s, other in ((carriers[0], carriers[1]), (carriers[1], carriers[0])):
            if _leads_to_product(s, softmax, reach):  # relative logits of Q, shifted: an added term
                clean = _scaled_product(other, softmax, reach)  # q1·k1ᵀ + c·q2·k2ᵀ: [q1, c·q2]·[k1, k2]ᵀ
                steps.append(("qk", node, (other, *clean)) if clean else ("add", node, (other, 1.0)))
                return s
    if base in ("mul", "truediv", "div") and len(carriers) == 2 and not kw:  # both come from products
        for s, other in ((carriers[0], carriers[1]), (carriers[1], carriers[0])):
            if (base == "mul" or args[0] is s) and _per_query(s, other, steps, softmax):  # s / |q_i|, q = x @ W
                steps.append(("qscale", node, (other, 1.0 if base == "mul" else -1.0)))
                return s
    if len(carriers) != 1:
        if len(carriers) > 1:
            raise Refused(f"{op_name(node)} at {where(node)} combines two products before the softmax: not one Q·Kᵀ")
        raise Refused(f"the softmax at {where(softmax)} does not take a query-key product: not attention")
    s = carriers[0]
    others = [a for a in args + list(kw.values()) if a is not s]
    if base in ("mul", "truediv", "div") and not kw.get("rounding_mode"):
        other = others[0] if others else None
        c = _number(other)
        if c is None and isinstance(other, fx.Node) and (base == "mul" or args[0] is s) and \
                _per_query(s, other, steps, softmax):  # s / tau[h], s / |q_i|: Q's rows scaled
            steps.append(("qscale", node, (other, 1.0 if base == "mul" else -1.0)))
            return s
        if base != "mul" and args[0] is not s:
            raise Refused(f"the scores divide {other} at {where(node)}: an elementwise non-linear function of the "
                          "scores, which SDPA cannot express")
        if c is not None:
            steps.append(("scale", node, c if base == "mul" else 1.0 / c))
            return s
        if base == "mul" and isinstance(other, fx.Node):
            steps.append(("mul01", node, other))
            return s
        raise Refused(f"the scores are scaled by a tensor at {where(node)}: not a constant scale")
    if base in ("add", "sub"):
        other = [a for a in args if a is not s]
        other = other[0] if other else kw.get("other")
        sign = -1.0 if base == "sub" else 1.0
        sign *= float(kw.get("alpha", 1.0)) if args[0] is s else 1.0
        if base == "sub" and args[0] is not s:  # other - scores
            steps.append(("add", node, (other, 1.0)))
            steps.append(("scale", node, -1.0))
            return s
        if _number(other) is not None:  # a constant shift: the softmax does not change
            return s
        steps.append(("add", node, (other, sign)))
        return s
    if base == "neg":
        steps.append(("scale", node, -1.0))
        return s
    if base == "masked_fill" and args and args[0] is s:
        cond, fill = _arg(node, 1, "mask"), _arg(node, 2, "value")
        _check_fill(fill, node)
        steps.append(("fill", node, (cond, fill, False)))
        return s
    if base == "where" and len(args) == 3 and s in args[1:]:
        cond, a, b = args
        fill = b if a is s else a
        _check_fill(fill, node)
        steps.append(("fill", node, (cond, fill, a is s)))
        return s
    if _is_contraction(node):
        raise Refused(f"the scores are contracted again by {op_name(node)} at {where(node)}: scores mixed across "
                      "heads (talking heads), which SDPA cannot express")
    raise Refused(f"{op_name(node)} at {where(node)} between the score product and the softmax is not a scale, an "
                  "added term or a mask: SDPA cannot express it")


def _key_axis(s: fx.Node, other: Any, softmax: fx.Node) -> int | None:
    """The softmax axis counted from the right (as broadcasting aligns, so a reshape of the
    batch axes keeps it) when the scores ``s`` span it (size 2 or more) and ``other`` is
    constant along it (size 1 there, or too few dims to reach it); else None."""
    sv, ov, dim, rank = _value(s), _value(other), _arg(softmax, 1, "dim"), _rank(softmax.args[0])
    if not (isinstance(sv, torch.Tensor) and isinstance(ov, torch.Tensor) and isinstance(dim, int)) or \
            ov.dim() > sv.dim() or sv.dim() > rank:
        return None
    d = dim % rank - rank
    return d if sv.shape[d] > 1 and (ov.dim() < -d or ov.shape[d] == 1) else None


def _per_query(s: fx.Node, other: fx.Node, steps: list, softmax: fx.Node) -> bool:
    """``other`` is a float tensor constant along the key axis (``_key_axis``; only reshapes
    of the batch axes between it and the softmax): scaling the scores by it scales the rows of Q."""
    d = _key_axis(s, other, softmax)
    return d is not None and _value(other).dtype.is_floating_point and not any(
        kind in ("perm", "sink") or kind == "view" and d < -2 for kind, _, _ in steps)


def _back_to_product(node: Any, steps: list, softmax: fx.Node, reach: dict, chain: list | None = None) -> Any:
    """``_step_back`` from ``node`` until a contraction, a graph input or a non-node; the
    ops passed are appended to ``chain``. Raises ``Refused`` as ``_step_back`` does."""
    while isinstance(node, fx.Node) and not _is_contraction(node) and node.op != "placeholder":
        if chain is not None:
            chain.append(node)
        node = _step_back(node, steps, softmax, reach)
    return node


def _scaled_product(node: Any, softmax: fx.Node, reach: dict) -> tuple[fx.Node, float] | None:
    """``node`` as c x (a contraction with no added input) through constant scalings and
    casts alone: (the contraction, c); else None."""
    steps: list = []
    try:
        end = _back_to_product(node, steps, softmax, reach)
    except Refused:
        return None
    if not (isinstance(end, fx.Node) and _is_contraction(end)) or any(kind != "scale" for kind, _, _ in steps):
        return None
    try:
        c = contraction(end)
    except Refused:
        return None
    return (end, c.alpha * math.prod(data for _, _, data in steps)) if c.bias is None else None


def _paired_operands(main: Contraction, other: Contraction, key: str) -> tuple | None:
    """``other`` laid out as ``main`` = Q·Kᵀ with key letter ``key``, by output position:
    one operand holds the key letter (its K) and no query letter, the other (its Q) holds
    every letter but the key (K may lack a batch letter: broadcast), one contracted letter.
    Returns (its Q, Q's letters, its K, K's letters, main's output letters -> other's), or None."""
    if len(main.out_idx) != len(other.out_idx) or key not in main.out_idx:
        return None
    to = dict(zip(main.out_idx, other.out_idx))
    k_main = main.a_idx if key in main.a_idx else main.b_idx
    q_main = main.b_idx if k_main is main.a_idx else main.a_idx
    k, k_idx, q, q_idx = (other.a, other.a_idx, other.b, other.b_idx) if to[key] in other.a_idx else \
        (other.b, other.b_idx, other.a, other.a_idx)
    inner = [c for c in q_idx if c in k_idx and c not in other.out_idx]
    stray = [c for c in q_idx + k_idx if c not in other.out_idx and c not in inner]
    query = [c for c in main.out_idx if c in q_main and c not in k_main]
    if len(inner) != 1 or stray or to[key] not in k_idx or to[key] in q_idx or \
            any(to[c] not in q_idx for c in main.out_idx if c != key) or any(to[c] in k_idx for c in query):
        return None
    return q, q_idx, k, k_idx, to


def _leads_to_product(node: Any, softmax: fx.Node, reach: dict) -> bool:
    """Whether ``_step_back`` walks from ``node`` to a contraction (scales, terms, masks)."""
    try:
        node = _back_to_product(node, [], softmax, reach)
    except Refused:
        return False
    return isinstance(node, fx.Node) and _is_contraction(node)


def _row_shift(node: fx.Node, s: fx.Node, other: fx.Node, steps: list, softmax: fx.Node, reach: dict) -> set | None:
    """The nodes computing ``other`` from the scores ``s`` when ``node`` = s ± other shifts
    each row by a constant along the softmax axis (``other`` has size 1 there: a row max
    subtracted for stability, in the model or in its softmax helper). softmax(x - c) =
    softmax(x) for such c, so the shift is dropped, provided only scalings, added terms and
    -inf fills lie between it and the softmax (no reshape, no function of the scores);
    else None."""
    for kind, _, data in steps:
        if kind not in ("scale", "add", "qk", "shift") and not (
                kind == "fill" and _number(data[1]) is not None and _number(data[1]) <= LARGE_NEGATIVE):
            return None
    if _key_axis(s, other, softmax) is None:
        return None
    nodes, todo = set(), [other]
    while todo:
        n = todo.pop()
        if n is s or n in nodes or not isinstance(n, fx.Node) or not reach.get(n):
            continue
        nodes.add(n)
        todo.extend(a for a in _data_inputs(n) if isinstance(a, fx.Node))
    return nodes


def _unary(node: fx.Node, scores: fx.Node) -> Callable:
    """``node`` as a function of the scores alone (every other argument is a constant):
    ``f(x)`` calls its op with ``scores`` replaced by ``x``; ``f.text`` names it and its line."""
    pos = [i for i, v in enumerate(node.args) if v is scores]
    args = [None if i in pos else v for i, v in enumerate(node.args)]
    kwargs, target, method = dict(node.kwargs), node.target, node.op == "call_method"

    def f(x):
        a = [x if i in pos else v for i, v in enumerate(args)]
        return getattr(a[0], target)(*a[1:], **kwargs) if method else target(*a, **kwargs)

    f.text = f"{op_name(node)} at {where(node)}"  # type: ignore[attr-defined]
    return f


def _perm_of(node: fx.Node) -> list[int]:
    r = _rank(node)
    return [("abcdefghijklmnopqrstuvwxyz"[:r]).index(c) for c in _permuted("abcdefghijklmnopqrstuvwxyz"[:r], node)]


def _check_fill(fill: Any, node: fx.Node) -> None:
    c = _number(fill)
    if c is not None and not c <= LARGE_NEGATIVE:
        raise Refused(f"{op_name(node)} at {where(node)} fills the scores with {c:g}, not -inf or a large negative "
                      "value: not a mask")
    if c is None and not isinstance(fill, fx.Node):
        raise Refused(f"{op_name(node)} at {where(node)} fills the scores with {fill!r}: not a mask")


def _refuse_talking_heads(cont: Contraction) -> None:
    """A product that sums one of its operand's batch axes, where that operand is itself a
    score product (through casts and scalings): the scores are mixed across heads (CaiT's
    talking heads)."""
    summed = [c for c in cont.a_idx if c in cont.b_idx and c not in cont.out_idx]
    for operand, idx in ((cont.a, cont.a_idx), (cont.b, cont.b_idx)):
        n = operand
        for _ in range(8):
            if not isinstance(n, fx.Node):
                break
            if _is_contraction(n):
                try:
                    inner = contraction(n)
                except Refused:
                    break
                inner_batch = {p for p, c in enumerate(inner.out_idx) if c in inner.a_idx and c in inner.b_idx}
                if len(inner.out_idx) == len(idx) and any(idx.index(c) in inner_batch for c in summed):
                    raise Refused(f"talking heads: the scores of {inner.form} at {where(n)} are mixed across heads "
                                  f"by {cont.form} at {where(cont.node)} before the softmax; SDPA computes each "
                                  "head on its own")
                break
            if n.op == "call_method" and _base(n) in _CAST_METHODS or _base(n) in ("mul", "truediv", "div"):
                n = n.args[0]
                continue
            break


def _check_mul01(m: fx.Node, layout: str, later: list[_Term], example_inputs: list | None,
                 gm: fx.GraphModule) -> None:
    """Scores times a tensor ``m`` may be dropped only when ``m`` is 0 or 1 and every score
    it zeroes also gets a large negative term later (``w * m + -1e9 * (1 - m)``); checked on
    the captured inputs' values."""
    problem = f"the scores are multiplied by a tensor at {where(next(iter(m.users)))}: not a scale or a mask"
    if example_inputs is None:
        raise Refused(problem)
    values = _evaluate(gm, [m] + [t.node for t in later] + [t.fill for t in later if isinstance(t.fill, fx.Node)],
                       example_inputs)
    if values is None:
        raise Refused(problem)
    mv = values[m]
    if not bool(((mv == 0) | (mv == 1)).all()):
        raise Refused(problem + " (its values are not only 0 and 1)")
    total = torch.zeros(())
    for t in later:
        tv = values[t.node]
        if t.kind == "add" and t.layout == layout:
            total = total + t.coef * tv.double()
        elif t.kind == "fill":
            return  # a later fill covers the zeroed scores as it covers all others
    if not bool((torch.broadcast_to(total, torch.broadcast_shapes(total.shape, mv.shape))
                 [torch.broadcast_to(mv == 0, torch.broadcast_shapes(total.shape, mv.shape))] <= LARGE_NEGATIVE).all()):
        raise Refused(problem + " (the scores it zeroes get no large negative term)")


#: ops an index program replays per score: elementwise, broadcasting and view ops (no
#: reduction, no contraction), so that a score's value needs only its own indices
_POINTWISE = {"add", "sub", "mul", "truediv", "div", "floordiv", "mod", "remainder", "neg", "abs", "pow", "exp",
              "log", "log2", "sqrt", "rsqrt", "clamp", "clip", "minimum", "maximum", "where", "lt", "le", "gt", "ge",
              "eq", "ne", "and_", "or_", "invert", "logical_and", "logical_or", "logical_not", "floor", "ceil",
              "round", "trunc", "sign", "tanh", "sigmoid", "float", "long", "int", "half", "bfloat16", "to",
              "type_as", "unsqueeze", "squeeze", "view", "reshape", "expand", "expand_as", "permute", "transpose",
              "contiguous", "clone", "detach", "getitem", "embedding", "masked_fill", "full_like", "zeros_like",
              "ones_like", "type"}


class _Slot(NamedTuple):
    """An argument of an index-program instruction: the value in slot ``i``."""

    i: int


def _fill_slots(a: Any, env: dict) -> Any:
    if isinstance(a, _Slot):
        return env[a.i]
    if isinstance(a, (tuple, list)):
        return type(a)(_fill_slots(x, env) for x in a)
    if isinstance(a, dict):
        return {k: _fill_slots(v, env) for k, v in a.items()}
    return a


class _IndexProgram:
    """A mask term T[.., i, j] = f(j - i) of the positions (ALiBi, T5 buckets, causal, a
    window), read by flex_attention from a table of its S_q + S_k - 1 diagonals,
    [B|1, H|1, S_q + S_k - 1], never as [.., S_q, S_k]. The table is rebuilt each call from
    the live leaves (a learned slope is read as it is now) by replaying the term's
    subgraph (``code``, made a tree: a position shared by both sides becomes two leaves)
    on the first key column and the first query row. Each ``torch.arange`` leaf runs along
    one axis (``axes``: 2 query, 3 key: the axis that collapses when it is shrunk to one
    element); other leaves are graph tensors smaller than the scores (``leaves``)."""

    def __init__(self):
        self.code: list[tuple] = []  # (out slot, is_method, target, args, kwargs), in order
        self.leaves: list[fx.Node] = []  # graph tensors read, in slots 0..len-1
        self.aranges: list[tuple] = []  # (slot, start, step, dtype, length)
        self.axes: list[int] = []  # per arange leaf: the score axis it runs along
        self.cached: tuple | None = None  # (key, leaves held, table): see table()

    def run(self, leaves: list, positions: list) -> torch.Tensor:
        """The term with the graph leaves' values ``leaves`` and each arange leaf replaced
        by ``positions[i]`` (its values, 1-D)."""
        env = dict(enumerate(leaves))
        for (slot, *_), pos in zip(self.aranges, positions):
            env[slot] = pos
        for out, method, target, args, kwargs in self.code:
            a, kw = _fill_slots(args, env), _fill_slots(kwargs, env)
            env[out] = getattr(a[0], target)(*a[1:], **kw) if method else target(*a, **kw)
        return env[self.code[-1][0]]

    def positions(self, first_of: int | None, device: Any) -> list:
        """Each arange leaf's values, only the first one for those along axis ``first_of``."""
        axes = self.axes if len(self.axes) == len(self.aranges) else [None] * len(self.aranges)
        return [torch.arange(st, st + sp * (1 if first_of is not None and axis == first_of else n), sp, dtype=dt,
                             device=device) for (_, st, sp, dt, n), axis in zip(self.aranges, axes)]

    def table(self, leaves: list, t: "_Term", mask_layout: str, device: Any) -> torch.Tensor:
        """[B|1, H|1, S_q + S_k - 1]: entry j - i + S_q - 1 is T[.., i, j]. Kept while the
        leaves are the same tensors at the same version (a buffer, a parameter between
        optimizer steps): the cache holds them, so a new tensor can never take an old one's
        id; rebuilt on any in-place change, and every call where a gradient must flow."""
        key = [(id(x), x._version) for x in leaves] + [str(device)]
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in leaves)
        if not grad and self.cached is not None and self.cached[0] == key:
            return self.cached[2]
        table = self._table(leaves, t, mask_layout, device)
        self.cached = None if grad else (key, list(leaves), table)
        return table

    def _table(self, leaves: list, t: "_Term", mask_layout: str, device: Any) -> torch.Tensor:
        column = _aligned(self.run(leaves, self.positions(3, device)), t, mask_layout)  # T[.., :, 0]
        row = _aligned(self.run(leaves, self.positions(2, device)), t, mask_layout)  # T[.., 0, :]
        column, row = column[..., :, 0], row[..., 0, :]
        batch = torch.broadcast_shapes(column.shape[:-1], row.shape[:-1])
        return torch.cat([column.expand(*batch, -1).flip(-1)[..., :-1], row.expand(*batch, -1)], -1)


def _diagonal_index(sq: int, sk: int, device: Any = None) -> torch.Tensor:
    """[S_q, S_k]: j - i + S_q - 1, the table entry of each score."""
    return torch.arange(sk, device=device)[None, :] - torch.arange(sq, device=device)[:, None] + sq - 1


def _index_program(gm: fx.GraphModule, t: _Term, mask_layout: str, example_inputs: list) -> _IndexProgram | None:
    """``t``'s tensor as an ``_IndexProgram`` when it spans [.., S_q, S_k], is computed from
    ``torch.arange`` leaves along the query and key axes and tensors smaller than the
    scores by ``_POINTWISE`` ops, and equals, exactly, its table read back at j - i; else
    None (the tensor is read as the graph computes it). Only for [B, H] batch axes."""
    node = t.node
    full = _value(node)
    if not isinstance(full, torch.Tensor) or full.dim() < 2 or len(mask_layout) != 4:
        return None
    sub = _ancestors(node, stop=400)
    if len(sub) >= 400 or not any(n.op == "call_function" and n.target is torch.arange for n in sub):
        return None
    values = _evaluate(gm, [node], example_inputs)
    if values is None:
        return None
    prog = _IndexProgram()
    prog.leaves = [n for n in gm.graph.nodes if n in sub and n.op in ("placeholder", "get_attr")]
    if any(isinstance(values[n], torch.Tensor) and values[n].numel() >= full.shape[-1] * full.shape[-2]
           for n in prog.leaves):
        return None  # a leaf as large as the scores: nothing to save
    slot_of = {n: i for i, n in enumerate(prog.leaves)}
    count = [len(prog.leaves)]

    def emit(n: fx.Node) -> _Slot:  # the tree below n, leaves first
        if n in slot_of:
            return _Slot(slot_of[n])
        count[0] += 1
        if n.op == "call_function" and n.target is torch.arange:
            if any(not isinstance(a, int) for a in n.args) or len(n.args) > 3:
                raise Refused("arange")
            start, _, step = (0, n.args[0], 1) if len(n.args) == 1 else (list(n.args) + [1])[:3]
            prog.aranges.append((count[0] - 1, start, step, values[n].dtype, values[n].numel()))
            return _Slot(count[0] - 1)
        if n.op not in ("call_function", "call_method") or _base(n) not in _POINTWISE:
            raise Refused(op_name(n))
        out = count[0] - 1
        args, kwargs = fx.node.map_arg(n.args, emit), fx.node.map_arg(n.kwargs, emit)
        prog.code.append((out, n.op == "call_method", n.target, args, kwargs))
        return _Slot(out)

    try:
        emit(node)
        leaves = [values[n] for n in prog.leaves]
        whole = _aligned(values[node], t, mask_layout)
        if whole.shape[-2] == 1 or whole.shape[-1] == 1:
            return None  # [.., 1, S_k] or [.., S_q, 1] is small already, and its table would not span S_q + S_k - 1
        device = whole.device  # the leaves' (a CPU position against a CUDA slope would raise: no table)
        for i in range(len(prog.aranges)):  # which axis does arange leaf i run along? Every other
            pos = prog.positions(None, device)  # leaf shrunk to one element: the axis it alone spans
            pos = [x if j == i else x[:1] for j, x in enumerate(pos)]
            alone = _aligned(prog.run(leaves, pos), t, mask_layout)
            spans = [d for d in (2, 3) if alone.shape[d] == whole.shape[d] == prog.aranges[i][4] > 1]
            if len(spans) != 1:
                return None
            prog.axes.append(spans[0])
        sq, sk = whole.shape[-2:]
        table = prog.table(leaves, t, mask_layout, device)
        if not torch.equal(table[..., _diagonal_index(sq, sk, device)], whole.expand(*table.shape[:-1], sq, sk)):
            return None  # not a function of j - i alone
    except Exception:  # any op the replay cannot take: the tensor is read as it is
        return None
    return prog


def _evaluate(gm: fx.GraphModule, wanted: list, example_inputs: list) -> dict | None:
    """The values of ``wanted`` nodes on the captured inputs, computing only their
    ancestors; None when an ancestor mutates something or is not plain torch."""
    need = set()
    for w in wanted:
        need |= _ancestors(w)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return None
    env: dict = dict(zip(placeholders, example_inputs))
    if any(isinstance(v, torch._subclasses.FakeTensor) for v in example_inputs if isinstance(v, torch.Tensor)):
        return None
    try:
        with torch.no_grad():
            for n in gm.graph.nodes:
                if n not in need or n.op == "placeholder":
                    continue
                if n.op == "call_method" and str(n.target).endswith("_") or n.op == "call_function" and \
                        n.target in _INPLACE_FUNCS or n.op not in ("call_function", "call_method", "get_attr"):
                    return None
                if any(a not in env for a in n.all_input_nodes):  # an input read for its dtype alone
                    ref = _value(n)
                    if n.op != "call_method" or not isinstance(ref, torch.Tensor):
                        return None
                    if n.target in _LIKE_METHODS:
                        env[n] = getattr(env[n.args[0]], _LIKE_METHODS[n.target])(_like_meta(n))
                    else:  # x.new_zeros(shape, ...): torch.zeros(shape, ...) with x's dtype and device
                        env[n] = _NEW_METHODS[n.target](*fx.node.map_arg(n.args[1:], lambda a: env[a]),
                                                       **{"dtype": ref.dtype, **fx.node.map_arg(n.kwargs, lambda a: env[a])})
                    continue
                args = fx.node.map_arg(n.args, lambda a: env[a])
                kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
                if n.op == "get_attr":
                    env[n] = getattr(gm, n.target)
                elif n.op == "call_method":
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                else:
                    env[n] = n.target(*args, **kwargs)
    except Exception:
        return None
    return env


# ----------------------------------------------------------------------------- the rewrite

def _aligned(x: torch.Tensor, t: _Term, mask_layout: str) -> torch.Tensor:
    """A term's tensor ``x``, added to the scores in ``t.layout`` after ``t.views``, in the
    SDPA score letters ``mask_layout`` (batch..., query, key), broadcastable."""
    lay = t.layout
    x = x[(None,) * (len(lay) - x.dim())] if x.dim() < len(lay) else x
    for after, after_batch, before, before_batch in reversed(t.views):
        x = x.permute([lay.index(c) for c in after])
        x = x.expand(*after_batch, *x.shape[-2:]).reshape(*before_batch, *x.shape[-2:])
        lay = before
    return x.permute([lay.index(c) for c in mask_layout])


def _operands(plan: _Plan) -> tuple[Callable, Callable, Callable]:
    """(qkv, fold, finish) for one site: ``qkv(q, k, v, parts, pad)`` -> (q, k, v as
    [B, H, S, D], the broadcast batch shape, q's permuted shape, v's own D; ``pad``: Q, K and
    V zero-padded to one D); ``fold(t, batch)`` folds a [batch..., S, S]
    mask part to 4 dims as ``qkv`` folds Q; ``finish(out, shape)`` puts the [B, H, S_q, D_v]
    output back in the value product's layout and dtype."""
    nb, q_perm, k_perm, v_perm, out_perm, out_dtype = (plan.batch, plan.q_perm, plan.k_perm, plan.v_perm,
                                                        plan.out_perm, plan.out_dtype)

    def to4(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        t = t.expand(*shape[:nb], *t.shape[nb:]) if nb > 2 else t
        if nb == 1:
            return t.unsqueeze(0)
        return t.reshape(-1, *t.shape[nb - 1:]) if nb > 2 else t

    def fold(x: torch.Tensor, batch: torch.Size) -> torch.Tensor:  # a mask part, broadcast over Q's batch first
        return to4(x.expand(*torch.broadcast_shapes(x.shape[:nb], batch), *x.shape[nb:]) if nb > 2 else x, batch)

    def qkv(q, k, v, it=None, pad=False):  # it: the site's parts, the extra products' Q and K first, then Q's row factors
        q, k, v = _arranged(q, q_perm), _arranged(k, k_perm), _arranged(v, v_perm)
        dv = v.shape[-1]
        if it is not None and plan.extra:  # q1·k1ᵀ + c·q2·k2ᵀ = [q1, c·q2]·[k1, k2]ᵀ: one product over the joined D
            parts = [(_arranged(next(it), x.q_perm) * x.factor, _arranged(next(it), x.k_perm)) for x in plan.extra]
            q, k = _joined([q] + [a for a, _ in parts]), _joined([k] + [b for _, b in parts])
        if pad and q.shape[-1] != dv:  # fused kernels take one head_dim: the narrower side padded with zeros
            width = max(q.shape[-1], dv)
            q, k, v = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
        # padded and joined before the broadcast: K and V shared by every head stay one tensor (stride 0)
        batch = torch.broadcast_shapes(q.shape[:nb], k.shape[:nb], v.shape[:nb])
        q, k, v = (t.expand(*batch, *t.shape[nb:]) for t in (q, k, v))
        shape = q.shape
        q, k, v = (to4(t, batch) for t in (q, k, v))
        if it is not None:
            q = scaled(q, it, batch)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return q, k, v, batch, shape, dv

    def scaled(q, it, batch):  # Q's rows times (or over) each key-constant factor, in Q's dtype
        for t in plan.qscales:
            f = fold(_aligned(next(it), t, plan.mask_layout), batch)
            q = (q * f if t.coef > 0 else q / f).to(q.dtype)
        return q

    def finish(out, shape):
        out = out.reshape(*shape[:nb], *out.shape[-2:]).permute(out_perm)  # [batch..., S_q, D_v], then as the code had it
        out = out.contiguous() if plan.out_contiguous else out  # as the value product gave it: a later .view works
        return out if out_dtype is None or out.dtype == out_dtype else out.to(out_dtype)

    return qkv, fold, finish


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` [..., S, D_i], broadcast to one shape but for D, joined along D in the
    first one's dtype."""
    lead = torch.broadcast_shapes(*(t.shape[:-1] for t in parts))
    return torch.cat([t.expand(*lead, t.shape[-1]).to(parts[0].dtype) for t in parts], -1)


def _arranged(t: torch.Tensor, perm: list) -> torch.Tensor:
    """``t.permute`` by ``perm``, with a size-1 axis where ``perm`` says None."""
    t = t.permute([p for p in perm if p is not None])
    for i, p in enumerate(perm):
        if p is None:
            t = t.unsqueeze(i)
    return t


def _site_call(plan: _Plan, number: int) -> Callable:
    """The function the rewritten graph calls in place of the value product:
    ``site(q, k, v, *mask_parts)`` -> the value product's output, via SDPA on [B, H, S, D]."""
    terms, mask_layout = plan.terms, plan.mask_layout
    scale, dropout, sink = plan.scale, plan.site.dropout, plan.sink
    boolean = plan.site.mask == "boolean" or bool(terms) and all(
        t.kind == "fill" and _number(t.fill) == -math.inf for t in terms)
    qkv, fold, finish = _operands(plan)

    def site(q, k, v, *parts):
        it = iter(parts)
        q, k, v, batch, shape, dv = qkv(q, k, v, it, pad=True)
        mask = None
        for t in terms:
            x = next(it)
            if t.kind == "fill":
                fill = next(it) if isinstance(t.fill, fx.Node) else t.fill
                masked = ~x if t.keep_where_true else x
                if boolean:
                    x = ~masked
                else:
                    x = torch.where(masked, torch.as_tensor(fill, dtype=torch.float32, device=q.device)
                                    if not isinstance(fill, torch.Tensor) else fill.float(), 0.0) * t.coef
            else:
                x = x * t.coef if t.coef != 1.0 else x
            x = _aligned(x, t, mask_layout)
            if mask is None:
                mask = x
            else:
                mask = mask & x if boolean else mask + x
        if mask is not None:
            mask = fold(mask, batch)
            mask = mask if boolean else mask.to(q.dtype)
        if sink:  # n zero keys and values; the sink logits are the mask's n extra columns
            cols = []
            for t in sink[0]:
                x = _aligned(next(it), t, mask_layout)
                x = x[..., :1, :] if x.shape[-2] > 1 and x.stride(-2) == 0 else x  # one row when all rows share it
                cols.append(fold(x, batch).to(q.dtype))
            n = sink[1]
            k = torch.cat([k, k.new_zeros(*k.shape[:-2], n, k.shape[-1])], -2)
            v = torch.cat([v, v.new_zeros(*v.shape[:-2], n, v.shape[-1])], -2)
            if mask is None:
                mask = q.new_zeros(1, 1, 1, k.shape[-2] - n)
            elif boolean:
                mask = torch.where(mask, torch.zeros((), dtype=q.dtype, device=q.device),
                                   torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
            lead = torch.broadcast_shapes(mask.shape[:-1], *[c.shape[:-1] for c in cols])
            mask = torch.cat([mask.expand(*lead, -1)] + [c.expand(*lead, -1) for c in cols], -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
        return finish(out[..., :dv], shape)

    site.__name__ = site.__qualname__ = f"attnkit_sdpa_site_{number}"
    return site


def _at(x: torch.Tensor, b, h, qi, ki):
    """x [B|1, H|1, S_q|1, S_k|1] at one score's indices (score_mod's arguments)."""
    i = [j if x.shape[d] > 1 else 0 for d, j in enumerate((b, h, qi, ki))]
    return x[i[0], i[1], i[2], i[3]]


def _flex_site_call(plan: _Plan, number: int) -> Callable:
    """As ``_site_call``, via one flex_attention call whose ``score_mod`` replays the site's
    steps (``_Plan.mods``) in order on each score: scales, added terms, fills, 0/1 factors
    and elementwise functions such as a tanh soft-cap. Each term tensor is read at the
    score's (b, h, q_idx, kv_idx) where it varies, a term of positions alone from its table
    of diagonals (``_IndexProgram``); ``scale`` is 1 (the steps hold it). A mask of
    positions alone (causal, a window) also becomes a ``BlockMask``, built once per shape.
    Attention sinks (``_Plan.sink``): n zero keys and values after the S_k keys, whose
    scores are the sink logits, set after the steps (the columns join right before the
    softmax); the steps read key index min(kv_idx, S_k - 1)."""
    from ..backends.calls import CALL_RANGE, compiled_flex

    mods, mask_layout, sink = plan.mods, plan.mask_layout, plan.sink
    qkv, fold, finish = _operands(plan)
    # masks from positions alone (causal, a window): the same for every call at one shape, so
    # a BlockMask built once per shape lets flex skip the blocks they mask out entirely
    static = [m[1] for m in mods if m[0] == "fill" and m[1].lazy is not None and not m[1].lazy.leaves
              and _number(m[1].fill) is not None and _number(m[1].fill) <= LARGE_NEGATIVE]
    block_masks: dict = {}

    def block_mask(steps: list, sq: int, sk: int, n: int, device: Any) -> Any:  # n: sink keys after sk
        key = (sq, sk, n, str(device))
        if key not in block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            masked = torch.zeros(sq + sk - 1, dtype=torch.bool, device=device)
            for kind, a, c, keep in steps:
                if kind == "mask":
                    masked |= (~a if keep else a).reshape(-1)

            def mask_mod(b, h, qi, ki):
                keep = ~masked[torch.clamp(ki, max=sk - 1) - qi + sq - 1]
                return keep | (ki >= sk) if n else keep

            block_masks[key] = create_block_mask(mask_mod, None, None, sq, sk + n, device=device)
        return block_masks[key]

    def site(q, k, v, *parts):
        it, steps = iter(parts), []
        q, k, v, batch, shape, _ = qkv(q, k, v, it)
        sk, n = k.shape[-2], 0
        for m in mods:
            if m[0] in ("scale", "fn"):
                steps.append((m[0], m[1], None, False))
                continue
            t = m[1]
            if any(t is x for x in static):  # the BlockMask's mask_mod applies it
                steps.append(("mask", _static_table(t, mask_layout, q.shape[-2], k.shape[-2], q.device), None,
                              t.keep_where_true))
                continue
            if t.lazy is not None:  # read from its table of diagonals, built from the leaves it reads
                x = t.lazy.table([next(it) for _ in t.lazy.leaves], t, mask_layout, q.device)
                x = (x, q.shape[-2] - 1, t)
            else:
                x = fold(_aligned(next(it), t, mask_layout), batch)
            value = m[2] if m[0] == "add" else next(it) if isinstance(t.fill, fx.Node) else t.fill
            steps.append((m[0], x, value, t.keep_where_true))

        if sink:  # the sink logits [B|1, H|1, S_q|1, n]; as many zero keys and values
            cols = [fold(_aligned(next(it), t, mask_layout), batch) for t in sink[0]]
            lead = torch.broadcast_shapes(*(c.shape[:-1] for c in cols))
            sinks = torch.cat([c.expand(*lead, -1) for c in cols], -1).to(q.dtype)
            n = sink[1]
            k = torch.cat([k, k.new_zeros(*k.shape[:-2], n, k.shape[-1])], -2)
            v = torch.cat([v, v.new_zeros(*v.shape[:-2], n, v.shape[-1])], -2)

        def score_mod(score, b, h, qi, ki):
            kj = torch.clamp(ki, max=sk - 1) if n else ki  # a sink key reads the last key's terms, then is replaced
            for kind, a, c, keep in steps:
                if kind == "mask":
                    continue
                if kind == "scale":
                    score = score * a
                    continue
                if kind == "fn":
                    score = a(score)
                    continue
                if isinstance(a, tuple):
                    table, offset, _ = a
                    x = table[b if table.shape[0] > 1 else 0, h if table.shape[1] > 1 else 0, kj - qi + offset]
                else:
                    x = _at(a, b, h, qi, kj)
                if kind == "add":
                    score = score + c * x
                elif kind == "mul":
                    score = score * x
                else:
                    score = torch.where(~x if keep else x, c, score)
            if n:
                score = torch.where(ki >= sk, _at(sinks, b, h, qi, torch.clamp(ki - sk, min=0)), score)
            return score

        blocks = block_mask(steps, q.shape[-2], sk, n, q.device) if static else None
        with torch.profiler.record_function(CALL_RANGE + "flex_attention"):
            out = compiled_flex()(q, k, v, score_mod=score_mod, block_mask=blocks, scale=1.0)
        return finish(out, shape)

    site.__name__ = site.__qualname__ = f"attnkit_flex_site_{number}"
    return site


def _static_table(t: _Term, mask_layout: str, sq: int, sk: int, device: Any) -> torch.Tensor:
    """The table of a term of positions alone (no graph leaf): the same at every call of one
    shape, so built once per shape and device (kept on the term)."""
    key = (sq, sk, str(device))
    if key not in t.tables:
        t.tables[key] = t.lazy.table([], t, mask_layout, device)
    return t.tables[key]


def _parts(plan: _Plan, target: str) -> list:
    """The graph nodes the site function takes after q, k, v: the factors of Q's rows, then
    each term's tensor, and a fill's value where it is a tensor; for flex_attention in the
    order of ``plan.mods``, then the sink logits."""
    terms = plan.terms + (plan.sink[0] if plan.sink else []) if target == "sdpa" else \
        [m[1] for m in plan.mods if m[0] in ("add", "fill", "mul")]
    sinks = plan.sink[0] if plan.sink and target != "sdpa" else []
    out: list = [n for x in plan.extra for n in (x.q, x.k)] + [t.node for t in plan.qscales]
    for t in terms:
        out.extend(t.lazy.leaves if target != "sdpa" and t.lazy is not None else [t.node])
        if t.kind == "fill" and isinstance(t.fill, fx.Node):
            out.append(t.fill)
    return out + [t.node for t in sinks]


def rewrite(gm: fx.GraphModule, plan: _Plan, number: int, target: str = "sdpa") -> None:
    """Replace ``plan``'s site in ``gm`` by one call of ``target`` (sdpa: ``_site_call``,
    flex_attention: ``_flex_site_call``) and remove the chain."""
    graph = gm.graph
    call = _site_call if target == "sdpa" else _flex_site_call
    with graph.inserting_before(plan.out_node):
        new = graph.call_function(call(plan, number), (plan.q, plan.k, plan.v, *_parts(plan, target)))
    new.meta = dict(plan.out_node.meta)
    plan.out_node.replace_all_uses_with(new)
    for reader, dtype in plan.dtype_readers:  # dtype: the dtype or the shape that reader reads
        if reader.target in _NEW_METHODS:  # scores.new_ones(S, S, dtype=...) -> torch.ones(S, S, dtype=..., device=...)
            source = _value(reader.args[0])
            kwargs = {"dtype": dtype, "device": source.device, **reader.kwargs}
            reader.op, reader.target = "call_function", _NEW_METHODS[reader.target]
            reader.args, reader.kwargs = tuple(reader.args[1:]), kwargs
        else:  # x.type_as(scores) -> x.to(dtype), m.view_as(scores) -> m.view(shape)
            reader.target, reader.args = _LIKE_METHODS[reader.target], (reader.args[0], dtype)
    todo, erased = list(plan.removable), set()
    for node in todo:
        if not node.users and node not in erased:
            inputs = list(node.all_input_nodes)
            graph.erase_node(node)
            erased.add(node)
            # what only the chain read (k's transpose, baddbmm's torch.empty) goes with it
            todo += [n for n in inputs if not n.users and n.op in ("call_function", "call_method")
                     and not n.is_impure() and not str(n.target).endswith("_") and n.target not in _INPLACE_FUNCS]
    gm.recompile()


# ----------------------------------------------------------------------------- capture and install

class Capture:
    """The graph path for one module: ``torch.compile`` of its forward with a backend that
    finds the sites of each graph piece and rewrites those in ``select`` (every one it can
    when None) to ``target`` (``TARGETS``). ``sites`` collects every piece's sites by key; ``seconds`` is the time
    the first call took (tracing, matching, rewriting and the run)."""

    def __init__(self, module: torch.nn.Module, select: set | None = None, target: str = "sdpa"):
        self.module = module
        self.select = select
        self.target = target
        self.sites: dict[tuple[str, int], GraphSite] = {}
        self.rewritten: list[tuple[str, int]] = []
        self.graphs: list[fx.GraphModule] = []  # each graph piece as it runs (rewritten or not)
        self.seconds = 0.0
        self.errors: list[str] = []
        self.compiled = torch.compile(module.forward, backend=self.backend, fullgraph=False, dynamic=False)

    def backend(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        saved = copy.deepcopy(gm.graph)
        try:
            functionalize(gm.graph)
            gm.recompile()
            pushed = push_value_products(gm, example_inputs)
            found = find_sites(gm, example_inputs)
            for site, _ in found:
                site.notes += [n for n in pushed if f"line {site.line}" in n]
            for site, plan in found:
                self.sites.setdefault(site.key, site)
                if plan is not None and self.target in site.targets and (self.select is None or site.key in self.select):
                    rewrite(gm, plan, len(self.rewritten), self.target)
                    self.rewritten.append(site.key)
        except Exception as exc:  # the matcher's own failure must not break the model: the piece runs as captured
            self.errors.append(f"{type(exc).__name__}: {exc}")
            gm.graph = saved
            gm.recompile()
        self.graphs.append(gm)
        return gm.forward

    def __call__(self, *args, **kwargs):
        # a module of N instances, each with its own backend, at a few shapes and grad modes: more
        # compiled entries per code object than Dynamo's default of 8 (beyond it Dynamo runs the original)
        with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
            return self.compiled(*args, **kwargs)

    def run(self, args: tuple, kwargs: dict) -> None:
        """Call once on ``args``/``kwargs`` without grad to capture (``seconds``)."""
        start = time.perf_counter()
        with torch.no_grad():
            self(*args, **kwargs)
        self.seconds = time.perf_counter() - start
