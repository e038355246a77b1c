"""A real client: Hermes Agent loads the installed skill, scans it, and runs workflow 1.

The skill is installed the way Hermes lays skills out, HERMES_HOME/skills/<category>/<name>/,
and read only through hermes-agent's own tools (tools.skills_tool, tools.skills_guard).
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

NAME = "optimizing-attention-flash"
#: What an installed skill holds (the rest of the repository is development files).
SKILL_FILES = ["SKILL.md", "skill.yaml", "README.md", "pyproject.toml", ".skillignore", "scripts", "references"]


def install(home: Path, files=SKILL_FILES) -> Path:
    dest = home / "skills" / "mlops" / NAME
    dest.mkdir(parents=True)
    for name in files:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def hermes(home: Path, code: str) -> dict:
    """Run ``code`` in a fresh interpreter with HERMES_HOME=home; it prints one JSON object."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HERMES_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    home = tmp_path_factory.mktemp("hermes_home")
    return home, install(home)


def test_skills_list_lists_it_with_a_description_that_fits_the_index(installed):
    home, _ = installed
    listed = hermes(home, "import json; from tools.skills_tool import skills_list; print(skills_list())")
    assert listed["success"], listed
    entry = next(s for s in listed["skills"] if s["name"] == NAME)
    assert entry["category"] == "mlops"
    short = hermes(home, "import json; from agent.skill_utils import extract_skill_description as e; "
                         "from tools.skills_tool import _parse_frontmatter as p; from pathlib import Path; import os; "
                         f"fm, _ = p(Path(os.environ['HERMES_HOME'], 'skills/mlops/{NAME}/SKILL.md').read_text()); "
                         "print(json.dumps({'index': e(fm)}))")["index"]
    assert short.startswith("Speeds up transformer attention with SDPA or flash-attn")  # Hermes' 57-char index


def test_skill_view_links_scripts_and_references_and_substitutes_the_skill_dir(installed):
    home, skill_dir = installed
    view = hermes(home, f"from tools.skills_tool import skill_view; print(skill_view({NAME!r}))")
    assert view["success"], view
    assert view["name"] == NAME and "attention" in view["tags"]
    linked = view["linked_files"]
    assert {f"scripts/{s}" for s in ("check_env.py", "enable_flash.py", "profile_attention.py",
                                     "compare_accuracy.py", "run_checklist.py")} <= set(linked["scripts"])
    assert "references/benchmarks.md" in linked["references"]
    assert "${HERMES_SKILL_DIR}" not in view["content"]
    assert f"python {skill_dir}/scripts/check_env.py --json" in view["content"]
    ref = hermes(home, f"from tools.skills_tool import skill_view; print(skill_view({NAME!r}, "
                       "'references/troubleshooting.md'))")
    assert ref["success"] and "flash-attn does not import" in ref["content"]


def test_skills_guard_scans_it_safe(installed):
    home, skill_dir = installed
    scan = hermes(home, "import json; from pathlib import Path; from tools.skills_guard import scan_skill; "
                        f"r = scan_skill(Path({str(skill_dir)!r})); "
                        "print(json.dumps({'verdict': r.verdict, 'findings': [(f.severity, f.file, f.match) "
                        "for f in r.findings]}))")
    severe = [f for f in scan["findings"] if f[0] in ("high", "critical")]
    assert scan["verdict"] == "safe", severe


def test_a_whole_clone_also_scans_safe(tmp_path):
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    tops = sorted({f.split("/")[0] for f in files} | {".skillignore"})
    skill_dir = install(tmp_path, [t for t in tops if (ROOT / t).exists()])
    assert (skill_dir / "tests").is_dir()  # development files are there, .skillignore skips them
    scan = hermes(tmp_path, "import json; from pathlib import Path; from tools.skills_guard import scan_skill; "
                            f"r = scan_skill(Path({str(skill_dir)!r})); print(json.dumps({{'verdict': r.verdict}}))")
    assert scan["verdict"] == "safe"


def test_agentskills_validate_accepts_the_installed_folder(installed):
    _, skill_dir = installed
    proc = subprocess.run([str(Path(sys.executable).parent / "agentskills"), "validate", str(skill_dir)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Valid skill" in proc.stdout


def test_an_agent_runs_workflow_1_from_the_content_hermes_returned(installed, tmp_path):
    """Take the checklist lines from skill_view's content and run each command the way an
    agent's terminal tool does: through a shell, reading stdout as JSON, on the embedded
    default model."""
    home, skill_dir = installed
    view = hermes(home, f"from tools.skills_tool import skill_view; print(skill_view({NAME!r}))")
    body = view["content"].split("## Workflow 1", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^- \[ \] .+?: `(python [^`]+)`$", body, flags=re.M)
    assert len(commands) == 4
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in commands:
        assert shlex.split(cmd)[1].startswith(str(skill_dir))
        proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=900)
        result = json.loads(proc.stdout)
        # every check passes but speed, a figure measured on a shared 2-core CI machine: the
        # speed targets are the benchmarks' (references/benchmarks.md), not a test's
        failed = [c["name"] for c in result.get("checks", []) if not c["passed"]]
        assert result["status"] in ("pass", "fail") and failed in ([], ["speed"]), (cmd, result["summary"], failed)
        assert proc.returncode == (0 if result["status"] == "pass" else 1), (cmd, proc.returncode, proc.stderr[-500:])
