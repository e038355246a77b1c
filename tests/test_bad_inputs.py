"""Bad input: one clear line, exit 2, no traceback, and nothing of the user's touched."""

import json
import signal
import subprocess
import sys

import pytest
from conftest import CTRL_C, FAST, MODELS, ROOT, SCRIPTS, run_script

ZOO = MODELS / "zoo.py"


def assert_one_line_error(spec_args, *phrases, env=None):
    """Human mode: exit 2, exactly one 'error:' line, no traceback. JSON mode: status error."""
    human = run_script("enable_flash.py", *spec_args, "--no-report", json_mode=False, env=env)
    assert human.rc == 2, human.stderr
    assert "Traceback" not in human.stderr + human.stdout
    errors = [line for line in human.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, human.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    machine = run_script("enable_flash.py", *spec_args, "--no-report", env=env)
    assert machine.rc == 2 and machine.result["status"] == "error"
    assert machine.result["summary"] in errors[0]
    return machine.result


def test_path_that_does_not_exist():
    assert_one_line_error(["--model", "./no/such/checkpoint"], "model path ./no/such/checkpoint does not exist")


def test_folder_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    assert_one_line_error(["--model", str(tmp_path)], "has no config.json")


def test_hub_id_not_available_offline():
    res = assert_one_line_error(["--model", "meta-llama/Llama-3.2-1B"], "not in the local Hugging Face cache",
                                "HF_HUB_OFFLINE=1", env={"HF_HUB_OFFLINE": "1"})
    assert "hf download meta-llama/Llama-3.2-1B" in res["next"]


def test_factory_that_returns_no_module():
    assert_one_line_error(["--model", f"{ZOO}:not_a_module"], "returned dict, not a torch.nn.Module")


def test_factory_that_raises():
    assert_one_line_error(["--model", f"{ZOO}:raises"], "raised FileNotFoundError: checkpoint.pt not found")


def test_factory_file_or_name_missing(tmp_path):
    assert_one_line_error(["--model", f"{tmp_path}/gone.py:build"], "factory file", "does not exist")
    assert_one_line_error(["--model", f"{ZOO}:nope"], "has no callable 'nope'")


def test_model_with_no_attention():
    assert_one_line_error(["--model", f"{ZOO}:no_attention"], "no attention in", "ran no softmax, SDPA or flash-attn op")


def test_plain_module_whose_attention_cannot_be_swapped():
    assert_one_line_error(["--model", f"{MODELS / 'attention_zoo.py'}:softcapped"],
                          "ZooModel has attention but no site could be swapped", "torch.tanh", "line ",
                          "--backend flex_attention")


def test_backend_not_installed_says_what_to_install():
    res = assert_one_line_error(["--backend", "flash_attention_2", "--dtype", "bfloat16"],
                                "--backend flash_attention_2 cannot run here", "not installed: pip install flash-attn")
    assert res["next"]


def test_fp32_for_flash_attn_says_why_and_what_to_pass():
    assert_one_line_error(["--backend", "flash_attention_2", "--dtype", "float32"],
                          "runs fp16 and bf16 only", "pass --dtype bfloat16")


def test_train_with_a_backend_that_has_no_backward_on_this_device():
    # torch's FlexAttention raises NotImplementedError for backward on CPU: refused before any load
    assert_one_line_error(["--backend", "flex_attention", "--train", "--device", "cpu"],
                          "flex_attention has no backward pass on cpu")


SHORT_MASK = """
import math, torch
from torch import nn


class Short(nn.Module):
    # hand-written causal attention whose mask buffer holds 64 positions: longer inputs raise

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)
        self.register_buffer("causal", torch.ones(64, 64).tril().bool())

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, 4, 8).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        s = s.masked_fill(~self.causal[:S, :S], float("-inf"))
        return self.out((s.softmax(-1) @ v).transpose(1, 2).reshape(B, S, 32))


def build():
    return nn.Sequential(Short(), Short())


def example_inputs(batch_size, seq_len):
    return (torch.randn(batch_size, seq_len, 32),)
"""


def test_a_model_that_cannot_take_the_asked_length(tmp_path):
    """The swap is proven at a small shape; the model's own forward raising at --seq-len is
    one line that names the length, not an unexpected error."""
    path = tmp_path / "short.py"
    path.write_text(SHORT_MASK)
    assert_one_line_error(["--model", f"{path}:build", "--device", "cpu", "--seq-len", "128"],
                          "seq_len 128 raised RuntimeError", "try a smaller --seq-len")


def test_unknown_values_and_bad_numbers():
    assert_one_line_error(["--batch-size", "two"], "invalid int value")
    assert_one_line_error(["--batch-size", "0"], "--batch-size must be at least 1")
    assert_one_line_error(["--pad-fraction", "1.5"], "--pad-fraction must be in [0, 1)")
    assert_one_line_error(["--model", "demo:nope"], "unknown demo 'nope'")
    assert_one_line_error(["--dtype", "float8"], "unknown --dtype")
    assert_one_line_error(["--device", "cuda"], "no CUDA GPU is visible")


def test_save_never_overwrites(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "weights.bin").write_bytes(b"precious")
    assert_one_line_error(["--save", str(mine)], "already exists and is not an empty folder", "nothing was written")
    assert [p.name for p in mine.iterdir()] == ["weights.bin"]
    assert (mine / "weights.bin").read_bytes() == b"precious"


def test_baseline_out_of_memory_is_reported_and_the_candidate_still_runs(tmp_path):
    """A real allocation failure: 1.5 GB above what the process maps, while eager asks for
    16 heads x 8192^2 x 4 bytes = 4 GiB of scores and SDPA's blocked kernel needs MBs."""
    cmd = [sys.executable, str(ROOT / "tests" / "run_limited.py"), "1500", "enable_flash.py", "--model",
           f"{ZOO}:wide_llama", "--seq-len", "8192", "--json", "--report-dir", str(tmp_path), *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    res = json.loads(proc.stdout)
    assert res["status"] == "error"
    assert "baseline eager could not run" in res["summary"] and "out of memory" in res["summary"]
    base, cand = res["data"]["baseline"], res["data"]["candidate"]
    assert base["error"].startswith("out of memory") and base["latency_ms"] is None
    assert cand["error"] is None and cand["latency_ms"] > 0
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in cand["kernels"]
    assert res["data"]["accuracy"]["passed"] is False and "not compared" in res["data"]["accuracy"]["note"]
    assert json.loads((tmp_path / "report.json").read_text())["data"]["candidate"]["latency_ms"] == cand["latency_ms"]


def _interrupt_at(phase: str, *args: str) -> tuple[subprocess.Popen, list[str], str, str]:
    """Start enable_flash.py, send SIGINT the moment ``phase`` appears on stderr, and return
    the process, the progress lines seen before the signal, and its stdout and stderr."""
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "enable_flash.py"), "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **CTRL_C)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if phase in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    return proc, seen, out, err


def test_ctrl_c_keeps_what_was_measured(tmp_path):
    # The interleaved timing lasts at least 2 x --min-run-time (16 s): the signal, sent as soon
    # as its progress line is read, lands inside it however busy the machine is; the result
    # names the phase it landed in, so a signal that came late would show.
    proc, seen, out, err = _interrupt_at("timing eager and", "--seq-len", "256", "--min-run-time", "8",
                                         "--report-dir", str(tmp_path))
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    res = json.loads(out)
    assert res["status"] == "error"
    assert "interrupted (Ctrl-C) while timing eager and" in res["summary"], (res["summary"], seen)
    for side in ("baseline", "candidate"):  # kernels and peak memory measured before Ctrl-C, kept
        assert res["data"][side]["kernels"] and res["data"][side]["peak_memory_mb"] > 0
        assert json.loads((tmp_path / "report.json").read_text())["data"][side]["kernels"] == \
            res["data"][side]["kernels"]
    assert not res["checks"]  # no verdict on half a measurement


def test_ctrl_c_before_measuring_is_one_line_and_exit_2(tmp_path):
    proc, seen, out, err = _interrupt_at("loading", "--report-dir", str(tmp_path))
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    res = json.loads(out)
    assert res["status"] == "error" and "interrupted (Ctrl-C)" in res["summary"]


@pytest.mark.parametrize("script", ["check_env.py", "profile_attention.py", "compare_accuracy.py"])
def test_other_steps_follow_the_same_contract(script):
    run = run_script(script, "--no-such-flag")
    assert run.rc == 2 and run.result["status"] == "error" and "unrecognized arguments" in run.result["summary"]
    if script != "check_env.py":
        run = run_script(script, "--model", "./missing", "--no-report")
        assert run.rc == 2 and "does not exist" in run.result["summary"]
