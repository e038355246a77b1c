"""Hand-written attention in Python source: every site of a file, read by named passes.

A *site* is the chain ``scores = Q Kᵀ`` -> optional scale / mask / upcast -> ``softmax``
over the last dimension -> optional dropout / cast -> ``P V``, in one block of statements
of one function. ``analyze_source`` reads every function of a file (no import) with four
passes, each one module:

1. ``chain.ChainMatcher``: match the chain around each softmax;
2. ``masks.MaskReader``: the scale and the mask, as SDPA takes them;
3. ``layout.LayoutReader``: Q, K, V in SDPA's layout, and GQA by repetition;
4. ``codegen.CallWriter``: the replacement call and the line edits.

``fastpath.FastPathReader`` reports the calls that already take a fast path and the
``nn.MultiheadAttention`` calls that materialise their weights. What cannot be proved is
reported with its reason and left as it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .chain import Chain, ChainMatcher
from .codegen import CallWriter
from .fastpath import FastPathReader
from .layout import LayoutReader
from .masks import MaskReader
from .site import Site
from .syntax import Function, const, dotted, kwarg


def function_sites(f: Function) -> list[Site]:
    """Every site in one function, each through the passes in order."""
    f.match, f.masks, f.layouts, f.writer, f.fast = (ChainMatcher(f), MaskReader(f), LayoutReader(f), CallWriter(f),
                                                     FastPathReader(f))
    out = []
    for block in f.blocks():
        for index, st in enumerate(block):
            for node in ast.walk(st):
                soft = f.match.is_softmax(node)
                if soft is not None:
                    found = f.match.build(block, index, st, node, soft)
                    site = finish(f, found) if isinstance(found, Chain) else found
                    if site is not None:
                        out.append(site)
                if isinstance(node, ast.Call):
                    fast = f.fast.fast_path(node, st, block, index)
                    if fast is not None:
                        out.append(fast)
    return out


def finish(f: Function, chain: Chain) -> Site:
    """Passes 2 to 4 on a matched chain; the site, swappable or refused with its reason."""
    site = chain.site
    weights = f.match.escaping_weights(chain)
    if weights is None:
        return site
    mask = f.masks.read(chain)
    if mask is None:
        return site
    layout = f.layouts.layout(site, chain.product, chain.value)
    if layout is None:
        return site
    q_src, k_src, v_src, out_perm = layout
    k_src, v_src, gqa = f.layouts.gqa(k_src, v_src, chain.block, chain.product["stmt"], site)
    f.writer.write(chain, q_src, k_src, v_src, out_perm, mask[0], mask[1], gqa, *weights)
    return site


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
        out += function_sites(Function(fn, source, file, qualname, types, alias))
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
