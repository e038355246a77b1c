"""Swap hand-written attention in a live model for SDPA at run time; keep a way back.

1. **Discover** (``Swapper.discover``): one forward pass under a ``TorchDispatchMode`` with
   module hooks records, for every softmax and SDPA op, the innermost module that ran
   it, the line of user code that issued it (the first stack frame outside torch), the
   score shape and that module's inputs. This traces by running, not symbolically:
   ``torch.fx`` cannot trace the commonest hand-written attention (nanoGPT slices a
   registered buffer with a traced size, ``self.bias[:, :, :T, :T]``: "slice indices must
   be integers"), while running finds attention in any module.
2. **Read** each site's source (``scan.analyze_source``), and confirm what only the live
   model can tell: that a causal buffer is lower-triangular, the rank a transpose assumes,
   that the softmax runs over the last dimension.
3. **Compile** the rewritten function from that source, with the same globals (and the
   same closure cells, ``__class__`` for ``super()`` included), and install it on the
   module *instance*: a method is shadowed in the instance's ``__dict__``; a module-level
   function (transformers' ``eager_attention_forward``) is reached by rebinding the calling
   method with a globals dict in which the function's name points to the rewritten one.
   Nothing of the user's files or classes is changed; ``revert`` removes the instance
   attributes again.
4. **Verify**: not here. The proof that a swap computes the same function belongs to
   the measuring layer (``measure.verify``), which installs each candidate with
   ``Swapper.trial``, judges it, and marks it ``swapped`` or ``kept`` with the reason.
   This module never imports ``measure``.

``patch.patch_of(swapper)`` gives the source change of every verified swap as a unified
diff.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import linecache
import os
import sys
import textwrap
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..backends import BACKENDS
from ..report import CannotRun, NotSwitched
from .graph import Capture, GraphSite
from .patch import apply_edits
from .scan import Site, analyze_source

TORCH_DIR = os.path.dirname(torch.__file__)
OUR_DIR = os.path.dirname(os.path.abspath(__file__))
SOFTMAX_OPS = ("aten._softmax", "aten.softmax", "aten._safe_softmax", "aten._masked_softmax")
SDPA_OPS = ("aten._scaled_dot_product", "aten.scaled_dot_product_attention",
            "aten._transformer_encoder_layer_fwd")  # the fused encoder layer runs SDPA inside
NATIVE_MHA = "aten._native_multi_head_attention"  # nn.MultiheadAttention's eval fast path; arg 10 is need_weights
#: torch.nn modules with an eval fast path that, on CPU, computes bmm + softmax
FASTPATH_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)

#: model -> its Swapper, so switch.apply can turn swaps on and off by backend name
_REGISTRY: "weakref.WeakKeyDictionary[nn.Module, Swapper]" = weakref.WeakKeyDictionary()


def swapper_of(model: nn.Module) -> "Swapper | None":
    return _REGISTRY.get(model)


@dataclass
class LiveSite:
    """One attention site found by running the model."""

    module_name: str
    module_type: str
    file: str
    line: int
    function: str
    kind: str  # manual | mha | sdpa (already fused)
    calls: int = 0
    score_shape: list[int] = field(default_factory=list)  # [batch, S_q, S_k, D] of its first call
    static: bool = False  # the reason comes from the source, not from a verification
    site: Site | None = None
    owner: str = ""  # method | attribute | function | graph
    method: str = ""  # the instance attribute that is rebound
    global_name: str = ""  # for a module-level function: its name in the caller's globals
    status: str = "kept"  # swapped | kept | fast
    reason: str = ""
    accuracy: dict | None = None
    kernel_after: str = ""
    path: str = ""  # which matcher made the swap: source (swap.scan, with a patch) | graph (swap.graph)
    runtime_only: str = ""  # a graph swap: why there is no source patch
    graph: GraphSite | None = None  # the graph path's site, when it took this one
    capture_s: float | None = None  # a graph swap: seconds its module's first capture took (trace, match, run)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("site", "graph")}
        d["where"] = f"{self.file}:{self.line}"
        if self.graph is not None:
            g = self.graph.to_dict()
            d.update({k: g[k] for k in ("form", "layout", "scale", "mask", "mask_terms", "dropout", "softmax_upcast",
                                        "notes", "targets", "score_mod")})
            d["site_lines"] = g["lines"]
        elif self.site is not None:
            s = self.site.to_dict()
            d.update({k: s[k] for k in ("form", "mask", "scale", "dropout", "gqa", "softmax_upcast", "call", "notes",
                                        "blockers")})
            d["site_lines"] = [self.site.line, self.site.end_line]
        return d


def _user_frames(limit: int = 12) -> list[types.FrameType]:
    """Stack frames outside torch and this package, innermost first."""
    out, frame = [], sys._getframe(1)
    while frame is not None and len(out) < limit:
        name = frame.f_code.co_filename
        if not (name.startswith(TORCH_DIR) or name.startswith(OUR_DIR) or name.startswith("<frozen")):
            out.append(frame)
        frame = frame.f_back
    return out


class _Recorder(TorchDispatchMode):
    def __init__(self, swapper: "Swapper"):
        super().__init__()
        self.swapper = swapper
        self.last_product: list[int] = []  # the first operand's shape of the latest batched matmul

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name.startswith(("aten.bmm", "aten.mm", "aten.baddbmm", "aten.matmul")) and args:
            first = args[1] if name.startswith("aten.baddbmm") else args[0]
            if isinstance(first, torch.Tensor):
                self.last_product = list(first.shape)
        kind = "manual" if name.startswith(SOFTMAX_OPS) else "sdpa" if name.startswith(SDPA_OPS) else None
        if name.startswith("aten._transformer_encoder_layer_fwd") and args and isinstance(args[0], torch.Tensor) \
                and args[0].device.type == "cpu":
            kind = None  # on CPU the fused layer runs the native MHA kernel (bmm + softmax), recorded on its own
        if name.startswith(NATIVE_MHA):
            need_weights = args[10] if len(args) > 10 else (kwargs or {}).get("need_weights", True)
            # on CPU the native kernel computes bmm + softmax even with need_weights=False
            on_cpu = isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"
            kind = "manual" if need_weights or on_cpu else "sdpa"
        if kind and self.swapper.stack:
            self.swapper.rank = args[0].dim() if args and isinstance(args[0], torch.Tensor) else 0
            self.swapper.record(kind, _attention_dims(name, args, kwargs or {}, self.last_product), _user_frames())
        return out


def _attention_dims(op: str, args: tuple, kwargs: dict, last_product: list[int]) -> list[int]:
    """[batch (all leading dims), S_q, S_k, D] of one attention call, from its op's inputs."""
    def numel(dims):
        out = 1
        for d in dims:
            out *= int(d)
        return out

    t = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if t is None:
        return []
    if op.startswith(NATIVE_MHA):  # query [B, S_q, E] (batch_first), key [B, S_k, E], embed_dim, num_heads
        embed, heads = int(args[3]), int(args[4])
        return [t.shape[0] * heads, t.shape[-2], args[1].shape[-2], embed // heads]
    if op.startswith("aten._transformer_encoder_layer_fwd"):  # src [B, S, E], embed_dim, num_heads
        embed, heads = int(args[1]), int(args[2])
        return [t.shape[0] * heads, t.shape[-2], t.shape[-2], embed // heads]
    if op.startswith(SDPA_OPS):  # query [..., S_q, D], key [..., S_k, D]
        return [numel(t.shape[:-2]), t.shape[-2], args[1].shape[-2], t.shape[-1]]
    # a softmax over scores [..., S_q, S_k]; D from the score product's first operand
    d = last_product[-1] if last_product else 0
    return [numel(t.shape[:-2]), t.shape[-2], t.shape[-1], d]


def _mha_forward_without_fastpath(self: nn.Module, *args, **kwargs):
    """The module's forward (nn.MultiheadAttention, nn.TransformerEncoderLayer) with the fast
    path off for this call. In eval mode the fast path (aten._native_multi_head_attention)
    computes bmm + softmax on CPU even with need_weights=False; without it the module calls
    F.multi_head_attention_forward, which calls F.scaled_dot_product_attention when the
    weights are not needed."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _attribute_types(model: nn.Module) -> dict[str, dict[str, Any]]:
    """class name -> self.<attr> -> what it is, for the source reader: the class of each
    child module, nn.Softmax dims, and functools.partial(F.softmax, ...) stored on a module."""
    import functools

    softmaxes = (torch.nn.functional.softmax, torch.softmax)
    out: dict[str, dict[str, Any]] = {}
    for m in model.modules():
        types_ = out.setdefault(type(m).__name__, {})
        for n, c in m.named_children():
            types_[n] = type(c).__name__
            if isinstance(c, nn.Softmax):
                types_["__softmax_dim__" + n] = c.dim
        for n, v in vars(m).items():
            if isinstance(v, functools.partial) and v.func in softmaxes:
                types_[n] = "partial_softmax"
                types_["__softmax_dim__" + n] = v.keywords.get("dim")
                types_["__softmax_upcast__" + n] = v.keywords.get("dtype") is not None
    return out


def _method_name(cls: type, code: types.CodeType) -> str:
    """The name under which ``cls`` (or a base) defines a function with this code."""
    for klass in cls.__mro__:
        for name, attr in vars(klass).items():
            if getattr(attr, "__code__", None) is code:
                return name
    return ""


def _compile(code: types.CodeType, func: Callable | None, edits: list, filename: str,
             extra_globals: dict | None = None) -> Callable:
    """The function ``code`` comes from, recompiled from its source with ``edits`` applied,
    with the same globals (a copy with ``extra_globals`` added, when given) and closure
    values. Raises CannotRun when that is impossible."""
    lines, start = inspect.getsourcelines(code)
    source = "".join(lines)
    local_edits = [(a - start + 1, b - start + 1, new) for a, b, new in edits]
    new_source = textwrap.dedent(apply_edits(source, local_edits))
    freevars = code.co_freevars
    if freevars and (func is None or func.__closure__ is None):
        raise CannotRun(f"{code.co_qualname} uses closure variables {freevars} that cannot be recovered", "")
    glob = func.__globals__ if func is not None else {}
    if extra_globals:
        glob = {**glob, **extra_globals}
    name = code.co_name
    if freevars:
        body = textwrap.indent(new_source, "    ")
        factory = f"def __attnkit_factory__({', '.join(freevars)}):\n{body}\n    return {name}\n"
        namespace: dict[str, Any] = {}
        exec(compile(factory, filename, "exec"), glob, namespace)
        cells = [c.cell_contents for c in func.__closure__]
        return namespace["__attnkit_factory__"](*cells)
    namespace = {}
    exec(compile(new_source, filename, "exec"), glob, namespace)
    return namespace[name]


class Swapper:
    """Discovery, swaps, verification and the way back for one model (see the module docstring)."""

    def __init__(self, model: nn.Module, register: bool = True):
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.inputs: dict[nn.Module, tuple[tuple, dict]] = {}
        self.sites: dict[tuple, LiveSite] = {}
        self.calls: list[tuple[LiveSite, list[int]]] = []  # every attention call of the last recorded pass
        self.frames: dict[tuple, list[tuple[types.CodeType, dict]]] = {}
        self.stacks: dict[tuple, list[nn.Module]] = {}  # the user modules around each site, outermost first
        self.installed: dict[tuple[int, str], tuple[nn.Module, str]] = {}  # (module id, attr) -> (module, attr)
        self.compiled: dict[tuple, Callable] = {}
        self.rank = 0  # the rank of the latest recorded attention op's input
        self.backend = "eager"  # what is installed now
        self.target = "sdpa"  # what the swaps compile to: sdpa, flash_attention_2 or flash_attention_4
        self._originals: dict[tuple, Any] = {}  # (module id, attr) -> the function an attribute swap shadows
        self.graph_path = True  # try swap.graph where the source matcher refuses a site
        self.captures: dict[tuple, Capture] = {}  # (module id, the softmax keys it rewrites) -> its compiled forward
        self.capture_seconds: dict[str, float] = {}  # module name -> seconds of its first capture
        if register:
            _REGISTRY[model] = self

    # --- discovery
    def record(self, kind: str, dims: list[int], frames: list[types.FrameType]) -> None:
        if not frames:
            return
        top = frames[0]
        # an nn.MultiheadAttention (or a torch transformer layer) whose internals ran the softmax:
        # the site is its caller's call
        fast = [m for m in self.stack if isinstance(m, FASTPATH_MODULES)]
        if kind == "manual" and fast:
            kind = "mha"
        # the innermost module of the user's (or a library's) own code: torch.nn's modules
        # (nn.Softmax, nn.Dropout, nn.MultiheadAttention) run inside the site, not around it
        own = [m for m in self.stack if not type(m).__module__.startswith("torch.nn")]
        module = own[-1] if own else self.stack[-1]
        key = (id(module), top.f_code, top.f_lineno, kind)
        site = self.sites.get(key)
        if site is None:
            site = LiveSite(self.names.get(module, "?"), type(module).__name__, top.f_code.co_filename, top.f_lineno,
                            top.f_code.co_qualname, kind, score_shape=dims)
            site._module = module  # type: ignore[attr-defined]
            site._code = top.f_code  # type: ignore[attr-defined]
            site._rank = self.rank  # type: ignore[attr-defined]
            site._mhas = []  # type: ignore[attr-defined]
            site._softmax_at = (top.f_code.co_filename, top.f_lineno)  # type: ignore[attr-defined]
            self.sites[key] = site
            self.frames[key] = [(f.f_code, f.f_globals) for f in frames]
            self.stacks[key] = list(own)
        if kind == "mha":  # the outermost module with a fast path: a layer's covers its attention
            outer = next(m for m in fast if not isinstance(m, nn.MultiheadAttention)) if any(
                not isinstance(m, nn.MultiheadAttention) for m in fast) else fast[-1]
            if all(m is not outer for m in site._mhas):  # type: ignore[attr-defined]
                site._mhas.append(outer)  # type: ignore[attr-defined]
        site.calls += 1
        self.calls.append((site, dims))

    def _run_recorded(self, run: Callable[[], Any]) -> None:
        """Run ``run()`` without grad under the recorder, with every module's inputs kept."""
        handles = []

        def pre(module, args, kwargs):
            self.stack.append(module)
            self.inputs.setdefault(module, (args, kwargs))

        def post(module, args, kwargs, out):
            if self.stack and self.stack[-1] is module:
                self.stack.pop()

        for m in self.model.modules():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
        try:
            with torch.no_grad(), _Recorder(self):
                run()
        finally:
            for h in handles:
                h.remove()
            self.stack.clear()

    def discover(self, run: Callable[[], Any]) -> list[LiveSite]:
        """Run ``run()`` (one forward pass) and record the attention sites it executes."""
        self._run_recorded(run)
        for key, live in self.sites.items():
            self._understand(key, live)
        return list(self.sites.values())

    def _understand(self, key: tuple, live: LiveSite) -> None:
        """Find the source site of a recorded op, and how its function can be rerouted (a
        reason found here is final: ``live.static``)."""
        self._understand_site(key, live)
        if live.reason and live.kind in ("manual", "softmax"):
            self.fall_back(live, f"the source matcher refused it: {live.reason}")
        elif live.site is not None and live.owner:
            live.path = "source"
            if live.site.materialised:
                self._prefer_graph(live)
        live.static = bool(live.reason)

    def fall_back(self, live: LiveSite, why: str) -> bool:
        """Try the graph path (``swap.graph``, ``_graph_site``) for ``live``, which the source
        matcher refused or whose rewrite raised (``why``). True when the graph path takes the
        site (``live.path`` 'graph', no source patch); otherwise ``live.reason`` says why, the
        graph's reason first."""
        if not self.graph_path:
            return False
        found, module, error = self._graph_site(live)
        if error:
            live.reason = f"{live.reason}; the graph path failed: {error}"
            return False
        if found is None:
            at = live._softmax_at  # type: ignore[attr-defined]
            live.reason = f"{live.reason} (the graph path found no softmax at {at[0]}:{at[1]})"
            return False
        if not found.swappable:
            live.reason = f"{found.reason} ({why})"
            if not found.reason.endswith("not attention"):  # attention, refused for a construct SDPA cannot take
                live.kind = "manual"
            return False
        self._take_graph(live, found, module, why)
        return True

    def _take_graph(self, live: LiveSite, found: GraphSite, module: nn.Module, why: str) -> None:
        """``live`` swapped by the graph path: ``found``, captured on ``module``'s forward."""
        live._module = module  # type: ignore[attr-defined]
        live.module_name, live.module_type = self.names.get(module, "?"), type(module).__name__
        live.graph, live.path, live.site, live.reason = found, "graph", None, ""
        live.kind, live.owner, live.method, live.global_name = "manual", "graph", "forward", ""
        live.line = found.lines[0] if found.lines else live.line
        live.runtime_only = f"run-time only, no source patch: {why}"
        live.capture_s = round(self.captures[(id(module), None, "sdpa")].seconds, 3)

    def _graph_site(self, live: LiveSite) -> tuple[GraphSite | None, nn.Module, str]:
        """(the graph path's site for ``live``'s softmax or None, the module whose capture
        holds it, the capture's error or ''): the innermost module that ran it is captured,
        then the modules around it while the softmax's input comes from outside the graph or
        its weights are returned."""
        key = next(k for k, v in self.sites.items() if v is live)
        softmax_at = live._softmax_at  # type: ignore[attr-defined]
        inner = live._module  # type: ignore[attr-defined]
        found: GraphSite | None = None
        held = inner
        for module in ([inner] + [m for m in self.stack_of(key) if m is not inner])[:4]:
            if module not in self.inputs:
                continue
            capture = self._capture(module, None)
            if capture.errors:
                return None, inner, capture.errors[0]
            found, held = capture.sites.get(softmax_at), module
            if found is None or found.swappable or not (found.external_input or found.returned):
                break
        return found, held, ""

    def _prefer_graph(self, live: LiveSite) -> None:
        """The source rewrite of ``live`` forms a query-dependent term as an [S_q, S_k]
        attn_mask (``Site.materialised``): where the graph path's site forms none (a second
        product joined to Q and K along head_dim), it is taken instead."""
        if not self.graph_path:
            return
        found, module, error = self._graph_site(live)
        if not error and found is not None and found.swappable and found.mask in ("none", "boolean"):
            self._take_graph(live, found, module, f"the source rewrite forms {live.site.materialised} as an "
                                                  "[S_q, S_k] attn_mask; the graph path forms no such tensor")

    def _capture(self, module: nn.Module, select: frozenset | None, target: str = "sdpa") -> Capture:
        """The graph path's compiled forward of ``module`` that rewrites the sites in
        ``select`` (every one it can when None) to ``target``, captured on the module's
        recorded inputs."""
        key = (id(module), select, target)
        if key not in self.captures:
            capture = Capture(module, None if select is None else set(select), target)
            args, kwargs = self.inputs[module]
            was_training = module.training
            try:
                capture.run(args, kwargs)
            except Exception as exc:
                capture.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                module.train(was_training)
            self.captures[key] = capture
            if select is None:
                self.capture_seconds[self.names.get(module, "?")] = round(capture.seconds, 3)
        return self.captures[key]

    def _understand_site(self, key: tuple, live: LiveSite) -> None:
        module, code = live._module, live._code  # type: ignore[attr-defined]
        if live.kind == "sdpa":
            live.status, live.reason = "fast", "already F.scaled_dot_product_attention"
            return
        try:
            source = "".join(linecache.getlines(code.co_filename)) or Path(code.co_filename).read_text()
        except OSError:
            live.reason = f"no source for {code.co_filename}"
            return
        types_by_class = _attribute_types(self.model)
        hints: dict[str, Any] = {"__other__": True, "__mha_lines__": {
            s.line for s in self.sites.values() if s.kind == "mha" and s.file == code.co_filename}}
        for other in self.sites.values():  # the rank of every recorded softmax of this file
            other_code = other._code  # type: ignore[attr-defined]
            if other_code.co_filename == code.co_filename and getattr(other, "_rank", 0):
                hints.setdefault(other_code.co_qualname, {})[other.line] = other._rank  # type: ignore[attr-defined]
        try:
            found = analyze_source(source, code.co_filename, types_by_class, hints)
        except SyntaxError as exc:
            live.reason = f"the source does not parse: {exc}"
            return
        want = "mha" if live.kind == "mha" else "manual"
        for s in found:
            if s.function == code.co_qualname and s.kind == want and (
                    s.softmax_line == live.line or s.line <= live.line <= s.end_line):
                live.site = s
                break
        if live.site is None:
            other = [s for s in found if s.function == code.co_qualname and s.kind == "softmax"
                     and s.softmax_line == live.line]
            if other:
                live.kind, live.reason = "softmax", other[0].reason
            else:
                live.reason = (f"no attention chain recognised around the softmax at {code.co_filename}:{live.line} "
                               f"(in {code.co_qualname})")
            return
        s = live.site
        live.line = s.line
        if not s.swappable:
            live.reason = s.reason
            return
        problem = self._confirm(live, module)
        if problem:
            live.reason = problem
            return
        live.method = _method_name(type(module), code)
        if live.method:
            live.owner = "method"
            return
        # a function stored on the instance (self.attn_fn = attention_implementations.get(...)), called
        # through the attribute: the attribute is shadowed, the function itself left alone
        for holder in [module] + [m for m in self.stack_of(key)]:
            for attr, value in vars(holder).items():
                if getattr(value, "__code__", None) is code or getattr(getattr(value, "func", None), "__code__", None) is code:
                    live.owner, live.method, live.global_name = "attribute", attr, ""
                    live._module = holder  # type: ignore[attr-defined]
                    return
        # a module-level function: reroute through the method of the module that calls it
        frames = self.frames[key]
        for caller_code, caller_globals in frames[1:]:
            method = _method_name(type(module), caller_code)
            if not method:
                continue
            names = [n for n, v in caller_globals.items() if getattr(v, "__code__", None) is code]
            if not names:
                live.reason = f"{code.co_qualname} is not called through a global name of {method}'s module"
                return
            live.owner, live.method, live.global_name = "function", method, names[0]
            return
        live.reason = (f"the site is in {code.co_qualname}, which no method of {type(module).__name__} calls "
                       "directly: the source patch covers it, the run-time swap does not")

    def stack_of(self, key: tuple) -> list[nn.Module]:
        """The user modules that were running around a site, innermost first."""
        return list(reversed(self.stacks.get(key, [])))

    def _confirm(self, live: LiveSite, module: nn.Module) -> str:
        """Check on the live module what the source alone could not prove; '' when all holds."""
        s = live.site
        rank = getattr(live, "_rank", 0)
        if live.kind == "manual":
            if "rank" in s.needs and rank and s.needs["rank"] != rank:
                return f"the transpose in the score product (line {s.line}) swaps the last two dims only for rank " \
                       f"{s.needs['rank']} " \
                       f"inputs; these scores have rank {rank}"
            dim = s.needs.get("softmax_dim")
            if dim is not None and rank and dim not in (-1, rank - 1) and not s.needs.get("softmax_dim_is_key"):
                return f"the softmax at line {s.softmax_line} runs over dim {dim} of {rank}, not the key dimension"
            if "causal_buffer" in s.needs:
                buf = module
                for part in s.needs["causal_buffer"].split(".")[1:]:
                    buf = getattr(buf, part, None)
                if not isinstance(buf, torch.Tensor) or buf.dim() < 2 or not self._lower_triangular(buf):
                    # not a causal buffer after all: keep it as an explicit boolean mask
                    s.call = s.call.replace("is_causal=True", f"attn_mask={s.needs['fallback_mask']}")
                    s.edits = [(a, b, [ln.replace("is_causal=True", f"attn_mask={s.needs['fallback_mask']}")
                                       for ln in new]) for a, b, new in s.edits]
                    s.mask = "boolean (buffer)"
                    s.notes.append(f"{s.needs['causal_buffer']} is not lower-triangular: kept as an explicit mask")
                elif live.score_shape and live.score_shape[1] != live.score_shape[2]:
                    return (f"a causal buffer ({s.needs['causal_buffer']}, line {s.line}) sliced to a non-square block "
                            "(KV-cache decoding): keep it as is, or pass an explicit mask")
        return ""

    @staticmethod
    def _lower_triangular(buf: torch.Tensor) -> bool:
        square = buf.reshape(-1, buf.shape[-2], buf.shape[-1])
        want = torch.ones(buf.shape[-2:], device=buf.device, dtype=torch.bool).tril()
        return buf.shape[-1] == buf.shape[-2] and bool(((square != 0) == want).all())

    # --- swapping
    def swappable(self) -> list[LiveSite]:
        return [s for s in self.sites.values() if not s.static and s.owner and (
            s.path == "graph" or s.site is not None and s.site.swappable)]

    def edits_for(self, live: LiveSite, backend: str) -> list:
        """The site's source edits for ``backend`` (sdpa, or a FlashAttention backend where the
        site can take it: ``Site.variant_edits``)."""
        s = live.site
        return s.edits if backend == "sdpa" else s.variant_edits.get(backend, [])

    def _function_for(self, live: LiveSite, group: list[LiveSite] | None = None) -> Callable:
        """``live``'s function recompiled with its edits (and those of the other sites of
        ``group``, swapped in the same function: DETR calls two attentions in one method)."""
        code = live._code  # type: ignore[attr-defined]
        group = [g for g in (group or [live]) if g._code is code]  # type: ignore[attr-defined]
        key = (code, tuple(g.site.call for g in group), self.target)
        if key not in self.compiled:
            module = live._module  # type: ignore[attr-defined]
            original = None
            if live.owner == "method":
                original = inspect.unwrap(getattr(type(module), live.method))
            elif live.owner == "attribute":
                original = vars(module)[live.method]
                original = getattr(original, "func", original)
            else:
                caller = getattr(type(module), live.method)
                original = caller.__globals__.get(live.global_name)
            extra = None
            if self.target != "sdpa":  # the library function the rewritten source calls, under its name there
                record = BACKENDS[self.target]
                module = importlib.import_module(record.module)
                extra = {record.source_name: getattr(module, record.entry)}
            edits = {e[0]: e for g in group for e in self.edits_for(g, self.target)}
            self.compiled[key] = _compile(code, original, list(edits.values()),
                                          f"<attnkit swap of {code.co_filename}:{live.line}>", extra)
        return self.compiled[key]

    def _install(self, live: LiveSite, group: list[LiveSite] | None = None) -> None:
        module = live._module  # type: ignore[attr-defined]
        if live.owner == "attribute":
            self._originals.setdefault((id(module), live.method), module.__dict__[live.method])
        elif live.method in module.__dict__:
            raise CannotRun(f"{live.module_name} already has its own {live.method!r} on the instance", "")
        if live.owner == "graph":
            keys = frozenset(g._softmax_at for g in group or [live] if g.owner == "graph")  # type: ignore[attr-defined]
            everything = self.captures.get((id(module), None, self.target))
            whole = everything is not None and keys == frozenset(
                k for k, s in everything.sites.items() if not s.reason_for(self.target))
            module.__dict__["forward"] = everything if whole else self._capture(module, keys, self.target)
            self.installed[(id(module), "forward")] = (module, "forward")
            return
        new_fn = self._function_for(live, group)
        if live.owner == "attribute":
            module.__dict__[live.method] = new_fn
            self.installed[(id(module), live.method)] = (module, live.method)
            return
        if live.owner == "method":
            bound = types.MethodType(new_fn, module)
        else:
            caller = getattr(type(module), live.method)
            if inspect.unwrap(caller) is not caller:
                raise CannotRun(f"{type(module).__name__}.{live.method} is decorated: it cannot be rebound exactly", "")
            glob = dict(caller.__globals__)
            glob[live.global_name] = new_fn
            rebound = types.FunctionType(caller.__code__, glob, caller.__name__, caller.__defaults__,
                                         caller.__closure__)
            rebound.__kwdefaults__ = caller.__kwdefaults__
            bound = types.MethodType(rebound, module)
        module.__dict__[live.method] = bound
        self.installed[(id(module), live.method)] = (module, live.method)
        for g in group or [live]:
            for mha in getattr(g, "_mhas", []):
                if "forward" not in mha.__dict__:
                    mha.__dict__["forward"] = types.MethodType(_mha_forward_without_fastpath, mha)
                    self.installed[(id(mha), "forward")] = (mha, "forward")

    def apply(self, backend: str = "sdpa") -> None:
        """Install every verified swap (``eager`` reverts them)."""
        if backend == "eager":
            self.revert()
            return
        if backend != self.target:
            raise CannotRun(f"these swaps were verified for {self.target}, not {backend}", "")
        swapped = [s for s in self.sites.values() if s.status == "swapped"]
        for live in swapped:
            module = live._module  # type: ignore[attr-defined]
            if (id(module), live.method) not in self.installed:
                group = [g for g in swapped if g._module is module and g.method == live.method]  # type: ignore[attr-defined]
                self._install(live, group)
        self.backend = self.target

    def revert(self) -> None:
        for key, (module, attr) in self.installed.items():
            self._restore(module, attr, key)
        self.installed.clear()
        self.backend = "eager"

    def candidates(self, backend: str = "sdpa") -> list[LiveSite]:
        """Revert every swap, compile the next ones for ``backend`` (sdpa, flash_attention_2
        or flash_attention_4), and return the sites to try, each reset to ``kept``. A site
        ``backend`` cannot express gets its reason and is left out."""
        self.revert()
        self.target = backend
        out = []
        for live in self.swappable():
            live.status, live.reason, live.accuracy, live.kernel_after = "kept", "", None, ""
            if backend == "flex_attention" and live.path == "source" and not self.fall_back(
                    live, "the source path rewrites to SDPA or FlashAttention, not flex_attention"):
                live.reason = live.reason or "flex_attention: only the graph path rewrites to it, and it is off"
                continue
            if live.path == "graph":
                live.reason = live.graph.reason_for(backend)
                if live.reason:
                    continue
                out.append(live)
                continue
            if backend != "sdpa" and backend not in live.site.variant_edits:
                live.reason = (f"{backend} takes no mask but a causal one; this site has a {live.site.mask} mask"
                               if live.site.mask not in ("none", "causal", "causal buffer") else
                               f"{backend} has no attention dropout; this site applies {live.site.dropout}")
                continue
            out.append(live)
        return out

    @contextlib.contextmanager
    def trial(self, live: LiveSite) -> Iterator[nn.Module]:
        """Inside the block, ``live``'s swap alone is installed on its module (yielded); it
        is removed afterwards, whatever happens."""
        try:
            self._install(live)
            yield live._module  # type: ignore[attr-defined]
        finally:
            self._uninstall(live)

    def module_inputs(self, live: LiveSite) -> tuple[tuple, dict]:
        """The (args, kwargs) ``live``'s module was last called with in a recorded pass."""
        return self.inputs.get(live._module, ((), {}))  # type: ignore[attr-defined]

    def require_swapped(self) -> None:
        """Raise ``CannotRun`` when no site was swapped: the attention already runs SDPA, or
        each site's reason says what keeps it from being swapped."""
        if any(s.status == "swapped" for s in self.sites.values()):
            return
        name = type(self.model).__name__
        if all(s.status == "fast" for s in self.sites.values()):
            raise NotSwitched(f"{name}'s attention already runs SDPA (" + "; ".join(sorted(
                {f"{s.file}:{s.line} {s.reason}" for s in self.sites.values()})) + "): nothing to switch",
                "already_fused", self.target)
        reasons = "; ".join(sorted({f"{s.file}:{s.line}: {s.reason}" for s in self.sites.values()
                                    if s.status != "fast"}))
        target = "" if self.target == "sdpa" else f" for {self.target}"
        raise NotSwitched(f"{name} has attention but no site could be swapped{target}: {reasons}", "no_site",
                          self.target)

    def _uninstall(self, live: LiveSite) -> None:
        module = live._module  # type: ignore[attr-defined]
        self._restore(module, live.method, (id(module), live.method))
        self.installed.pop((id(module), live.method), None)
        for mha in getattr(live, "_mhas", []):
            if self.installed.pop((id(mha), "forward"), None) is not None:
                mha.__dict__.pop("forward", None)

    def _restore(self, module: nn.Module, attr: str, key: tuple) -> None:
        """Remove what was installed under ``attr``: a shadowing method goes, a stored function
        (``self.attn_fn``) gets its original back."""
        if key in self._originals:
            module.__dict__[attr] = self._originals[key]
        else:
            module.__dict__.pop(attr, None)

    def capture(self, run: Callable[[], Any]) -> list[tuple[LiveSite, list[int]]]:
        """Run ``run()`` once more (at the shape to measure), recording every attention call's
        [batch, S_q, S_k, D] and each module's inputs (``self.inputs``)."""
        installed = self.backend
        self.revert()
        self.calls.clear()
        self.inputs.clear()
        try:
            self._run_recorded(run)
        finally:
            if installed != "eager":
                self.apply(installed)
        return list(self.calls)
