"""The library's layers hold: every import points down, and no module is part of a cycle.

The layers themselves are import-linter's ``layers`` contract in pyproject.toml
(``lint-imports`` runs it in CI); these tests read the same import graph (grimp, the
library import-linter is built on), which counts imports inside functions as any other.
"""

import os
import subprocess
import sys
from pathlib import Path

import grimp
from conftest import ROOT

PACKAGE = "attnkit"


def _graph():
    return grimp.build_graph(PACKAGE)


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    modules = sorted(graph.modules)
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for m in modules:
        if m not in index:
            visit(m)
    return out


def test_no_import_cycle_among_the_modules():
    assert cycles(_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = _graph()
    graph.add_import(importer="attnkit.env", imported="attnkit.steps.enable_flash")
    assert any("attnkit.env" in c and "attnkit.steps.enable_flash" in c for c in cycles(graph))


def test_layers_contract_is_kept():
    lint = Path(sys.executable).parent / "lint-imports"  # the console script of import-linter
    proc = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "scripts")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_scripts_import_only_steps_and_cli():
    for script in sorted((ROOT / "scripts").glob("*.py")):
        for line in script.read_text().splitlines():
            if line.startswith(("from attnkit", "import attnkit")):
                target = line.split()[1]
                assert target in ("attnkit", "attnkit.steps") or target.startswith("attnkit.steps.") or \
                    (target == "attnkit" and "import cli" in line), (script.name, line)
                if target == "attnkit":
                    assert line.split("import", 1)[1].split("#")[0].strip() == "cli", (script.name, line)
