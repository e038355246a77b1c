"""run_checklist.py runs a workflow's steps as commands and judges each by its rule."""

import sys
from pathlib import Path

import pytest
from attnkit.steps import run_checklist as checklist
from conftest import ROOT, run_script


def test_list_shows_the_workflows():
    run = run_script("run_checklist.py", "--list")
    assert run.rc == 0
    workflows = run.result["data"]["workflows"]
    assert [w["workflow"] for w in workflows] == ["enable", "flash-attn", "fp8-hopper", "handwritten", "generation",
                                                  "multigpu"]
    assert [len(w["steps"]) for w in workflows] == [4, 4, 4, 4, 3, 2]


def test_pass_rules_compare_values_lists_and_numbers():
    result = {"status": "pass", "data": {"speedup": 2.5, "accuracy": {"passed": True}, "backend": "sdpa"}}
    ok, evidence = checklist.evaluate({"status": "pass", "data.speedup": "> 1", "data.accuracy.passed": True}, result)
    assert ok and "data.speedup 2.5 > 1" in evidence
    assert not checklist.evaluate({"data.speedup": ">= 3"}, result)[0]
    assert checklist.evaluate({"status": ["pass", "skip"]}, result)[0]
    assert not checklist.evaluate({"data.backend": "flash_attention_2"}, result)[0]
    ok, evidence = checklist.evaluate({"data.memory_ratio": "> 1"}, result)
    assert not ok and "data.memory_ratio missing" in evidence
    assert not checklist.evaluate({"data.accuracy.passed": "> 0"}, result)[0]  # a bool is not a number


def test_commands_substitute_the_skill_dir_and_pass_options_on():
    manifest = checklist.load_manifest(ROOT)
    enable = manifest.workflow("enable")
    argv = checklist.command(enable.steps[1], ROOT, {"model": "demo:qwen2", "seq_len": 128, "dtype": None})
    assert argv[0] == sys.executable and argv[1] == str(ROOT / "scripts" / "enable_flash.py")
    assert argv[2:] == ["--json", "--model", "demo:qwen2", "--seq-len", "128"]
    check = checklist.command(enable.steps[0], ROOT, {"model": "demo:qwen2", "seq_len": 128})
    assert "--model" not in check  # check_env takes no model
    assert manifest.workflow("3").id == "fp8-hopper"


def test_it_stops_at_the_first_failure_and_keeps_going_when_asked():
    # on a machine without a Hopper GPU, workflow 3's first step fails
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("this machine has a Hopper GPU")
    run = run_script("run_checklist.py", "fp8-hopper")
    assert run.rc == 1 and run.result["status"] == "fail"
    marks = [s["mark"] for s in run.result["data"]["steps"]]
    assert marks == ["!", " ", " ", " "]
    assert "not run: stopped at the first failure" in run.result["data"]["steps"][1]["summary"]
    assert run.result["next"].startswith("Verify the GPU is Hopper (sm90):")

    run = run_script("run_checklist.py", "fp8-hopper", "--keep-going")
    steps = run.result["data"]["steps"]
    # the FP8 measurement says skip, with the reason; forcing --backend fp8 cannot run (exit 2)
    assert [s["mark"] for s in steps] == ["!", "!", "-", "!"]
    assert "FP8 attention not run" in steps[2]["summary"]
    assert "--backend fp8 cannot run here" in steps[3]["summary"]


def test_people_see_the_checklist(tmp_path):
    run = run_script("run_checklist.py", "fp8-hopper", "--keep-going", json_mode=False)
    assert "[-]" in run.stdout and "Measure FP8 attention" in run.stdout


def test_unknown_workflow_is_a_usage_error():
    run = run_script("run_checklist.py", "nope")
    assert run.rc == 2 and "unknown workflow 'nope'" in run.result["summary"]


def test_workflow_4_runs_on_a_hand_written_model(tmp_path):
    from conftest import MODELS

    run = run_script("run_checklist.py", "handwritten", "--model", f"{MODELS / 'attention_zoo.py'}:nanogpt_bench",
                     "--seq-len", "1024", "--keep-going", cwd=tmp_path)
    steps = {s["id"]: s for s in run.result["data"]["steps"]}
    assert set(steps) == {"find_attention", "swap", "swap_training", "write_patch"}
    assert all(s["result"] is not None for s in steps.values())  # every step printed its JSON object
    for sid in ("find_attention", "swap", "write_patch"):
        assert steps[sid]["mark"] == "x", steps[sid]
    assert steps["swap_training"]["result"]["data"]["gradients"]["passed"]
    assert "--model" in steps["swap"]["command"] and "--seq-len 1024" in steps["swap"]["command"]
    # the patch lands in the checklist's run folder, not in the working directory
    assert not (tmp_path / "attention-sdpa.patch").exists()
    folder = Path(run.result["data"]["report_dir"])
    assert folder.parent == (tmp_path / "attention-reports").resolve()
    patch = (folder / "attention-sdpa.patch").read_text()
    assert "+        y = F.scaled_dot_product_attention(" in patch
