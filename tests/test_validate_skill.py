"""checks/validate_skill.py passes on the bundle and fails on copies broken one way each."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

CHECK = ROOT / "checks" / "validate_skill.py"


def run_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(root)], capture_output=True, text=True, timeout=900)


@pytest.fixture
def bundle(tmp_path):
    dest = tmp_path / "optimizing-attention-flash"
    dest.mkdir()
    for name in ("SKILL.md", "skill.yaml", "scripts", "references"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, count))


def assert_fails(root: Path, *phrases: str) -> str:
    proc = run_check(root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for phrase in phrases:
        assert phrase in proc.stdout, proc.stdout
    return proc.stdout


def test_the_bundle_passes():
    proc = run_check(ROOT)
    assert proc.returncode == 0, proc.stdout
    assert "validate_skill: OK" in proc.stdout


def test_a_dead_link_in_references_fails(bundle):
    edit(bundle / "references" / "algorithm.md", "[benchmarks.md](benchmarks.md)", "[benchmarks](benchmark.md)")
    assert_fails(bundle, "references/algorithm.md: link benchmark.md does not resolve")


def test_a_path_with_the_wrong_case_fails(bundle):
    edit(bundle / "SKILL.md", "[references/benchmarks.md](references/benchmarks.md)",
         "[references/benchmarks.md](references/Benchmarks.md)")
    assert_fails(bundle, "link references/Benchmarks.md does not resolve (exact case)")
    edit(bundle / "references" / "advanced-features.md", "`scripts/check_features.py`", "`scripts/Check_features.py`")
    assert_fails(bundle, "names scripts/Check_features.py, which does not exist")


def test_a_drifted_checklist_line_fails(bundle):
    edit(bundle / "SKILL.md", "- [ ] Verify the speedup by profiling:", "- [ ] Verify the speed-up by profiling:")
    assert_fails(bundle, "'Verify the speed-up by profiling'", "is no skill.yaml step",
                 "skill.yaml step 'Verify the speedup by profiling'")


def test_a_drifted_command_fails(bundle):
    edit(bundle / "skill.yaml", "scripts/compare_accuracy.py --json", "scripts/compare_accuracy.py --json --quiet")
    assert_fails(bundle, "Check accuracy against the baseline")


def test_a_line_with_two_commands_fails(bundle):
    edit(bundle / "SKILL.md", "scripts/check_env.py --json`\n",
         "scripts/check_env.py --json` then `python ${HERMES_SKILL_DIR}/scripts/check_env.py`\n")
    assert_fails(bundle, "not a checklist line with exactly one command")


def test_a_missing_script_fails(bundle):
    (bundle / "scripts" / "profile_attention.py").unlink()
    assert_fails(bundle, "script scripts/profile_attention.py does not exist")


def test_a_script_whose_help_fails_is_reported(bundle):
    edit(bundle / "scripts" / "check_features.py", "def build_parser():", "raise SystemExit(3)\n\n\ndef build_parser():")
    assert_fails(bundle, "scripts/check_features.py --help exited 3")


@pytest.mark.parametrize("bad", ["Optimizing_Attention", "optimizing--attention", "-optimizing-attention"])
def test_a_bad_name_fails(bundle, bad):
    edit(bundle / "SKILL.md", "name: optimizing-attention-flash", f"name: {bad}")
    edit(bundle / "skill.yaml", "name: optimizing-attention-flash", f"name: {bad}")
    assert_fails(bundle, "SKILL.md frontmatter:")


def test_flow_style_lists_and_extra_fields_are_refused(bundle):
    skill = bundle / "SKILL.md"
    text = skill.read_text()
    start = text.index("    tags:\n")
    end = text.index("---", start)
    skill.write_text(text[:start] + "    tags: [attention, sdpa]\n" + text[end:])
    assert_fails(bundle, "SKILL.md frontmatter:")
    skill.write_text(text.replace("license: MIT\n", "license: MIT\nversion: 0.1.0\n", 1))
    assert_fails(bundle, "Unexpected fields in frontmatter: version")


def test_a_description_that_hermes_cuts_mid_word_fails(bundle):
    for name in ("SKILL.md", "skill.yaml"):
        edit(bundle / name, "Speeds up transformer attention with SDPA or flash-attn, and",
             "Accelerates transformer attention using PyTorch SDPA kernels, and")
    assert_fails(bundle, "end mid-word")


def test_metadata_that_disagrees_with_skill_yaml_fails(bundle):
    edit(bundle / "skill.yaml", "version: 0.1.0", "version: 0.2.0")
    assert_fails(bundle, "skill.yaml version '0.2.0' differs")


def test_a_body_over_300_lines_fails(bundle):
    with (bundle / "SKILL.md").open("a") as f:
        f.write("\nfiller line\n" * 150)
    assert_fails(bundle, "keep it under 300")


def test_an_unreadable_bundle_exits_2(tmp_path):
    proc = run_check(tmp_path)
    assert proc.returncode == 2 and "cannot read the bundle" in proc.stdout
