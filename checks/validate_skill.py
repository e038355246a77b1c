#!/usr/bin/env python3
"""validate_skill: SKILL.md, skill.yaml, the scripts and the references agree.

Checks, each failure one line:

frontmatter (agentskills.io, through the skills-ref package's own parser and validator):
  - it parses as strict YAML (block-style lists only) and has only the allowed top-level
    fields (name, description, license, compatibility, metadata, allowed-tools);
  - name, description and compatibility pass skills-ref's rules, and the name would
    match the folder the skill is installed in (<skills>/<category>/<name>/);
frontmatter (Hermes Agent):
  - name is kebab-case; the first 57 characters of description (what Hermes' index
    shows) end on a word boundary and mention attention;
  - metadata holds version, author, dependencies and hermes.tags (a list);
  - skill.yaml's name, version, description, license and author equal the frontmatter's;
body:
  - under 300 lines;
  - every `- [ ]` line is `- [ ] TITLE: `python ${HERMES_SKILL_DIR}/scripts/STEP.py ...``,
    exactly one command; the lines, in order, are skill.yaml's steps (title and run);
  - every script a step names exists, and --help of every scripts/*.py exits 0;
  - every relative path named in SKILL.md and references/*.md exists with its exact
    case: markdown links relative to the file, paths in text (scripts/..., references/...,
    checks/..., tests/...) relative to the skill folder.

usage: python checks/validate_skill.py [SKILL_DIR]   (default: this bundle)
exit codes: 0 all good, 1 a problem found, 2 the bundle could not be read
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from attnkit.steps.run_checklist import CHECKLIST_LINE, checklist_lines, load_manifest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import exists_exact, report  # noqa: E402

MAX_BODY_LINES = 300
HERMES_INDEX_CHARS = 57  # Hermes' skills index shows description[:57] + "..." (agent/skill_utils.py)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
NAMED_PATH = re.compile(r"(?<![\w/.${}-])((?:scripts|references|checks|tests)/[\w./-]*[\w/])")


def frontmatter_problems(root: Path, text: str) -> tuple[list[str], dict, str]:
    from skills_ref.errors import ParseError
    from skills_ref.parser import parse_frontmatter
    from skills_ref.validator import validate_metadata

    out = []
    try:
        strict, _ = parse_frontmatter(text)
    except ParseError as exc:
        return [f"SKILL.md frontmatter: {' '.join(str(exc).split())[:300]}"], {}, ""
    meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    body = text.split("---", 2)[2]
    name = str(strict.get("name", ""))
    for problem in validate_metadata(strict, Path("skills") / "mlops" / name):
        out.append(f"SKILL.md frontmatter: {problem}")
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name):
        out.append(f"SKILL.md frontmatter: name {name!r} is not kebab-case")
    desc = " ".join(str(meta.get("description", "")).split())
    head = desc[:HERMES_INDEX_CHARS]
    if len(desc) > HERMES_INDEX_CHARS and desc[HERMES_INDEX_CHARS - 1].isalnum() and desc[HERMES_INDEX_CHARS].isalnum():
        out.append(f"SKILL.md frontmatter: description's first {HERMES_INDEX_CHARS} characters, which Hermes' "
                   f"index shows, end mid-word: {head!r}")
    if "attention" not in head.lower():
        out.append(f"SKILL.md frontmatter: description's first {HERMES_INDEX_CHARS} characters do not say what the "
                   f"skill does (no 'attention'): {head!r}")
    metadata = meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {}
    for key in ("version", "author", "dependencies"):
        if not metadata.get(key):
            out.append(f"SKILL.md frontmatter: metadata.{key} is missing")
    tags = (metadata.get("hermes") or {}).get("tags") if isinstance(metadata.get("hermes"), dict) else None
    if not isinstance(tags, list) or not tags or not all(isinstance(t, str) for t in tags):
        out.append("SKILL.md frontmatter: metadata.hermes.tags must be a non-empty list of strings")
    manifest = load_manifest(root).meta
    for key, value in (("name", meta.get("name")), ("version", metadata.get("version")),
                       ("description", meta.get("description")), ("license", meta.get("license")),
                       ("author", metadata.get("author"))):
        if " ".join(str(manifest.get(key, "")).split()) != " ".join(str(value or "").split()):
            out.append(f"skill.yaml {key} {manifest.get(key)!r} differs from SKILL.md's {value!r}")
    return out, meta, body


def checklist_problems(root: Path, body: str, offset: int = 0) -> list[str]:
    """``offset``: lines before the body, so problems name SKILL.md's own line numbers."""
    out = []
    lines = checklist_lines(body)
    for n, title, run in lines:
        if not run or "`" in title:
            out.append(f"SKILL.md body line {n + offset}: not a checklist line with exactly one command: "
                       f"'- [ ] TITLE: `python ${{HERMES_SKILL_DIR}}/scripts/STEP.py ...`'")
    manifest = load_manifest(root)
    steps = [(s.title, s.run) for w in manifest.workflows for s in w.steps]
    found = [(t, r) for _, t, r in lines if r and "`" not in t]
    for title, run in found:
        if (title, run) not in steps:
            out.append(f"SKILL.md checklist line {title!r} (`{run}`) is no skill.yaml step with that title and run")
    for title, run in steps:
        if (title, run) not in found:
            out.append(f"skill.yaml step {title!r} (`{run}`) is no SKILL.md checklist line")
    if set(found) == set(steps) and found != steps:
        out.append("SKILL.md's checklist lines are not in skill.yaml's step order")
    for w in manifest.workflows:
        for s in w.steps:
            if not CHECKLIST_LINE.match(f"- [ ] {s.title}: `{s.run}`"):
                out.append(f"skill.yaml step {s.id}: run {s.run!r} is not one python ${{HERMES_SKILL_DIR}}/scripts "
                           "command")
            elif not (root / "scripts" / s.script).is_file():
                out.append(f"skill.yaml step {s.id}: script scripts/{s.script} does not exist")
    return out


def script_problems(root: Path) -> list[str]:
    """--help of every scripts/*.py exits 0 (run side by side: each one imports torch)."""
    from concurrent.futures import ThreadPoolExecutor

    def helps(path: Path) -> str | None:
        proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            return None
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        return f"scripts/{path.name} --help exited {proc.returncode}: {tail}"

    with ThreadPoolExecutor(max_workers=4) as pool:
        return [p for p in pool.map(helps, sorted((root / "scripts").glob("*.py"))) if p]


def path_problems(root: Path) -> list[str]:
    out = []
    for md in [root / "SKILL.md", *sorted((root / "references").rglob("*.md"))]:
        text = md.read_text()
        prose = re.sub(r"\]\([^)]*\)", "]", text)  # links are checked below, relative to the file
        for rel in sorted(set(NAMED_PATH.findall(prose))):
            if not exists_exact(root, rel.rstrip("/")):
                out.append(f"{md.relative_to(root)}: names {rel}, which does not exist (exact case)")
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            rel = target.split("#", 1)[0]
            if not exists_exact(md.parent, rel):
                out.append(f"{md.relative_to(root)}: link {target} does not resolve (exact case)")
    return out


def problems(root: Path) -> list[str]:
    text = (root / "SKILL.md").read_text()
    out, meta, body = frontmatter_problems(root, text)
    if body:
        lines = body.strip("\n").count("\n") + 1
        if lines >= MAX_BODY_LINES:
            out.append(f"SKILL.md body has {lines} lines; keep it under {MAX_BODY_LINES}")
        out += checklist_problems(root, body, text[: len(text) - len(body)].count("\n"))
    return out + script_problems(root) + path_problems(root)


def main(argv: list[str]) -> int:
    root = Path(argv[0]).resolve() if argv else ROOT
    try:
        import skills_ref  # noqa: F401
    except ImportError as exc:
        print(f"validate_skill: needs the skills-ref package (pip install -e '.[test]'): {exc}")
        return 2
    # an unreadable bundle: a missing SKILL.md or skill.yaml, bad YAML, a manifest without workflows
    return report("validate_skill", problems, root, (Exception,))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
