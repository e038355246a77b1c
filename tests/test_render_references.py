"""checks/render_references.py, run as CI runs it, on a copy of this bundle's markdown.

Each test breaks the copy in one way and expects exit 1 with one line naming that
problem, at its file and line; the untouched copy must pass. Nothing is mocked: the
check parses with the real markdown-it-py and runs cpu-runnable blocks in a real
interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "checks" / "render_references.py"
PREFIX = "render_references: "


@dataclass
class Result:
    rc: int
    problems: list[str]
    stdout: str


def run_check(skill: Path) -> Result:
    proc = subprocess.run([sys.executable, str(CHECK), str(skill)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    lines = proc.stdout.splitlines()
    assert lines and lines[-1].startswith(PREFIX), proc.stdout + proc.stderr
    problems = [ln[len(PREFIX):] for ln in lines[:-1]]
    assert all(ln.startswith(PREFIX) for ln in lines), proc.stdout
    return Result(proc.returncode, problems, proc.stdout + proc.stderr)


@pytest.fixture
def skill(tmp_path: Path) -> Path:
    """A copy of the bundle: its markdown and everything that markdown links to."""
    dest = tmp_path / "skill"
    dest.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("SKILL.md", "README.md", "ARCHITECTURE.md", "skill.yaml"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("references", "scripts"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def append(path: Path, text: str) -> int:
    """Append ``text`` to ``path`` after a blank line; return the 1-based line its first line lands on."""
    old = path.read_text()
    if not old.endswith("\n"):
        old += "\n"
    path.write_text(old + "\n" + text)
    return len(old.splitlines()) + 2


def only_problem(result: Result) -> str:
    assert result.rc == 1, result.stdout
    assert len(result.problems) == 1, result.stdout
    return result.problems[0]


def test_the_real_bundle_passes():
    result = run_check(ROOT)
    assert result.rc == 0 and result.problems == [], result.stdout
    assert result.stdout.splitlines()[-1].startswith(f"{PREFIX}OK")


def test_the_copy_passes(skill: Path):
    result = run_check(skill)
    assert result.rc == 0 and result.problems == [], result.stdout


def test_dead_relative_link(skill: Path):
    line = append(skill / "references" / "troubleshooting.md", "See [the missing page](missing-page.md).\n")
    problem = only_problem(run_check(skill))
    assert problem.startswith(f"references/troubleshooting.md:{line}: link missing-page.md does not resolve")


def test_link_with_the_wrong_case_of_an_existing_file(skill: Path):
    assert (skill / "references" / "benchmarks.md").is_file()
    line = append(skill / "SKILL.md", "Also [the figures](references/Benchmarks.md).\n")
    problem = only_problem(run_check(skill))
    assert problem.startswith(f"SKILL.md:{line}: link references/Benchmarks.md does not resolve")
    assert "exact case" in problem


def test_dead_image_link(skill: Path):
    line = append(skill / "references" / "benchmarks.md", "![a plot](measurements/no-such-plot.png)\n")
    problem = only_problem(run_check(skill))
    assert problem.startswith(f"references/benchmarks.md:{line}: link measurements/no-such-plot.png")


def test_missing_same_file_anchor(skill: Path):
    line = append(skill / "references" / "troubleshooting.md", "See [above](#no-such-section).\n")
    problem = only_problem(run_check(skill))
    assert problem == (f"references/troubleshooting.md:{line}: link #no-such-section: "
                       "no heading in references/troubleshooting.md has the anchor #no-such-section")


def test_missing_cross_file_anchor(skill: Path):
    line = append(skill / "references" / "transformers-integration.md",
                  "See [the NaN case](troubleshooting.md#nan-in-a-float32-reference).\n")
    problem = only_problem(run_check(skill))
    assert problem == (f"references/transformers-integration.md:{line}: link "
                       "troubleshooting.md#nan-in-a-float32-reference: no heading in "
                       "references/troubleshooting.md has the anchor #nan-in-a-float32-reference")


def test_github_anchor_rule_for_punctuation_code_and_duplicates(skill: Path):
    append(skill / "references" / "troubleshooting.md",
           "## What `sdpa` does, and why\n\ntext\n\n## Notes\n\ntext\n\n## Notes\n\ntext\n\n"
           "### enable_flash.py: `--seq-len` (2048)\n\n"
           "[here](#what-sdpa-does-and-why), [second notes](#notes-1), [flag](#enable_flashpy---seq-len-2048)\n")
    append(skill / "SKILL.md", "[there](references/troubleshooting.md#what-sdpa-does-and-why)\n")
    result = run_check(skill)
    assert result.rc == 0, result.stdout


def test_anchor_rule_does_not_keep_backticks_or_commas(skill: Path):
    append(skill / "references" / "troubleshooting.md",
           "## What `sdpa` does, and why\n\n[wrong](#what-sdpa-does,-and-why)\n")
    problem = only_problem(run_check(skill))
    assert "has the anchor" in problem


def test_table_row_with_a_missing_cell(skill: Path):
    line = append(skill / "references" / "benchmarks.md",
                  "| seq_len | eager | sdpa |\n|---|---|---|\n| 256 | 30.2 ms | 33.8 ms |\n| 512 | 75.3 ms |\n")
    problem = only_problem(run_check(skill))
    assert problem == f"references/benchmarks.md:{line + 3}: table row has 2 cells, its header 3"


def test_table_cells_split_on_unescaped_pipes_only(skill: Path):
    append(skill / "references" / "troubleshooting.md",
           "| error | meaning |\n|---|---|\n| `a \\| b` | escaped pipe, one cell |\n")
    assert run_check(skill).rc == 0
    line = append(skill / "references" / "troubleshooting.md",
                  "| error | meaning |\n|---|---|\n| `a | b` | a code span does not protect a pipe |\n")
    problem = only_problem(run_check(skill))
    assert problem == f"references/troubleshooting.md:{line + 2}: table row has 3 cells, its header 2"


def test_python_block_that_does_not_compile(skill: Path):
    line = append(skill / "references" / "transformers-integration.md",
                  "```python\nimport torch\nmodel.set_attn_implementation(\"sdpa\"\n```\n")
    problem = only_problem(run_check(skill))
    assert problem.startswith(f"references/transformers-integration.md:{line + 2}: python block "
                              f"(fence at line {line}) does not compile: SyntaxError")


def test_links_and_python_inside_other_code_blocks_are_not_checked(skill: Path):
    append(skill / "README.md",
           "```bash\n[not a link](missing.md) && python -c 'def ('\n```\n\n"
           "    [indented code](missing.md)\n\nInline `[code](missing.md)` too.\n")
    assert run_check(skill).rc == 0


def test_cpu_runnable_block_that_raises(skill: Path):
    line = append(skill / "references" / "transformers-integration.md",
                  "```python cpu-runnable\nimport torch\nraise RuntimeError(\"kernel refused the inputs\")\n```\n")
    problem = only_problem(run_check(skill))
    assert problem == (f"references/transformers-integration.md:{line}: cpu-runnable python block exited 1: "
                       "RuntimeError: kernel refused the inputs")


def test_valid_cpu_runnable_block_passes_in_the_skill_root_offline(skill: Path):
    append(skill / "references" / "transformers-integration.md",
           "```python cpu-runnable\n"
           "import os\n"
           "from pathlib import Path\n"
           "import torch\n"
           "import torch.nn.functional as F\n"
           "assert Path('SKILL.md').is_file(), os.getcwd()\n"
           "assert os.environ['HF_HUB_OFFLINE'] == '1'\n"
           "q = k = v = torch.randn(1, 2, 8, 4)\n"
           "out = F.scaled_dot_product_attention(q, k, v, is_causal=True)\n"
           "assert out.shape == (1, 2, 8, 4)\n"
           "```\n")
    result = run_check(skill)
    assert result.rc == 0, result.stdout


def test_plain_python_block_is_compiled_but_not_run(skill: Path):
    append(skill / "references" / "transformers-integration.md", "```python\nraise SystemExit(3)\n```\n")
    assert run_check(skill).rc == 0


def test_a_folder_without_skill_md_exits_2(tmp_path: Path):
    result = run_check(tmp_path)
    assert result.rc == 2 and "cannot read the bundle" in result.stdout
