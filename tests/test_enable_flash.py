"""The main job on real models: switched from eager to SDPA, proven by kernels and accuracy.

These tests force --backend sdpa: they check the switch's mechanics on SDPA's fused
kernel. The measured choice of --backend auto, which may take another kernel at a short
sequence, is tested in test_autotune.py.

Speed is not asserted here (a timed test proves nothing on a shared CI machine); the
figures are measured by the benchmark in references/benchmarks.md.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, MODELS, run_script

FUSED_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"
#: The fields ARCHITECTURE.md promises in enable_flash's data: agents read them.
DATA_FIELDS = {"model", "device", "dtype", "shape", "baseline", "candidate", "speedup", "memory_ratio", "accuracy",
               "rejected", "report_dir"}
MEASUREMENT_FIELDS = {"backend", "latency_ms", "peak_memory_mb", "kernels"}
ACCURACY_FIELDS = {"max_abs_err", "max_rel_err", "tolerance", "passed", "top1_agreement"}


def assert_switched(run, tmp_path=None):
    """eager -> sdpa happened, the fused kernel ran after and not before, outputs within tolerance."""
    res = run.result
    assert res["step"] == "enable_flash"
    assert run.rc == {"pass": 0, "fail": 1}[res["status"]], run.stderr
    assert DATA_FIELDS <= res["data"].keys()
    for side in ("baseline", "candidate"):
        assert MEASUREMENT_FIELDS <= res["data"][side].keys()
    assert ACCURACY_FIELDS <= res["data"]["accuracy"].keys()
    base, cand = res["data"]["baseline"], res["data"]["candidate"]
    assert (base["backend"], cand["backend"]) == ("eager", "sdpa")
    assert FUSED_CPU in cand["kernels"] and FUSED_CPU not in base["kernels"]
    assert "aten::_softmax" in base["kernels"] and "aten::_softmax" not in cand["kernels"]
    assert cand["sdpa_kernel"] == "flash (cpu)"
    for name in ("switch", "kernels", "memory", "accuracy"):
        assert run.check(name)["passed"], run.check(name)
    acc = res["data"]["accuracy"]
    assert acc["max_abs_err"] <= acc["tolerance"]
    assert acc["tolerance"] == pytest.approx(2 * acc["baseline_max_abs_err"] + torch.finfo(torch.float32).eps *
                                             _ref_scale(acc), rel=1e-6)
    assert base["latency_ms"] > 0 and cand["latency_ms"] > 0
    assert res["data"]["speedup"] == pytest.approx(base["latency_ms"] / cand["latency_ms"])
    # a failure can only be the speed verdict, which this test does not judge
    assert res["status"] == "pass" or [c["name"] for c in res["checks"] if not c["passed"]] == ["speed"]
    return res


def _ref_scale(acc):
    # max|ref| = max_abs_err / max_rel_err (both reported)
    return acc["max_abs_err"] / acc["max_rel_err"]


@pytest.mark.parametrize("demo,seq_len", [("llama", 256), ("qwen2", 256), ("gpt2", 256), ("mistral", 256)])
def test_causal_lms_switch_from_eager_to_sdpa(demo, seq_len, tmp_path):
    run = run_script("enable_flash.py", "--backend", "sdpa",
                     "--model", f"demo:{demo}", "--seq-len", str(seq_len), "--batch-size", "2",
                     "--report-dir", str(tmp_path), *FAST)
    res = assert_switched(run)
    assert res["data"]["family"] == "causal-lm"
    assert res["data"]["accuracy"]["top1_agreement"] > 0.99
    assert res["data"]["original_backend"] == "eager"
    assert {r["backend"] for r in res["data"]["rejected"]} == {"eager", "flash_attention_2", "flash_attention_3",
                                                               "flash_attention_4", "flex_attention", "fp8"}


def test_mistral_sliding_window_with_padding_is_judged_on_real_tokens_only(tmp_path):
    # window 64 < seq 256: padded queries past the window have every key masked
    run = run_script("enable_flash.py", "--backend", "sdpa",
                     "--model", "demo:mistral", "--seq-len", "256", "--batch-size", "2",
                     "--pad-fraction", "0.5", "--report-dir", str(tmp_path), *FAST)
    res = assert_switched(run)
    acc = res["data"]["accuracy"]
    assert acc["padding_positions"] == 128
    assert acc["compared_positions"] == 2 * 256 - 128
    assert acc["padding_max_abs_err"] is not None


def test_real_minilm_weights_batched_with_padding(minilm_dir, tmp_path):
    run = run_script("enable_flash.py", "--backend", "sdpa",
                     "--model", str(minilm_dir), "--batch-size", "4", "--seq-len", "128",
                     "--report-dir", str(tmp_path), *FAST)
    res = assert_switched(run)
    data = res["data"]
    assert data["model_class"] == "BertModel" and data["family"] == "encoder"
    assert data["original_backend"] == "sdpa"  # transformers' own default for BERT
    assert "tokenized text" in data["inputs"]
    acc = data["accuracy"]
    assert acc["padding_positions"] > 0 and acc["compared_positions"] + acc["padding_positions"] == 4 * 128
    assert acc["top1_agreement"] is None  # an encoder: hidden states, not logits


def test_report_folder_holds_json_markdown_and_plot(tmp_path):
    run = run_script("enable_flash.py", "--backend", "sdpa",
                     "--seq-len", "128", "--report-dir", str(tmp_path / "run"), *FAST)
    assert run.result["data"]["report_dir"] == str(tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["data"]["candidate"]["kernels"] == run.result["data"]["candidate"]["kernels"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "eager" in md and FUSED_CPU in md and "## checks" in md
    assert (tmp_path / "run" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_default_report_folder_lands_in_the_working_directory_only(tmp_path):
    run = run_script("enable_flash.py", "--backend", "sdpa", "--seq-len", "64", *FAST, cwd=tmp_path)
    made = list((tmp_path / "attention-reports").iterdir())
    assert len(made) == 1 and made[0].name.startswith("enable_flash-") and made[0].name.endswith("-llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention-reports"]
    assert Path(run.result["data"]["report_dir"]).resolve() == made[0].resolve()


def test_factory_returning_a_transformers_model_is_switched(tmp_path):
    run = run_script("enable_flash.py", "--backend", "sdpa",
                     "--model", f"{MODELS / 'zoo.py'}:llama_factory", "--seq-len", "128",
                     "--report-dir", str(tmp_path), *FAST)
    assert_switched(run)


def test_save_writes_a_model_that_reloads_with_the_new_backend(tmp_path):
    # seq 2048: the fused kernel is several times faster here, so every check passes
    out = tmp_path / "switched"
    run = run_script("enable_flash.py", "--backend", "sdpa",
                     "--seq-len", "2048", "--save", str(out), "--no-report", "--min-run-time", "0.5")
    assert run.result["status"] == "pass", run.result["summary"]
    assert run.result["data"]["saved_to"] == str(out)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config._attn_implementation == "sdpa"


def test_save_writes_nothing_when_a_check_fails(tmp_path):
    # sdpa measured against itself: the same ops ran before and after, so the kernels check fails
    out = tmp_path / "not-written"
    run = run_script("enable_flash.py", "--seq-len", "64", "--baseline", "sdpa", "--backend", "sdpa", "--save",
                     str(out), "--no-report", *FAST)
    assert run.rc == 1 and run.result["status"] == "fail"
    assert not run.check("kernels")["passed"]
    assert "the same attention ops ran before and after" in run.check("kernels")["evidence"]
    assert not out.exists()


def test_people_get_a_table_and_json_is_exactly_one_object(tmp_path):
    run = run_script("enable_flash.py", "--backend", "sdpa",
                     "--seq-len", "64", "--report-dir", str(tmp_path), *FAST, json_mode=False)
    assert "enable_flash" in run.stdout and "accuracy" in run.stdout and "eager" in run.stdout
    assert "measuring the baseline" in run.stderr  # progress goes to stderr


def test_help_is_complete():
    run = run_script("enable_flash.py", "--help", json_mode=False)
    assert run.rc == 0
    for flag in ("--model", "--backend", "--baseline", "--batch-size", "--seq-len", "--pad-fraction", "--dtype",
                 "--device", "--min-run-time", "--sdpa-kernel", "--report-dir", "--no-report", "--save",
                 "--trust-remote-code", "--json", "exit codes"):
        assert flag in run.stdout, flag
