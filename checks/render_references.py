#!/usr/bin/env python3
"""render_references: the bundle's markdown renders, and what it points at exists.

For SKILL.md, README.md and every references/**/*.md (a leading YAML frontmatter is
skipped, as GitHub does), each failure one line:
  - the file renders with markdown-it-py (`MarkdownIt("commonmark").enable("table")`);
  - every relative link and image (from markdown-it's tokens, so code blocks don't count)
    names a file or folder that exists relative to the markdown file, with its exact case,
    compared part by part; links with a URL scheme (https:, mailto: ...) are not checked;
  - every `#anchor`, same-file or in another .md file, names a heading of that file.
    Anchors follow GitHub's rule: the heading's plain text (inline code as its text),
    lowercased, every character that is not a letter, digit, underscore, hyphen or space
    dropped, each space replaced by a hyphen; a repeated anchor gets -1, -2, ... appended;
  - every table row has as many cells as its header, counted on the source lines
    (markdown-it pads or truncates silently): cells split on each `|` not preceded by a
    backslash, pipes in code spans included (as GFM does), one leading and one trailing
    pipe ignored;
  - every fenced block whose info string starts with `python` compiles;
  - every python block whose info string also has the word `cpu-runnable` exits 0 when run
    on its own: `python -c BLOCK`, in the skill root, with HF_HUB_OFFLINE=1, within 300 s.

usage: python checks/render_references.py [SKILL_DIR]   (default: this bundle)
exit codes: 0 all good, 1 a problem found, 2 the bundle could not be read
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

from markdown_it import MarkdownIt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import exists_exact, report  # noqa: E402

NAME = "render_references"
RUNNABLE = "cpu-runnable"
RUN_TIMEOUT_S = 300
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")
CELL_SPLIT = re.compile(r"(?<!\\)\|")
QUOTE_PREFIX = re.compile(r"^\s*(?:>\s?)*")

MD = MarkdownIt("commonmark").enable("table")


def slug(text: str) -> str:
    """GitHub's heading anchor, before duplicate suffixes."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def heading_text(inline) -> str:
    """A heading's plain text: text and inline code as written, markup dropped."""
    parts = []
    for child in inline.children or []:
        if child.type in ("text", "code_inline", "image"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
    return "".join(parts).strip()


def anchors(tokens) -> set[str]:
    """Every anchor GitHub gives the headings in ``tokens``, duplicates suffixed -1, -2 ..."""
    seen: dict[str, int] = {}
    out = set()
    for i, tok in enumerate(tokens):
        if tok.type != "heading_open":
            continue
        base = result = slug(heading_text(tokens[i + 1]))
        while result in seen:
            seen[base] += 1
            result = f"{base}-{seen[base]}"
        seen[result] = 0
        out.add(result)
    return out


def link_line(lines: list[str], span: list[int] | None, target: str) -> int:
    """The 1-based line in ``span`` that holds ``target``, or the span's first line."""
    if not span:
        return 1
    for n in range(span[0], min(span[1], len(lines))):
        if target in lines[n] or unquote(target) in lines[n]:
            return n + 1
    return span[0] + 1


def without_frontmatter(lines: list[str]) -> list[str]:
    """``lines`` with a leading YAML frontmatter blanked (GitHub shows it as a table, not markdown).

    Blank lines keep every later line number; markdown-it would read the frontmatter as a
    rule and a setext heading.
    """
    if lines[:1] == ["---"] and "---" in lines[1:]:
        end = lines.index("---", 1)
        return [""] * (end + 1) + lines[end + 1:]
    return lines


def cell_count(line: str) -> int:
    row = line.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    return len(CELL_SPLIT.split(row))


class Bundle:
    def __init__(self, root: Path):
        self.root = root
        self.parsed: dict[Path, tuple[list[str], list]] = {}
        self.anchor_cache: dict[Path, set[str]] = {}

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def parse(self, path: Path):
        if path not in self.parsed:
            lines = without_frontmatter(path.read_text(encoding="utf-8").splitlines())
            self.parsed[path] = (lines, MD.parse("\n".join(lines) + "\n"))
        return self.parsed[path]

    def anchors_of(self, path: Path) -> set[str]:
        if path not in self.anchor_cache:
            self.anchor_cache[path] = anchors(self.parse(path)[1])
        return self.anchor_cache[path]

    def check(self, md: Path) -> list[str]:
        name = self.rel(md)
        try:
            lines, tokens = self.parse(md)
            MD.renderer.render(tokens, MD.options, {})
        except (OSError, UnicodeDecodeError):
            raise
        except Exception as exc:  # noqa: BLE001 - any rendering failure is the finding
            return [f"{name}:1: markdown-it could not render it: {type(exc).__name__}: {exc}"]
        out: list[str] = []
        quote_depth = 0
        for tok in tokens:
            if tok.type == "blockquote_open":
                quote_depth += 1
            elif tok.type == "blockquote_close":
                quote_depth -= 1
            elif tok.type == "inline":
                out += self.links(md, name, lines, tok)
            elif tok.type == "table_open":
                out += self.table(name, lines, tok, quote_depth)
            elif tok.type == "fence" and tok.info.split()[:1] == ["python"]:
                out += self.python(name, tok)
        return out

    def links(self, md: Path, name: str, lines: list[str], inline) -> list[str]:
        out = []
        for child in inline.children or []:
            if child.type not in ("link_open", "image"):
                continue
            target = str(child.attrs.get("href" if child.type == "link_open" else "src", ""))
            if SCHEME.match(target):
                continue
            where = f"{name}:{link_line(lines, inline.map, target)}"
            if not target:
                out.append(f"{where}: empty link target")
                continue
            path_part, _, fragment = target.partition("#")
            path_part, fragment = unquote(path_part), unquote(fragment)
            if path_part:
                base = self.root if path_part.startswith("/") else md.parent
                found = exists_exact(base, path_part.lstrip("/"))
                if found is None:
                    out.append(f"{where}: link {target} does not resolve (no such file, with this exact case)")
                    continue
            else:
                found = md
            if fragment and found.suffix.lower() == ".md" and found.is_file():
                try:
                    known = self.anchors_of(found)
                except (OSError, UnicodeDecodeError) as exc:
                    out.append(f"{where}: link {target}: cannot read {self.rel(found)}: {exc}")
                    continue
                if fragment not in known:
                    out.append(f"{where}: link {target}: no heading in {self.rel(found)} has the anchor #{fragment}")
        return out

    def table(self, name: str, lines: list[str], tok, quote_depth: int) -> list[str]:
        out = []
        start, end = tok.map
        rows = [lines[n] for n in range(start, end)]
        if quote_depth:
            rows = [QUOTE_PREFIX.sub("", r, count=1) for r in rows]
        expected = cell_count(rows[0])
        for n, row in enumerate(rows):
            if n == 1 or not row.strip():
                continue  # the delimiter row: markdown-it only makes a table when it matches
            found = cell_count(row)
            if found != expected:
                out.append(f"{name}:{start + n + 1}: table row has {found} cells, its header {expected}")
        return out

    def python(self, name: str, tok) -> list[str]:
        fence_line = tok.map[0] + 1
        try:
            compile(tok.content, f"{name}:{fence_line}", "exec")
        except SyntaxError as exc:
            line = fence_line + (exc.lineno or 1)
            return [f"{name}:{line}: python block (fence at line {fence_line}) does not compile: "
                    f"{type(exc).__name__}: {exc.msg}"]
        if RUNNABLE not in tok.info.split():
            return []
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        try:
            proc = subprocess.run([sys.executable, "-c", tok.content], cwd=self.root, env=env,
                                  capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return [f"{name}:{fence_line}: {RUNNABLE} python block ran past {RUN_TIMEOUT_S} s"]
        if proc.returncode != 0:
            last = ([ln for ln in proc.stderr.splitlines() if ln.strip()] or ["(no stderr)"])[-1].strip()
            return [f"{name}:{fence_line}: {RUNNABLE} python block exited {proc.returncode}: {last}"]
        return []


def markdown_files(root: Path) -> list[Path]:
    if not (root / "SKILL.md").is_file():
        raise FileNotFoundError(f"no SKILL.md in {root}")
    files = [root / "SKILL.md"] + [p for p in [root / "README.md", root / "ARCHITECTURE.md"] if p.is_file()]
    return files + sorted((root / "references").rglob("*.md"))


def problems(root: Path) -> list[str]:
    bundle = Bundle(root)
    return [p for md in markdown_files(root) for p in bundle.check(md)]


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    return report(NAME, problems, root, (OSError, UnicodeDecodeError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
