"""Every attention site of a file (a *site*: the package docstring), read without import by
four passes, each one module:

1. ``chain.ChainMatcher``: match the chain around each softmax;
2. ``masks.MaskReader``: the scale and the mask, as SDPA takes them;
3. ``layout.LayoutReader``: Q, K, V in SDPA's layout, and GQA by repetition;
4. ``codegen.CallWriter``: the replacement call and the line edits.

``fastpath.FastPathReader`` reports the calls that already take a fast path and the
``nn.MultiheadAttention`` calls that materialise their weights.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .chain import Chain, ChainMatcher, Refused
from .codegen import CallWriter
from .fastpath import FastPathReader
from .layout import LayoutReader
from .masks import MaskReader
from .site import Site, refuse
from .syntax import Function, const, dotted, kwarg


def own_nodes(st: ast.stmt):
    """The expression nodes of one statement, not those of the statements nested in it."""
    todo = [c for c in ast.iter_child_nodes(st) if not isinstance(c, ast.stmt)]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(c for c in ast.iter_child_nodes(node) if not isinstance(c, ast.stmt))


def function_sites(f: Function) -> list[Site]:
    """Every site in one function, each through the passes in order. Softmaxes that feed the
    same value product (one per branch of an ``if``, as Swin writes it) are one site."""
    f.match, f.masks, f.layouts, f.writer, f.fast = (ChainMatcher(f), MaskReader(f), LayoutReader(f), CallWriter(f),
                                                     FastPathReader(f))
    out: list[Site] = []
    chains: dict[int, Chain] = {}
    for block in f.blocks():
        for index, st in enumerate(block):
            for node in own_nodes(st):
                soft = f.match.is_softmax(node)
                if soft is not None:
                    found = f.match.build(block, index, st, node, soft)
                    if isinstance(found, Chain):
                        key = id(found.value["node"])
                        if key in chains:
                            merge(chains[key], found)
                        else:
                            chains[key] = found
                    elif found is not None:
                        out.append(found)
                    elif f.hints.get("__other__"):
                        out.append(Site(f.file, f.qualname, node.lineno, st.end_lineno, "softmax", "softmax",
                                        softmax_line=node.lineno,
                                        reason=f"the softmax at line {node.lineno} takes `{f.seg(soft[0])[:60]}`, "
                                               "which does not come from a query-key product: not attention"))
                if isinstance(node, ast.Call):
                    fast = f.fast.fast_path(node, st, block, index)
                    if fast is not None:
                        out.append(fast)
    for chain in chains.values():
        out.append(finish(f, chain))
    return out


def merge(into: Chain, other: Chain) -> None:
    """Fold a second softmax of the same value product (another branch) into ``into``."""
    seen = {id(op.node) for op in into.ops}
    into.ops += [op for op in other.ops if id(op.node) not in seen]
    into.softmaxes += [s for s in other.softmaxes if s not in into.softmaxes]
    into.elide += [n for n in other.elide if n not in into.elide]
    into.all_stmts += other.all_stmts
    into.inplace += other.inplace
    into.names |= other.names
    into.weight_names |= other.weight_names
    into.same_block = False
    into.query_bias = into.query_bias or other.query_bias
    into.site.softmax_line = min(into.site.softmax_line, other.site.softmax_line)


def finish(f: Function, chain: Chain) -> Site:
    """Passes 2 to 4 on a matched chain; the site, swappable or refused with its reason."""
    site = chain.site
    try:
        f.match.escaping(chain)
        mask = f.masks.read(chain)
        if mask is None:
            return site
        lay = f.layouts.layout(chain)
        k_src, v_src, gqa = lay["k"], lay["v"], lay["gqa"]
        if not gqa and k_src == f.seg(lay["k_node"]) and v_src == f.seg(lay["v_node"]):
            k_src, v_src, gqa = f.layouts.gqa(k_src, v_src, chain, site)
        lay["k"], lay["v"] = k_src, v_src
        f.writer.write(chain, lay["q"], k_src, v_src, lay["out_perm"], mask[0], mask[1], gqa, chain.returned,
                       lay=lay)
    except Refused as exc:
        return refuse(site, str(exc))
    return site


def attribute_types(cls: ast.ClassDef) -> dict[str, str]:
    """self.<attr> -> nn class name, from ``self.x = nn.Dropout(...)`` in the class's methods."""
    out: dict[str, str] = {}
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.value, ast.Call):
            target = dotted(node.targets[0])
            if target.startswith("self.") and target.count(".") == 1:
                cname = dotted(node.value.func).split(".")[-1]
                if cname in ("Dropout", "Softmax", "MultiheadAttention", "Linear", "Conv1d", "Conv2d"):
                    out[target[5:]] = cname
                    if cname == "Softmax":
                        dim = kwarg(node.value, "dim", 0)
                        out["__softmax_dim__" + target[5:]] = const(dim) if dim is not None else None
                if cname == "partial" and node.value.args and dotted(node.value.args[0]).split(".")[-1] == "softmax":
                    out[target[5:]] = "partial_softmax"  # self.attn_fn = partial(F.softmax, dtype=torch.float32)
                    dim = kwarg(node.value, "dim")
                    out["__softmax_dim__" + target[5:]] = const(dim) if dim is not None else None
                    dtype = kwarg(node.value, "dtype")
                    out["__softmax_upcast__" + target[5:]] = dtype is not None
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


def imported_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> full name, from the file's top-level imports: ``import torch as th`` ->
    {"th": "torch"}, ``from torch import nn, einsum`` -> {"nn": "torch.nn", "einsum":
    "torch.einsum"}."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name
                elif "." not in a.name:
                    out[a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    for short, full in (("F", "torch.nn.functional"), ("nn", "torch.nn")):
        out.setdefault(short, full)
    return out


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


def analyze_source(source: str, file: str, attr_types: dict[str, dict[str, str]] | None = None,
                   hints: dict[str, dict] | None = None) -> list[Site]:
    """Every attention site in ``source`` (a module's text). ``attr_types`` (class name ->
    attribute -> nn class) may come from a live model; otherwise from the classes' own
    ``self.x = nn.X(...)`` assignments. Raises SyntaxError for source that does not parse."""
    tree = ast.parse(source)
    alias = functional_alias(tree)
    imports = imported_names(tree)
    out = []
    classes = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}

    def types_of(cls: ast.ClassDef, depth: int = 0) -> dict[str, str]:
        """self.<attr> types of a class and of its bases defined in the same file."""
        out: dict[str, str] = {}
        for base in cls.bases:
            name = dotted(base).split(".")[-1]
            if name in classes and classes[name] is not cls and depth < 5:
                out.update(types_of(classes[name], depth + 1))
        out.update(attribute_types(cls))
        return out

    for qualname, fn, cls in functions(tree):
        types = types_of(cls) if cls is not None else {}
        if cls is not None and attr_types and cls.name in attr_types:
            types.update(attr_types[cls.name])
        fn_hints = dict((hints or {}).get(qualname, {}))
        for key in ("__other__", "__mha_lines__"):
            if hints and hints.get(key):
                fn_hints[key] = hints[key]
        out += function_sites(Function(fn, source, file, qualname, types, alias, imports, fn_hints, tree))
    seen, unique = set(), []
    for s in sorted(out, key=lambda s: (s.line, s.kind)):
        key = (s.function, s.line, s.kind, s.softmax_line)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


def python_files(path: Path) -> list[Path]:
    """``path`` when it is a file, else every .py file under the folder ``path``, sorted."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)


def analyze_path(path: Path) -> tuple[list[Site], list[str]]:
    """Sites in a .py file or every .py file under a folder; also the files that could not be
    read as Python, each as 'file: why' (``unreadable``: the line of a syntax error)."""
    sites, problems = [], []
    for f in python_files(path):
        try:
            sites += analyze_source(f.read_text(encoding="utf-8"), str(f))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError) as exc:
            problems.append(f"{f}: {unreadable(exc)}")
    return sites, problems


def unreadable(exc: Exception) -> str:
    """Why a file is not Python source, on one line: 'line 3: invalid syntax', 'not UTF-8 text
    (byte 0xff at offset 0)', 'source code string cannot contain null bytes'."""
    if isinstance(exc, SyntaxError):
        return f"line {exc.lineno}: {exc.msg}" if exc.lineno else exc.msg
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or exc})"
    return " ".join(str(exc).split())
