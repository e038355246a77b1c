"""Issue 23: every step keeps its contract under bad input, bad models and a bad disk.

Each case runs a real script and asserts the contract: the right exit code (2 when the step
could not run), exactly one JSON object on stdout with --json (``conftest.run_script``
refuses anything else), no traceback on stderr, the user's files unchanged (a hash of every
file under the test's folder, before and after), and an end within ``LIMIT_S`` seconds: a
value that used to hang (NaN, inf, 99999999999999999999) is refused at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, MODELS, ROOT, SCRIPTS, run_script

LIMIT_S = 60
ZOO_SOURCE = MODELS / "attention_zoo.py"


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: path -> sha256 of its bytes ('dir' for a folder);
    Python's own bytecode cache of an imported factory file is left out."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if "__pycache__" in p.parts:
            continue
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def clean(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr


def run_case(script: str, args: list[str], root: Path, rc: int | tuple[int, ...], *phrases: str,
             unchanged: bool = True) -> dict:
    """Run ``script`` with ``args`` (and --json) from ``root``/work and check the contract;
    returns the JSON object. ``unchanged``: nothing under ``root`` may be created, changed or
    removed (the user's files, and no run folder for a step that could not run)."""
    work = root / "work"
    work.mkdir(exist_ok=True)
    before = snapshot(root)
    t0 = time.monotonic()
    run = run_script(script, *args, cwd=work, timeout=2 * LIMIT_S)
    elapsed = time.monotonic() - t0
    assert elapsed < LIMIT_S, f"{script} {args} took {elapsed:.0f} s"
    clean(run.stderr)
    assert run.rc in (rc if isinstance(rc, tuple) else (rc,)), (run.rc, run.result["summary"], run.stderr[-2000:])
    if run.rc == 2:
        assert run.result["status"] == "error"
        assert "\n" not in run.result["summary"]
        assert not run.result["summary"].startswith("unexpected error"), run.result["summary"]
    for phrase in phrases:
        assert phrase in run.result["summary"], (phrase, run.result["summary"])
    if unchanged:
        assert snapshot(root) == before
    return run.result


# ----------------------------------------------------------------------------- the user's files

def user_report(root: Path) -> Path:
    """A folder of the user's holding their own report.json and report.md."""
    mine = root / "mine"
    mine.mkdir()
    (mine / "report.json").write_text('{"mine": true}\n')
    (mine / "report.md").write_text("# my notes\n")
    return mine


def user_file(root: Path) -> Path:
    f = root / "notes.txt"
    f.write_text("precious\n")
    return f


@pytest.fixture
def read_only(tmp_path):
    """A folder no file can be created in: mode 0555, or for root (whom modes do not stop)
    /sys, where root cannot create files either."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    try:
        (Path("/sys") / "attnkit-probe").mkdir()
    except OSError:
        yield Path("/sys")
        return
    (Path("/sys") / "attnkit-probe").rmdir()
    pytest.skip("no folder here that root cannot write to")


# ----------------------------------------------------------------------------- bad values, refused up front

NUMBERS = [
    ("enable_flash.py", ["--min-run-time", "nan"], "--min-run-time must be a positive finite number"),
    ("enable_flash.py", ["--min-run-time", "inf"], "--min-run-time must be a positive finite number"),
    ("enable_flash.py", ["--min-run-time", "0"], "--min-run-time must be a positive finite number"),
    ("profile_attention.py", ["--min-run-time", "inf"], "--min-run-time must be a positive finite number"),
    ("benchmark_attention.py", ["--min-run-time", "nan"], "--min-run-time must be a positive finite number"),
    ("benchmark_attention.py", ["--tune-time=-inf"], "--tune-time must be a positive finite number"),
    ("fp8_attention.py", ["--min-run-time", "nan"], "--min-run-time must be a positive finite number"),
    ("profile_generation.py", ["--max-context", "--memory-limit", "nan"],
     "--memory-limit must be a positive finite number of GB"),
    ("profile_attention.py", ["--batch-size", "99999999999999999999"], "--batch-size must be at most 65536"),
    ("enable_flash.py", ["--seq-len", "64", "--seq-len", "-1"], "--seq-len must be at least 2, not -1"),
    ("profile_attention.py", ["--seq-len", "64", "--seq-len", "-1"], "--seq-len must be at least 2, not -1"),
    ("profile_generation.py", ["--prompt-len", "64", "--prompt-len", "0"], "--prompt-len must be at least 1, not 0"),
    ("context_parallel.py", ["--seq-len", "0"], "--seq-len must be at least 2, not 0"),
    ("fp8_attention.py", ["--kv-heads", "0"], "--kv-heads must be at least 1, not 0"),
    ("fp8_attention.py", ["--heads", "99999999999999999999"], "--heads must be at most 4096"),
    ("benchmark_attention.py", ["--search-cap", "-5"], "--search-cap must be at least 1, not -5"),
    ("benchmark_attention.py", ["--shape", "1,2,99999999999"], "--shape: D must be at most 4096"),
    ("run_checklist.py", ["enable", "--seq-len", "-3"], "--seq-len must be at least 2, not -3"),
    ("run_checklist.py", ["enable", "--pad-fraction", "nan"], "--pad-fraction must be in [0, 1)"),
]

NAMES = [
    ("enable_flash.py", ["--model", ""], "--model must not be empty"),
    ("compare_accuracy.py", ["--against", " "], "--against must not be empty"),
    ("enable_flash.py", ["--save", ""], "--save must not be empty"),
    ("enable_flash.py", ["--report-dir", ""], "--report-dir must not be empty"),
    ("find_attention.py", ["--write-patch", ""], "--write-patch must not be empty"),
    ("profile_attention.py", ["--backends", ""], "--backends must name at least one backend"),
    ("profile_attention.py", ["--backends", "eager,bogus"], "unknown backend bogus;", "sdpa"),
    ("benchmark_attention.py", ["--backends", "bogus"], "unknown backend bogus;", "flash_attention_2",
     "sdpa[cudnn]"),
    ("benchmark_attention.py", ["--backends", "sdpa[bogus]"], "unknown backend sdpa[bogus];"),
    ("profile_generation.py", ["--backends", "eager,nope"], "unknown backend nope;"),
    ("check_env.py", ["--jso"], "unrecognized arguments: --jso"),
    ("enable_flash.py", ["--min-run", "1"], "unrecognized arguments: --min-run"),
]


@pytest.mark.parametrize("script,args,phrase", NUMBERS, ids=[f"{s}{' '.join(a)}" for s, a, _ in NUMBERS])
def test_bad_numbers_are_refused_before_running(tmp_path, script, args, phrase):
    res = run_case(script, args, tmp_path, 2, phrase)
    assert res["next"]


@pytest.mark.parametrize("script,args,phrases", [(s, a, p) for s, a, *p in NAMES],
                         ids=[f"{s}{' '.join(a) or 'empty'}" for s, a, *_ in NAMES])
def test_bad_names_are_refused_before_running(tmp_path, script, args, phrases):
    run_case(script, args, tmp_path, 2, *phrases)


def test_a_bad_value_is_one_line_for_people_too(tmp_path):
    run = run_script("profile_attention.py", "--batch-size", "99999999999999999999", json_mode=False, timeout=120)
    assert run.rc == 2
    clean(run.stderr)
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and "at most 65536" in errors[0], run.stderr
    assert run.stdout == ""


# ----------------------------------------------------------------------------- output targets, checked first

def _report_dir_is_a_file(root):
    return ["--report-dir", str(user_file(root))], ("is a file, not a folder",)


def _report_dir_holds_a_report(root):
    return ["--report-dir", str(user_report(root))], ("already holds report.json, report.md", "nothing was written")


def _write_patch_into_missing_folder(root):
    return ["--write-patch", str(root / "no" / "such" / "x.patch")], ("does not exist", "nothing was written")


def _write_patch_over_a_file(root):
    return ["--write-patch", str(user_file(root))], ("already exists",)


def _save_onto_a_file(root):
    return ["--save", str(user_file(root))], ("already exists and is not an empty folder",)


TARGETS = [
    ("enable_flash.py", _report_dir_is_a_file),
    ("profile_attention.py", _report_dir_is_a_file),
    ("enable_flash.py", _report_dir_holds_a_report),
    ("compare_accuracy.py", _report_dir_holds_a_report),
    ("benchmark_attention.py", _report_dir_holds_a_report),
    ("find_attention.py", _report_dir_holds_a_report),
    ("enable_flash.py", _write_patch_into_missing_folder),
    ("find_attention.py", _write_patch_into_missing_folder),
    ("find_attention.py", _write_patch_over_a_file),
    ("enable_flash.py", _save_onto_a_file),
]


@pytest.mark.parametrize("script,setup", TARGETS, ids=[f"{s}-{f.__name__.strip('_')}" for s, f in TARGETS])
def test_output_targets_are_checked_before_any_measurement(tmp_path, script, setup):
    args, phrases = setup(tmp_path)
    res = run_case(script, args, tmp_path, 2, *phrases)
    assert res["data"] == {}  # refused before anything was loaded or measured


@pytest.mark.parametrize("flag", ["--report-dir", "--save", "--report-dir-below"])
def test_read_only_targets_are_refused_before_any_measurement(tmp_path, read_only, flag):
    target = read_only / "run" if flag in ("--save", "--report-dir-below") else read_only
    run_case("enable_flash.py", [flag.removesuffix("-below"), str(target)], tmp_path, 2, "cannot write",
             "nothing was written")


def test_an_unwritable_working_directory_is_refused_for_the_default_run_folder(tmp_path, read_only):
    before = snapshot(tmp_path)
    run = run_script("find_attention.py", "--source", str(ZOO_SOURCE), cwd=read_only, timeout=2 * LIMIT_S)
    clean(run.stderr)
    assert run.rc == 2 and "the default run folder" in run.result["summary"]
    assert "--no-report" in run.result["next"]
    assert snapshot(tmp_path) == before


def test_default_run_folders_are_new_and_unique(tmp_path):
    from attnkit.report import default_run_folder

    folders = [default_run_folder("enable_flash", "org/model name", root=tmp_path) for _ in range(200)]
    assert len(set(folders)) == 200 and all(f.is_dir() and not any(f.iterdir()) for f in folders)
    name = folders[0].name  # enable_flash-YYYYmmdd-HHMMSS.mmm-<4 hex>-<model>
    stamp, suffix = name.split("-")[2], name.split("-")[3]
    assert name.startswith("enable_flash-") and name.endswith("-org-model-name")
    assert len(stamp) == len("HHMMSS.mmm") and len(suffix) == 4


def test_two_runs_on_one_report_dir_never_share_or_overwrite_a_report(tmp_path):
    """Started together, both pass the check at the start; the one that finishes second
    finds a report there and writes into a new subfolder, saying so; or it starts after
    the first finished and is refused. Either way each report.json describes its own run."""
    shared = tmp_path / "shared"
    cmd = [sys.executable, str(SCRIPTS / "find_attention.py"), "--source", str(ZOO_SOURCE), "--report-dir",
           str(shared), "--json", "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=2 * LIMIT_S) for p in procs]
    results = [json.loads(out) for out, _ in outs]
    for (_, err), p, res in zip(outs, procs, results):
        clean(err)
        if p.returncode == 2:
            assert "already holds report.json" in res["summary"]
            continue
        on_disk = json.loads((Path(res["data"]["report_dir"]) / "report.json").read_text())
        assert on_disk["data"]["report_dir"] == res["data"]["report_dir"]
    written = [r["data"]["report_dir"] for r, p in zip(results, procs) if p.returncode != 2]
    assert written and len(set(written)) == len(written)
    if len(written) == 2:
        assert any("already held a report" in (r["data"].get("report_dir_note") or "") for r in results)


def test_checklist_files_go_into_its_run_folder(tmp_path):
    """A relative --write-patch of a workflow step (run_checklist handwritten's last step) is
    placed in the checklist's run folder, never in the working directory."""
    from attnkit.steps import run_checklist as checklist

    step = next(s for s in checklist.load_manifest(ROOT).workflow("handwritten").steps if s.id == "write_patch")
    argv = checklist.command(step, ROOT, {"model": "m.py:build"}, tmp_path / "run")
    assert argv[argv.index("--write-patch") + 1] == str(tmp_path / "run" / "attention-sdpa.patch")
    assert checklist.command(step, ROOT, {})[argv.index("--write-patch") + 1] == "attention-sdpa.patch"


def test_checklist_with_a_missing_model_could_not_run(tmp_path):
    res = run_case("run_checklist.py", ["enable", "--model", "/missing/model"], tmp_path, 2,
                   "model path /missing/model does not exist")
    assert res["next"]


# ----------------------------------------------------------------------------- the one boundary

def test_a_full_disk_is_one_line_and_exit_2(tmp_path):
    for script, args in (("check_env.py", ["--json"]), ("check_env.py", []),
                         ("find_attention.py", ["--source", str(ZOO_SOURCE), "--no-report", "--json"])):
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=2 * LIMIT_S, cwd=tmp_path)
        assert proc.returncode == 2, (script, args, proc.stderr)
        clean(proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr


@pytest.mark.parametrize("script,args", [
    ("check_env.py", ["--json"]), ("check_env.py", []),
    ("find_attention.py", ["--source", str(ZOO_SOURCE), "--no-report", "--json"]),
    ("find_attention.py", ["--source", str(ZOO_SOURCE), "--no-report"]),
], ids=["check_env-json", "check_env-text", "find_attention-json", "find_attention-text"])
def test_a_reader_that_left_keeps_the_steps_exit_code(tmp_path, script, args):
    """stdout is a pipe whose reader has already gone (``| head`` that exited): the step's
    verdict stands, so its exit code is kept (0 for check_env's pass, 1 for the zoo's kept
    sites), with no traceback and no 'Exception ignored'."""
    cmd = [sys.executable, str(SCRIPTS / script), *args]
    expected = subprocess.run(cmd, capture_output=True, text=True, timeout=2 * LIMIT_S, cwd=tmp_path).returncode
    assert expected in (0, 1)
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, text=True, timeout=2 * LIMIT_S, cwd=tmp_path)
    finally:
        os.close(write)
    assert proc.returncode == expected, proc.stderr
    clean(proc.stderr)


# ----------------------------------------------------------------------------- user code, isolated

SYS_EXIT = '''
import sys

def build():
    print("the factory talks on stdout")
    sys.exit(0)
'''

ARGV_AT_IMPORT = '''
import argparse
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=1e-3)
ARGS = parser.parse_args()  # the step's own options here would print this module's usage and exit
ARGV = list(sys.argv)

def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    assert len(ARGV) == 1 and ARGV[0].endswith("argv_at_import.py"), ARGV
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_key_value_heads=2, num_hidden_layers=1, vocab_size=128))
'''


def test_a_factory_calling_sys_exit_is_one_line(tmp_path):
    (tmp_path / "exits.py").write_text(SYS_EXIT)
    res = run_case("enable_flash.py", ["--model", f"{tmp_path / 'exits.py'}:build", "--no-report"], tmp_path, 2,
                   "called sys.exit(0)")
    assert "__main__" in res["next"]


def test_a_module_that_parses_sys_argv_at_import_sees_only_its_file(tmp_path):
    (tmp_path / "argv_at_import.py").write_text(ARGV_AT_IMPORT)
    res = run_case("find_attention.py", ["--model", f"{tmp_path / 'argv_at_import.py'}:build", "--seq-len", "16",
                                         "--no-report"], tmp_path, (0, 1))
    assert res["data"]["model_class"] == "LlamaForCausalLM"


def test_a_factory_spec_on_a_file_that_is_not_python(tmp_path):
    (tmp_path / "model.txt").write_text("weights\n")
    run_case("enable_flash.py", ["--model", f"{tmp_path / 'model.txt'}:build", "--no-report"], tmp_path, 2,
             "model.txt is not a .py file")


# ----------------------------------------------------------------------------- known failures, named

@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny Llama saved with save_pretrained (config.json + model.safetensors)."""
    from attnkit.models.demos import DEMOS
    from transformers import AutoModelForCausalLM

    config, _ = DEMOS["llama"].build()
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 1, 64, 128
    config.num_attention_heads, config.num_key_value_heads, config.vocab_size = 4, 4, 256
    folder = tmp_path_factory.mktemp("saved") / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_weights_are_named_with_the_file(tmp_path, saved_llama):
    model = _copy(saved_llama, tmp_path / "truncated")
    weights = model / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    run_case("enable_flash.py", ["--model", str(model), "--no-report"], tmp_path, 2, "cannot be read",
             "model.safetensors", "truncated or corrupt")


def test_a_config_that_does_not_fit_its_weights_is_named(tmp_path, saved_llama):
    model = _copy(saved_llama, tmp_path / "edited")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))
    run_case("compare_accuracy.py", ["--model", str(model), "--no-report", "--seq-len", "16"], tmp_path, 2,
             "config.json", "does not fit its weights", "mlp.", "in model.safetensors")


def test_a_config_transformers_cannot_build_is_named(tmp_path, saved_llama):
    model = _copy(saved_llama, tmp_path / "zero-heads")
    config = json.loads((model / "config.json").read_text())
    config["num_attention_heads"] = 0
    (model / "config.json").write_text(json.dumps(config))
    run_case("find_attention.py", ["--model", str(model), "--no-report", "--seq-len", "16"], tmp_path, 2,
             "is not one transformers can build", "ZeroDivisionError")


def test_models_with_different_vocabularies_are_not_compared(tmp_path):
    res = run_case("compare_accuracy.py", ["--model", "demo:llama", "--against", "demo:gpt2", "--seq-len", "32",
                                           "--no-report"], tmp_path, 2, "different vocabularies", "8192", "4096")
    assert "--save" in res["next"]


@pytest.mark.parametrize("script,args,phrase", [
    ("compare_accuracy.py", ["--baseline", "fp8"], "--baseline fp8 cannot run here"),
    ("compare_accuracy.py", ["--candidate", "fp8"], "--candidate fp8 cannot run here"),
    ("profile_attention.py", ["--backends", "eager,fp8"], "--backends fp8 cannot run here"),
])
def test_fp8_on_cpu_is_refused_with_its_reason(tmp_path, script, args, phrase):
    run_case(script, [*args, "--device", "cpu", "--seq-len", "16", "--no-report"], tmp_path, 2, phrase,
             "fp16 and bf16 only")


@pytest.mark.parametrize("script", ["find_attention.py", "enable_flash.py"])
def test_write_patch_on_a_transformers_model_says_nothing_was_written(tmp_path, script):
    target = tmp_path / "change.patch"
    extra = ["--backend", "sdpa", *FAST] if script == "enable_flash.py" else []
    res = run_case(script, ["--model", "demo:llama", "--seq-len", "32", "--write-patch", str(target), "--no-report",
                            *extra], tmp_path, (0, 1))
    assert not target.exists() and not res["data"].get("patch_file")
    notes = [n for n in res["data"]["notes"] if n.startswith(f"--write-patch {target}")]
    assert len(notes) == 1 and "nothing written" in notes[0] and "attn_implementation" in notes[0], notes


# ----------------------------------------------------------------------------- source that is not read

def _syntax_error(root):
    f = root / "broken.py"
    f.write_text("import torch\n\ndef attention(q, k:\n    return q\n")
    return f, ("broken.py cannot be read as Python", "line 3")


def _not_utf8(root):
    f = root / "latin1.py"
    f.write_bytes(b"# caf\xe9\nx = 1\n")
    return f, ("latin1.py cannot be read as Python", "not UTF-8 text")


def _dev_null(root):
    return Path("/dev/null"), ("/dev/null is not a .py file or a folder",)


def _folder_without_python(root):
    folder = root / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("attention\n")
    return folder, ("holds no .py file",)


def _folder_of_broken_files(root):
    folder = root / "pkg"
    folder.mkdir()
    (folder / "a.py").write_text("def f(:\n")
    (folder / "b.py").write_bytes(b"\xff\n")
    return folder, ("none of the 2 .py file(s)", "a.py: line 1")


SOURCES = [_syntax_error, _not_utf8, _dev_null, _folder_without_python, _folder_of_broken_files]


@pytest.mark.parametrize("setup", SOURCES, ids=[f.__name__.strip("_") for f in SOURCES])
def test_source_that_cannot_be_read_is_an_error_not_zero_sites(tmp_path, setup):
    source, phrases = setup(tmp_path)
    res = run_case("find_attention.py", ["--source", str(source), "--no-report"], tmp_path, 2, *phrases)
    assert res["next"] and res["data"] == {}


def test_a_patch_of_a_source_outside_the_working_directory_applies_with_git(tmp_path):
    """An absolute --source in a git work tree elsewhere: the patch's paths are relative to that
    work tree (never a//tmp/...), the note says where to apply it, and git apply takes it."""
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "zoo.py").write_bytes(ZOO_SOURCE.read_bytes())
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "zoo"]):
        subprocess.run([*git, *cmd], cwd=repo, check=True, capture_output=True)
    patch = tmp_path / "out" / "sdpa.patch"
    patch.parent.mkdir()
    res = run_case("find_attention.py", ["--source", str(repo / "src" / "zoo.py"), "--write-patch", str(patch),
                                         "--no-report"], tmp_path, 1, unchanged=False)
    assert patch.read_text().startswith("--- a/src/zoo.py\n+++ b/src/zoo.py\n")
    assert any(f"git -C {repo} apply" in n for n in res["data"]["notes"]), res["data"]["notes"]
    check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=repo, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_report_dir_onto_a_folder_of_other_files_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("a,b\n")
    (mine / "notes.txt").write_text("precious\n")
    res = run_case("find_attention.py", ["--source", str(ZOO_SOURCE), "--report-dir", str(mine)], tmp_path, 2,
                   "is not empty (it holds data.csv, notes.txt)", "nothing was written")
    assert "new or empty folder" in res["next"] and res["data"] == {}


def test_every_option_of_every_script_has_help():
    import argparse
    import importlib

    for script in sorted(SCRIPTS.glob("*.py")):
        module = importlib.import_module(script.stem)
        for action in module.build_parser()._actions:
            assert action.help and action.help != argparse.SUPPRESS, (script.name, action.option_strings)


def test_running_out_of_memory_outside_a_measurement_is_named_not_unexpected(tmp_path):
    """A length no memory holds (the hand-written model has no maximum to cap it to): the
    forward pass that records the attention calls cannot allocate its 16 TB score matrix."""
    res = run_case("enable_flash.py", ["--model", f"{ZOO_SOURCE}:nanogpt", "--backend", "sdpa", "--device", "cpu",
                                       "--seq-len", "999999", "--no-report", *FAST], tmp_path, 2, "out of memory")
    assert "--seq-len" in res["next"]


def test_a_users_text_is_printed_as_given_not_as_rich_emoji(tmp_path):
    run = run_script("check_env.py", "--device", "cuda:abc", json_mode=False, cwd=tmp_path, timeout=120)
    clean(run.stderr)
    assert "--device cuda:abc" in run.stderr and "\N{INPUT SYMBOL FOR LATIN LETTERS}" not in run.stderr, run.stderr


CLOSES_STDOUT = f'''
import sys
sys.path.insert(0, {str(MODELS)!r})
from attention_zoo import example_inputs, nanogpt  # noqa: F401 (the inputs the step uses)

def build():
    sys.stdout.close()  # a script's habit, met inside a factory
    return nanogpt()
'''


@pytest.mark.parametrize("json_mode", [True, False], ids=["json", "text"])
def test_a_factory_that_closes_stdout_does_not_close_the_steps(tmp_path, json_mode):
    (tmp_path / "closes.py").write_text(CLOSES_STDOUT)
    args = ["--model", f"{tmp_path / 'closes.py'}:build", "--seq-len", "16", "--no-report"]
    if json_mode:
        res = run_case("find_attention.py", args, tmp_path, (0, 1))
        assert res["data"]["model_class"] == "ZooModel"
        return
    run = run_script("find_attention.py", *args, json_mode=False, cwd=tmp_path, timeout=2 * LIMIT_S)
    clean(run.stderr)
    assert run.rc in (0, 1) and "find_attention" in run.stdout, (run.rc, run.stderr[-2000:])


def test_library_errors_leave_flag_advice_to_the_command_line():
    """Issue 19: the library raises a typed error that speaks of its API; cli.ADVICE adds the flag."""
    import torch
    from attnkit import cli
    from attnkit.report import NeedsTrust, NoKernel, NotSwitched
    from attnkit.swap import switch

    with pytest.raises(NotSwitched) as caught:
        switch.apply(torch.nn.Linear(2, 2), "sdpa")
    assert not caught.value.hint and "--" not in caught.value.message
    assert "find_attention.py --model SPEC" in cli.with_advice(caught.value).hint
    assert "--trust-remote-code" in cli.with_advice(NeedsTrust("org/model")).hint
    assert "--sdpa-kernel" in cli.with_advice(NoKernel("sdpa", "no reason")).hint
    assert cli.with_advice(NotSwitched("m", "no_site", "flash_attention_2")).hint == "use --backend sdpa"


def test_option_errors_name_the_parameter_and_the_command_line_names_the_flag():
    """Issue 19: an option's bad value is an OptionError; the library's text names the parameter,
    cli renders the flag; the user's own text (braces included) is quoted as given."""
    from attnkit import cli
    from attnkit.env import environment, parse_dtype
    from attnkit.models import parse_max_memory
    from attnkit.report import OptionError

    with pytest.raises(OptionError) as caught:
        parse_dtype("float8", environment(), "cpu")
    assert caught.value.option == "dtype" and "--" not in caught.value.message
    assert caught.value.message == "unknown dtype 'float8'; choose auto, float32, bfloat16 or float16"
    assert cli.with_advice(caught.value).message == "unknown --dtype 'float8'; choose auto, float32, bfloat16 or float16"
    with pytest.raises(OptionError) as caught:
        parse_max_memory("0={dtype}")
    assert caught.value.message.startswith("max_memory entry '0={dtype}' is not DEVICE=SIZE")
    flagged = cli.with_advice(caught.value)
    assert flagged.message.startswith("--max-memory entry '0={dtype}' is not DEVICE=SIZE")
    assert flagged.hint == "e.g. --max-memory 0=10GiB,cpu=50GiB"
