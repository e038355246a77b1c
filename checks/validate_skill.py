#!/usr/bin/env python3
"""validate_skill: SKILL.md, skill.yaml, the scripts and the references agree.

Checks, each failure one line:
  - SKILL.md has YAML frontmatter with a kebab-case `name` and a `description`;
  - every checklist line `- [ ] TITLE: `COMMAND`` in SKILL.md is a step of skill.yaml with
    that exact title and run command, and every skill.yaml step is such a line;
  - every script a command names exists in scripts/ and its --help exits 0;
  - every relative link in SKILL.md and references/*.md points to a file that exists,
    with its exact case.

usage: python checks/validate_skill.py [SKILL_DIR]   (default: this bundle)
exit codes: 0 all good, 1 a problem found, 2 the bundle could not be read
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

CHECKLIST = re.compile(r"^- \[ \] (?P<title>.+?): `(?P<run>python \$\{HERMES_SKILL_DIR\}/scripts/[^`]+)`\s*$")
SCRIPT = re.compile(r"\$\{HERMES_SKILL_DIR\}/scripts/([\w.-]+\.py)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def frontmatter(text: str) -> tuple[dict, str]:
    if not text.startswith("---\n"):
        raise ValueError("SKILL.md does not start with '---' frontmatter")
    end = text.index("\n---", 4)
    return yaml.safe_load(text[4:end]) or {}, text[end + 4:]


def exists_exact(base: Path, rel: str) -> bool:
    """True when ``rel`` exists under ``base`` with exactly this case, part by part."""
    here = base
    for part in Path(rel).parts:
        if part in (".", ""):
            continue
        if part == "..":
            here = here.parent
            continue
        if not here.is_dir() or part not in {p.name for p in here.iterdir()}:
            return False
        here = here / part
    return True


def problems(root: Path) -> list[str]:
    out: list[str] = []
    meta, body = frontmatter((root / "SKILL.md").read_text())
    name = meta.get("name", "")
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", str(name)):
        out.append(f"SKILL.md: name {name!r} is not kebab-case")
    if not meta.get("description"):
        out.append("SKILL.md: no description")
    manifest = yaml.safe_load((root / "skill.yaml").read_text())
    steps = {(s["title"], s["run"]) for w in manifest.get("workflows", []) for s in w.get("steps", [])}
    lines = set()
    for n, line in enumerate(body.splitlines(), 1):
        if line.startswith("- [ ]"):
            m = CHECKLIST.match(line)
            if not m:
                out.append(f"SKILL.md body line {n}: checklist line not of the form '- [ ] TITLE: `python "
                           "${{HERMES_SKILL_DIR}}/scripts/STEP.py ...`'")
                continue
            lines.add((m["title"], m["run"]))
    for title, run in sorted(lines - steps):
        out.append(f"SKILL.md checklist line {title!r} has no skill.yaml step with that title and command")
    for title, run in sorted(steps - lines):
        out.append(f"skill.yaml step {title!r} is not a SKILL.md checklist line with that command")
    scripts = {s for _, run in steps | lines for s in SCRIPT.findall(run)}
    for script in sorted(scripts):
        path = root / "scripts" / script
        if not path.is_file():
            out.append(f"script {script} does not exist in scripts/")
            continue
        proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            out.append(f"{script} --help exited {proc.returncode}: {proc.stderr.strip()[-200:]}")
    for md in [root / "SKILL.md", *sorted((root / "references").glob("*.md"))]:
        for target in LINK.findall(md.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            rel = target.split("#", 1)[0]
            if not exists_exact(md.parent, rel):
                out.append(f"{md.relative_to(root)}: link {target} does not resolve (exact case)")
    return out


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    try:
        found = problems(root)
    except (OSError, ValueError, yaml.YAMLError, KeyError) as exc:
        print(f"validate_skill: cannot read the bundle at {root}: {type(exc).__name__}: {exc}")
        return 2
    for p in found:
        print(f"validate_skill: {p}")
    print(f"validate_skill: {'OK' if not found else f'{len(found)} problem(s)'} ({root})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
