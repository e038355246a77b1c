"""What the bundle's validators share: exact-case path lookup and the report-and-exit main."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def exists_exact(base: Path, rel: str) -> Path | None:
    """The path ``rel`` names under ``base`` when it exists with exactly this case, else None.

    Compared part by part with os.listdir, so a case-insensitive file system cannot hide
    a wrong case.
    """
    here = base
    for part in Path(rel).parts:
        if part in (".", ""):
            continue
        if part == "..":
            here = here.parent
            continue
        if not here.is_dir() or part not in os.listdir(here):
            return None
        here = here / part
    return here


def report(name: str, problems: Callable[[Path], list[str]], root: Path,
           unreadable: tuple[type[BaseException], ...]) -> int:
    """Print one line per problem and a final OK / count line; exit 0 all good, 1 a
    problem found, 2 the bundle could not be read (one of ``unreadable`` was raised)."""
    try:
        found = problems(root)
    except unreadable as exc:
        print(f"{name}: cannot read the bundle at {root}: {type(exc).__name__}: {exc}")
        return 2
    for p in found:
        print(f"{name}: {p}")
    print(f"{name}: {'OK' if not found else f'{len(found)} problem(s)'} ({root})")
    return 1 if found else 0
