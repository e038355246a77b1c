"""Hand-written attention: found (in source and live), swapped for SDPA, proven, reverted.

The zoo (tests/models/attention_zoo.py) has ten styles written here plus code nobody here
wrote: nn.MultiheadAttention with need_weights left True, nn.TransformerEncoderLayer, and
transformers' own Llama and BERT eager attention functions.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from attnkit.swap import patch as patch_mod
from attnkit.swap import scan as sites_mod
from conftest import FAST, MODELS, ROOT, run_script

ZOO = MODELS / "attention_zoo.py"
FUSED = "aten::_scaled_dot_product_flash_attention_for_cpu"

#: style -> what the static analysis must read from its source
EXPECTED = {
    "NanoGPT": dict(form="matmul", mask="causal buffer", dropout="nn.Dropout self.attn_dropout"),
    "PreScaledCausal": dict(form="matmul", mask="causal", scale="1.0"),
    "BaddbmmPadding": dict(form="baddbmm", mask="additive", softmax_upcast=True),
    "EinsumBoolMask": dict(form="einsum", mask="boolean", scale="(1.0 / 4.0)"),
    "GroupedQuery": dict(form="matmul", mask="causal", softmax_upcast=True),
    "CrossAttention": dict(form="matmul", mask="none"),
    "FunctionalDropoutInPlace": dict(form="matmul", mask="causal buffer", scale="1.0"),
    "SoftmaxModuleBmm": dict(form="bmm", mask="none", dropout="nn.Dropout self.drop"),
}


@pytest.fixture(scope="module")
def zoo_sites():
    found, problems = sites_mod.analyze_path(ZOO)
    assert not problems
    return {s.function.split(".")[0]: s for s in found}


@pytest.mark.parametrize("style", sorted(EXPECTED))
def test_each_style_is_found_with_its_facts(zoo_sites, style):
    site = zoo_sites[style]
    assert site.kind == "manual" and site.swappable, site.reason
    for key, value in EXPECTED[style].items():
        assert getattr(site, key) == value, (key, getattr(site, key))
    assert site.call.startswith("F.scaled_dot_product_attention(")
    assert site.line < site.end_line


def test_gqa_repeats_become_enable_gqa(zoo_sites):
    site = zoo_sites["GroupedQuery"]
    assert site.gqa and "enable_gqa=True" in site.call and "keys" not in site.call  # the unrepeated k, v
    llama = [s for s in sites_mod.analyze_path(Path(transformers.__file__).parent / "models" / "llama")[0]
             if s.function == "eager_attention_forward"][0]
    assert llama.gqa and "enable_gqa=True" in llama.call and "attn_mask=attention_mask" in llama.call


def test_unsupported_forms_are_reported_with_their_reason(zoo_sites):
    assert not zoo_sites["SoftCapped"].swappable
    assert "torch.tanh" in zoo_sites["SoftCapped"].reason and "line " in zoo_sites["SoftCapped"].reason
    # a scale after an additive mask is folded by the replay form: the mask is scaled as the scores are
    assert zoo_sites["ScaledAfterMask"].swappable and zoo_sites["ScaledAfterMask"].mask == "replayed"
    # returned weights: swappable only as far as the source shows; the live check decides
    assert any("returned the attention weights" in n for n in zoo_sites["ReturnsWeights"].notes)
    mha = zoo_sites["MhaNeedWeights"]
    assert mha.kind == "mha" and mha.swappable and mha.call.endswith("need_weights=False)")


def test_the_rewritten_source_compiles_and_keeps_everything_else(zoo_sites):
    source = ZOO.read_text()
    edits = [e for s in zoo_sites.values() if s.swappable for e in s.edits]
    new = patch_mod.apply_edits(source, edits)
    compile(new, "rewritten", "exec")
    assert new.count("scaled_dot_product_attention(") == sum(s.swappable and s.kind == "manual"
                                                             for s in zoo_sites.values())
    assert new.count("softmax") < source.count("softmax")
    assert "def nanogpt_bench" in new and "class ZooModel" in new


def test_find_attention_on_source_reports_and_writes_a_patch_that_applies(tmp_path):
    copy = tmp_path / "zoo.py"
    shutil.copy(ZOO, copy)
    before = copy.read_bytes()
    run = run_script("find_attention.py", "--source", "zoo.py", "--write-patch", "sdpa.patch", "--no-report",
                     cwd=tmp_path)
    assert run.rc == 1 and run.result["status"] == "fail"  # SoftCapped cannot be swapped
    assert "zoo.py:" in run.check("swappable")["evidence"]
    data = run.result["data"]
    assert data["mode"] == "source (not imported)"
    assert {s["where"].rsplit(":", 1)[0] for s in data["sites"]} == {"zoo.py"}
    assert copy.read_bytes() == before  # nothing of the user's edited
    check = subprocess.run(["git", "apply", "--check", "sdpa.patch"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    subprocess.run(["git", "apply", "sdpa.patch"], cwd=tmp_path, check=True)
    compile(copy.read_text(), "patched", "exec")


def test_find_attention_on_a_package_folder_reads_transformers_code():
    folder = Path(transformers.__file__).parent / "models" / "bert"
    run = run_script("find_attention.py", "--source", str(folder), "--no-report")
    assert run.rc == 0
    assert any(s["function"] == "eager_attention_forward" and s["swappable"] for s in run.result["data"]["sites"])


LIVE = ["nanogpt", "prescaledcausal", "baddbmmpadding", "einsumboolmask", "groupedquery", "crossattention",
        "functionaldropoutinplace", "softmaxmodulebmm", "llamaeagerfunction", "berteagerfunction"]


@pytest.mark.parametrize("style", LIVE)
def test_each_style_is_swapped_and_proven_in_the_main_job(style, tmp_path):
    run = run_script("enable_flash.py", "--backend", "sdpa",
                     "--model", f"{ZOO}:{style}", "--seq-len", "128", "--batch-size", "2",
                     "--report-dir", str(tmp_path), *FAST)
    res = run.result
    assert run.rc == {"pass": 0, "fail": 1}[res["status"]], res["summary"]
    for name in ("switch", "kernels", "accuracy"):
        assert run.check(name)["passed"], run.check(name)
    base, cand = res["data"]["baseline"], res["data"]["candidate"]
    assert FUSED in cand["kernels"] and FUSED not in base["kernels"]
    assert "aten::_softmax" in base["kernels"] and "aten::_softmax" not in cand["kernels"]
    swapped = [s for s in res["data"]["sites"] if s["status"] == "swapped"]
    assert len(swapped) == 2 and {s["module_name"] for s in swapped} == {"blocks.0.attn", "blocks.1.attn"}
    assert all(s["accuracy"]["passed"] and s["kernel_after"] == FUSED for s in swapped)
    assert (tmp_path / "swap.patch").read_text().count("scaled_dot_product_attention(") >= 1
    assert res["data"]["attention_modules"]["per_module"]


@pytest.mark.parametrize("style", ["nanogpt", "einsumboolmask", "baddbmmpadding", "groupedquery", "mhaneedweights",
                                   "llamaeagerfunction", "functionaldropoutinplace"])
def test_training_mode_checks_outputs_and_gradients(style):
    run = run_script("enable_flash.py", "--backend", "sdpa",
                     "--model", f"{ZOO}:{style}", "--train", "--seq-len", "64", "--batch-size", "2",
                     "--no-report", *FAST)
    assert run.result["data"]["mode"] == "forward+backward (training)"
    assert run.result["data"]["candidate"]["mode"] == "forward+backward"
    assert run.check("accuracy")["passed"] and run.check("gradients")["passed"], run.check("gradients")
    grads = run.result["data"]["gradients"]
    assert grads["compared"] > 10 and grads["worst"]["max_abs_err"] <= grads["worst"]["tolerance"]
    if style == "mhaneedweights":  # in training, nn.MultiheadAttention with need_weights=False calls SDPA
        assert FUSED in run.result["data"]["candidate"]["kernels"]


def test_mha_need_weights_is_swapped_and_the_weights_no_longer_returned():
    run = run_script("find_attention.py", "--model", f"{ZOO}:mhaneedweights", "--no-report")
    assert run.rc == 0
    mha = [s for s in run.result["data"]["sites"] if s["kind"] == "mha"]
    assert len(mha) == 2 and all(s["status"] == "swapped" for s in mha)
    assert "need_weights=False" in run.result["data"]["patch"]


def test_the_transformer_encoder_layer_runs_sdpa_once_its_cpu_fast_path_is_off():
    """In eval mode on CPU, nn.TransformerEncoderLayer's fast path runs the native MHA kernel,
    which computes bmm + softmax; with the fast path off for the layer, SDPA runs."""
    run = run_script("enable_flash.py", "--backend", "sdpa", "--model", f"{ZOO}:encoderlayer", "--no-report", "--seq-len", "64", *FAST)
    data = run.result["data"]
    assert "aten::_softmax" in data["baseline"]["kernels"]
    assert FUSED in data["candidate"]["kernels"] and "aten::_softmax" not in data["candidate"]["kernels"]
    assert run.check("accuracy")["passed"]


@pytest.mark.parametrize("style,reason", [("returnsweights", "its caller uses the attention weights it returns"),
                                          ("softcapped", "torch.tanh")])
def test_unsupported_forms_are_reported_and_the_model_keeps_working(style, reason):
    run = run_script("enable_flash.py", "--backend", "sdpa",
                     "--model", f"{ZOO}:{style}", "--no-report", "--seq-len", "32")
    assert run.rc == 2 and reason in run.result["summary"]
    find = run_script("find_attention.py", "--model", f"{ZOO}:{style}", "--no-report")
    assert find.rc == 1 and reason in find.check("swappable")["evidence"]
    # in process: the model still runs, and nothing was left on it
    from attnkit import models
    from attnkit.report import CannotRun
    from attnkit.steps.session import open_session

    with pytest.raises(CannotRun):
        open_session(f"{ZOO}:{style}", seq_len=32, batch_size=2)
    loaded = models.load(f"{ZOO}:{style}", device="cpu", dtype=torch.float32)
    ids, mask = loaded.factory_module.example_inputs(2, 32)
    assert loaded.model(ids, mask).shape == (2, 32, 256)


def test_swaps_revert_exactly():
    from attnkit import models
    from attnkit.swap import switch
    from attnkit.steps.session import open_session

    session = open_session(f"{ZOO}:groupedquery", seq_len=32, batch_size=2)
    model, inputs = session.loaded.model, session.inputs
    with torch.no_grad():
        switch.apply(model, "eager")
        before = model(*inputs.args)
        assert all("forward" not in b.attn.__dict__ for b in model.blocks)
        switch.apply(model, "sdpa")
        assert all("forward" in b.attn.__dict__ for b in model.blocks)
        swapped = model(*inputs.args)
        switch.apply(model, "eager")
        after = model(*inputs.args)
    assert torch.equal(before, after) and not torch.equal(before, swapped)
    assert torch.allclose(before, swapped, atol=1e-5)
    assert all("forward" not in b.attn.__dict__ for b in model.blocks)
    assert isinstance(models, object)


def test_write_patch_refuses_to_overwrite(tmp_path):
    mine = tmp_path / "mine.patch"
    mine.write_text("keep")
    run = run_script("enable_flash.py", "--model", f"{ZOO}:nanogpt", "--write-patch", str(mine), "--no-report")
    assert run.rc == 2 and "already exists" in run.result["summary"] and mine.read_text() == "keep"
    out = tmp_path / "new.patch"
    run = run_script("enable_flash.py", "--backend", "sdpa",
                     "--model", f"{ZOO}:nanogpt", "--seq-len", "64", "--write-patch", str(out),
                     "--no-report", *FAST)
    assert run.result["data"]["patch_file"] == str(out.resolve())
    assert out.read_text().startswith("--- a/") and "+        y = F.scaled_dot_product_attention(" in out.read_text()
    assert ROOT.exists()


BETWEEN = MODELS / "between.py"


def test_a_line_that_only_fed_the_softmax_goes_with_the_scores_and_the_main_job_passes():
    """``dt = scores.dtype`` between the scores and the softmax: on the commit before this
    test, the rewrite removed ``scores`` and kept that line, and every site failed its trial
    with NameError."""
    run = run_script("enable_flash.py", "--backend", "sdpa", "--model", f"{BETWEEN}:keeps_dtype", "--seq-len", "64",
                     "--no-report", *FAST)
    assert run.rc in (0, 1) and run.check("switch")["passed"], run.result["summary"]  # speed is for benchmarks
    assert run.result["data"]["sites_swapped"] == 2
    assert "dt = scores.dtype" in run.result["data"]["patch"]  # removed by the patch, with the scores
    assert run.check("accuracy")["passed"] and FUSED in run.check("kernels")["evidence"]


def test_a_line_whose_value_is_still_read_keeps_the_source_patch_out_with_both_lines_named():
    """The source matcher refuses the site (removing ``scores`` would break ``keys =
    scores.size(-1)``) and names both lines; since issue 20 the graph path, where the size is
    a constant, swaps it at run time, saying why there is no patch."""
    run = run_script("find_attention.py", "--model", f"{BETWEEN}:reads_later", "--seq-len", "32", "--no-report")
    assert run.rc == 0
    sites = run.result["data"]["sites"]
    assert all(s["status"] == "swapped" and s["path"] == "graph" for s in sites)
    reasons = {s["runtime_only"] for s in sites}
    assert len(reasons) == 1
    reason = reasons.pop()
    assert "reads 'scores', which the swap removes" in reason and "reads what it sets" in reason
    assert run.result["data"]["patch"] == ""
