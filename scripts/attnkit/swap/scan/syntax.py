"""The syntax every pass reads: names of torch functions, small AST helpers, and the
``Function`` being analysed (its statements, definitions and the types of ``self.<attr>``).
"""

from __future__ import annotations

import ast
import re
from typing import Any

SDPA_FUNCS = {"F.scaled_dot_product_attention", "torch.nn.functional.scaled_dot_product_attention",
              "nn.functional.scaled_dot_product_attention", "scaled_dot_product_attention"}
FLASH_FUNCS = {"flash_attn_func", "flash_attn.flash_attn_func", "flash_attn_varlen_func",
               "flash_attn_interface.flash_attn_func", "flash_attn_qkvpacked_func"}
UPCASTS = {"float", "double"}
CASTS = {"type_as", "to", "half", "bfloat16", "float", "type", "double"}

# Canonical names (``Function.canon``), whatever alias a file uses.
CANON_SOFTMAX = {"torch.softmax", "torch.nn.functional.softmax", "torch.special.softmax"}
CANON_DROPOUT = {"torch.nn.functional.dropout", "torch.dropout"}
CANON_EINSUM = {"torch.einsum", "torch.functional.einsum"}
#: methods that only reshape, reorder or broadcast a tensor
SHAPE_METHODS = {"view", "reshape", "permute", "transpose", "unsqueeze", "squeeze", "contiguous", "flatten",
                 "expand", "expand_as", "view_as", "reshape_as"}
#: reads of a tensor that use its metadata, not its values
META_ATTRS = {"shape", "size", "dtype", "device", "dim", "ndim", "new_ones", "new_zeros", "new_full", "new_empty",
              "new_tensor", "is_cuda", "layout", "numel"}


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


def assigned_name(st: ast.AST) -> str | None:
    """The name a plain ``name = value`` statement assigns; None for any other statement."""
    if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
        return st.targets[0].id
    return None


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
    if call.startswith("(") and call.endswith(")"):  # (A if COND else B): one part a line, each wrapped
        parts = _conditional_parts(call[1:-1])
        if parts:
            indent = " " * (len(prefix) - len(prefix.lstrip()) + 4)
            a, cond, b = parts
            return ([prefix + "("] + wrap(indent, a, "", width) + [f"{indent}if {cond}"] +
                    wrap(f"{indent}else ", b, "", width) + [" " * (len(indent) - 4) + ")" + suffix])
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


def _conditional_parts(text: str) -> tuple[str, str, str] | None:
    """(A, COND, B) of ``A if COND else B`` at bracket depth 0, or None."""
    depth, marks = 0, []
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and (text.startswith(" if ", i) or text.startswith(" else ", i)):
            marks.append(i)
    if len(marks) != 2 or not text.startswith(" if ", marks[0]) or not text.startswith(" else ", marks[1]):
        return None
    return text[:marks[0]].strip(), text[marks[0] + 4:marks[1]].strip(), text[marks[1] + 6:].strip()


class Function:
    """One function (def) of one file, and the passes that read it (set by ``analysis``):
    ``match`` (the chain), ``masks`` (scale and mask), ``layouts`` (operand layouts, GQA),
    ``writer`` (the replacement call and its edits), ``fast`` (calls already fused)."""

    def __init__(self, fn: ast.FunctionDef, source: str, file: str, qualname: str, attr_types: dict[str, str],
                 functional: str, imports: dict[str, str] | None = None, hints: dict | None = None,
                 module: ast.Module | None = None):
        self.fn, self.source, self.file, self.qualname = fn, source, file, qualname
        self.attr_types = attr_types  # self.<attr> -> class name (nn.Dropout, nn.Softmax, ...)
        self.functional = functional  # how this file names torch.nn.functional: "F" or "torch.nn.functional"
        self.imports = imports or {}  # local name -> what it names ("th" -> "torch", "einsum" -> "torch.einsum")
        self.hints = hints or {}  # facts a live run knows: softmax line -> rank of the scores
        self.module = module  # the file's tree: its helper functions can be read
        self.lines = source.splitlines()
        self.match: Any = None
        self.masks: Any = None
        self.layouts: Any = None
        self.writer: Any = None
        self.fast: Any = None

    def canon(self, node: ast.AST) -> str:
        """The dotted name of ``node`` with the file's aliases resolved: ``th.einsum`` and a bare
        ``einsum`` imported from torch are both 'torch.einsum'; ``F.softmax`` is
        'torch.nn.functional.softmax'."""
        name = dotted(node)
        if not name:
            return ""
        head, _, rest = name.partition(".")
        full = self.imports.get(head)
        if full is None:
            return name
        return f"{full}.{rest}" if rest else full

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
            if assigned_name(st) == name:
                return i, st.value
            if name in self.stored(st):
                return None
        return None

    @staticmethod
    def stored(st: ast.stmt) -> set[str]:
        return {n.id for n in ast.walk(st) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}

    def attr_type(self, node: ast.AST) -> str:
        name = dotted(node)
        return self.attr_types.get(name[5:], "") if name.startswith("self.") else ""

    @staticmethod
    def char(line: str, byte_offset: int) -> int:
        """ast column offsets count UTF-8 bytes."""
        return len(line.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore"))

    @staticmethod
    def paren(src: str) -> str:
        return src if re.fullmatch(r"[\w.]+(\([^()]*\))?", src) else f"({src})"
