"""The permanent change: a site's line edits applied to source, and the unified diff.

``apply_edits`` rewrites text by line ranges (the run-time swap compiles its function from
the result; the patch shows the same change); ``patch_of`` is the diff of every verified
swap of a ``live.Swapper``, which ``git apply`` takes.
"""

from __future__ import annotations

import ast
import difflib
import os
from pathlib import Path
from typing import Any, Iterable

from ..backends import BACKENDS


def apply_edits(source: str, edits: list[tuple[int, int, list[str]]]) -> str:
    """``source`` with line-range edits applied (ranges must not overlap)."""
    lines = source.splitlines(keepends=True)
    end = "\n" if source.endswith("\n") else ""
    for first, last, new in sorted(edits, key=lambda e: -e[0]):
        lines[first - 1: last] = [ln + "\n" for ln in new]
    text = "".join(lines)
    return text if text.endswith("\n") or not end else text + end


def unified_diff(edits_by_file: dict[str, list[tuple[int, int, list[str]]]]) -> str:
    """The line edits of each file as one unified diff, with ``a/`` and ``b/`` paths relative to
    ``patch_root`` of the files, where ``git apply`` (or ``patch -p1``) takes it."""
    chunks: list[str] = []
    root = patch_root(edits_by_file)
    for file, edits in sorted(edits_by_file.items()):
        old = Path(file).read_text()
        new = apply_edits(old, list({e[0]: e for e in edits}.values()))
        rel = Path(os.path.relpath(Path(file).resolve(), root)).as_posix()
        chunks += difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                       fromfile=f"a/{rel}", tofile=f"b/{rel}")
    return "".join(chunks)


def patch_root(files: Iterable[str]) -> Path:
    """The folder a patch of ``files`` is applied in, so that each path in it is relative and
    below it (``git apply`` refuses an absolute path or one with ``..``): the working
    directory when every file is under it; else the top of the git work tree holding them
    all; else their nearest common folder."""
    paths = [Path(f).resolve() for f in files]
    cwd = Path.cwd().resolve()
    if not paths or all(cwd in p.parents for p in paths):
        return cwd
    common = Path(os.path.commonpath([p.parent for p in paths]))
    for folder in (common, *common.parents):
        if (folder / ".git").exists():
            return folder
    return common


def patch_of(swapper: Any) -> str:
    """The source change of every verified swap of ``swapper`` (a ``live.Swapper``), as one
    unified diff; a FlashAttention variant adds its import (``Backend.source_import``: for
    FA4 a try/except that leaves the name None, so the written call falls back to SDPA)
    after the file's last top-level import, where the file lacks it."""
    by_file: dict[str, list[tuple]] = {file: [] for file in patched_files(swapper)}
    for live in swapper.sites.values():
        if live.status == "swapped" and live.site is not None:
            by_file[live.site.file].extend(swapper.edits_for(live, swapper.target))
    if swapper.target != "sdpa":
        record = BACKENDS[swapper.target]
        for file, edits in by_file.items():
            old = Path(file).read_text()
            if record.source_name not in old.split("\n\n\n")[0]:
                line = _last_import_line(old)
                edits.append((line, line, [old.splitlines()[line - 1], *record.source_import]))
    return unified_diff(by_file)


def patched_files(swapper: Any) -> list[str]:
    """The source files ``patch_of(swapper)`` changes: those of its verified swaps."""
    return sorted({live.site.file for live in swapper.sites.values() if live.status == "swapped"
                   and live.site is not None})


def _last_import_line(source: str) -> int:
    """The last line of the module's top-level imports (1 when it has none)."""
    last = 1
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            last = node.end_lineno
    return last
