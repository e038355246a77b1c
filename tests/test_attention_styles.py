"""Attention as real code writes it (tests/models/attention_styles.py, issue 10): each style
is the attention SDPA computes, its source is read, and its swap is made and proven.

Each style module has ``sdpa(x)``, the same attention through F.scaled_dot_product_attention:
the first test checks the style against it, so a swap that matches the style matches SDPA.
"""

from pathlib import Path

import pytest
import torch
from attnkit.report import CannotRun
from attnkit.steps.session import open_session
from attnkit.swap import scan
from attnkit.swap.patch import apply_edits, patch_of
from conftest import FAST, MODELS, run_script
from models import attention_styles as A

STYLES_FILE = MODELS / "attention_styles.py"
FUSED = "aten::_scaled_dot_product_flash_attention_for_cpu"
#: where a style's attention lives, when not in <Style>.forward
FUNCTION = {"FreeFunctionAttnFn": "attention", "ReturnsWeights": "ReturnsWeights.attend"}
SWAP = sorted(n for n, (_, want) in A.STYLES.items() if want == "swap")
REFUSED = sorted(n for n, (_, want) in A.STYLES.items() if want != "swap")


def test_the_set_has_at_least_twenty_styles_the_swap_must_take():
    assert len(SWAP) >= 20 and REFUSED


@pytest.mark.parametrize("style", SWAP)
def test_each_style_is_the_attention_sdpa_computes(style):
    torch.manual_seed(0)
    module = A.STYLES[style][0]().eval()
    x = torch.randn(2, 64, A.D_MODEL)
    args = (x, A.pad_mask(2, 64)) if style in A.TAKES_MASK else (x,)
    with torch.no_grad():
        torch.testing.assert_close(module(*args), module.sdpa(*args), atol=2e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def scanned():
    sites, problems = scan.analyze_path(STYLES_FILE)
    assert not problems
    return [s for s in sites if s.kind == "manual"]


def _site(scanned, style):
    name = FUNCTION.get(style, f"{style}.forward")
    found = [s for s in scanned if s.function == name]
    assert len(found) == 1, (style, [s.function for s in scanned])
    return found[0]


@pytest.mark.parametrize("style", SWAP)
def test_the_source_scan_reads_each_style(scanned, style):
    site = _site(scanned, style)
    assert site.swappable, site.reason
    assert "scaled_dot_product_attention(" in site.call
    compile(apply_edits(STYLES_FILE.read_text(), site.edits), "rewritten", "exec")


@pytest.mark.parametrize("style", REFUSED)
def test_what_sdpa_cannot_express_is_refused_naming_the_construct_and_its_line(scanned, style):
    site = _site(scanned, style)
    assert not site.swappable
    assert A.STYLES[style][1] in site.reason and "line " in site.reason, site.reason


def test_talking_heads_is_refused_as_talking_heads(scanned):
    assert _site(scanned, "TalkingHeads").reason.startswith("talking heads:")


@pytest.mark.parametrize("style", SWAP)
def test_each_style_is_swapped_and_proven_on_its_own_inputs(style):
    session = open_session(f"{STYLES_FILE}:build_{style.lower()}", seq_len=64, batch_size=2)
    sites = list(session.swapper.sites.values())
    hand = [s for s in sites if s.kind in ("manual", "mha")]
    assert hand and all(s.status == "swapped" for s in hand), [(s.function, s.reason) for s in hand]
    assert all(s.kernel_after == FUSED for s in hand), [s.kernel_after for s in hand]
    assert all(s.accuracy["passed"] for s in hand)
    patch = patch_of(session.swapper)
    assert "scaled_dot_product_attention(" in patch


@pytest.mark.parametrize("style", REFUSED)
def test_refused_styles_stop_with_their_reason_and_the_model_keeps_working(style):
    with pytest.raises(CannotRun) as err:
        open_session(f"{STYLES_FILE}:build_{style.lower()}", seq_len=32, batch_size=2)
    assert A.STYLES[style][1] in err.value.message
    model = getattr(A, f"build_{style.lower()}")()
    assert model(*A.example_inputs(2, 32)).shape == (2, 32, A.D_MODEL)


def test_gqa_repeated_after_a_transpose_into_the_same_name_keeps_the_repeat(scanned):
    """The bug: enable_gqa=True on `k.transpose(1, 2)`, which the repeat had already
    overwritten, so SDPA saw [B, S, H, D]: "Number of heads in key and value must divide"."""
    site = _site(scanned, "GqaTransposeRepeatInterleave")
    assert "enable_gqa" not in site.call and "k.transpose(1, 2)" not in site.call
    assert any("overwrites" in n for n in site.notes), site.notes
    repeat_kv = _site(scanned, "GqaRepeatKv")  # kept under their own names: enable_gqa on the unrepeated k, v
    assert "enable_gqa=True" in repeat_kv.call and "key_states" not in repeat_kv.call


def test_a_free_function_held_on_self_is_swapped_through_the_attribute():
    session = open_session(f"{STYLES_FILE}:build_freefunctionattnfn", seq_len=32, batch_size=2)
    site = [s for s in session.swapper.sites.values() if s.status == "swapped"][0]
    assert site.owner == "attribute" and site.method == "attn_fn"
    block, original = session.loaded.model.blocks[0].attn, session.loaded.factory_module.attention
    session.swapper.apply("sdpa")
    assert block.__dict__["attn_fn"] is not original
    session.swapper.revert()
    assert block.__dict__["attn_fn"] is original  # the way back


def test_returned_weights_are_swapped_when_no_caller_uses_them(scanned):
    site = _site(scanned, "ReturnsWeights")
    assert any("returns None in their place" in n for n in site.notes)
    session = open_session(f"{STYLES_FILE}:build_returnsweights", seq_len=32, batch_size=2)
    assert all(s.status == "swapped" for s in session.swapper.sites.values())


def test_json_stdout_is_one_object_even_when_the_model_prints():
    run = run_script("enable_flash.py", "--model", f"{STYLES_FILE}:build_printing", "--seq-len", "64",
                     "--no-report", *FAST)  # run_script fails unless stdout is exactly one JSON object
    assert "building Printing" in run.stderr and "forward on" in run.stderr
    assert "building Printing" not in run.stdout and run.check("accuracy")["passed"]


def test_a_model_building_float32_tensors_gets_a_float64_reference_op_by_op():
    run = run_script("enable_flash.py", "--model", f"{STYLES_FILE}:build_float32_inside_forward", "--seq-len",
                     "64", "--no-report", *FAST)
    acc = run.result["data"]["accuracy"]
    assert acc["reference"].startswith("float64 eager, op by op"), acc["reference"]
    assert run.check("accuracy")["passed"] and run.check("kernels")["passed"]


def test_bf16_falls_back_to_autocast_when_a_plain_cast_cannot_run():
    run = run_script("enable_flash.py", "--model", f"{STYLES_FILE}:build_float32_inside_forward", "--seq-len",
                     "64", "--dtype", "bfloat16", "--device", "cpu", "--no-report", *FAST)
    data = run.result["data"]
    assert data["dtype_policy"] == "autocast" and data["dtype"] == "bfloat16", run.result["summary"]
    assert any("torch.autocast(bfloat16)" in n for n in data["notes"])
    assert run.check("switch")["passed"] and run.check("kernels")["passed"] and run.check("accuracy")["passed"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_kv_cache_written_in_place_under_inference_mode_is_swapped(dtype):
    # bf16: the float32 cache becomes an inference tensor at .to(xq) inside the model's inference-mode
    # forward, so every later call of the attention module alone (its timing too) must run in inference mode
    run = run_script("enable_flash.py", "--model", f"{STYLES_FILE}:build_inference_mode_cache", "--seq-len", "64",
                     "--dtype", dtype, "--device", "cpu", "--no-report", *FAST)
    assert run.result["status"] in ("pass", "fail"), run.result["summary"]
    for name in ("switch", "kernels", "accuracy"):
        assert run.check(name)["passed"], run.check(name)


def test_multihead_attention_in_eval_on_cpu_runs_sdpa_after_the_swap():
    """nn.MultiheadAttention's eval fast path computes bmm + softmax on CPU even with
    need_weights=False; the swap turns it off for the module, and the profiler shows SDPA."""
    # --backend sdpa: torch's own kernel choice (auto may time sdpa[math] fastest at this size)
    run = run_script("enable_flash.py", "--backend", "sdpa", "--model", f"{STYLES_FILE}:build_mha_no_weights",
                     "--seq-len", "128", "--no-report", *FAST)
    data = run.result["data"]
    assert "aten::_softmax" in data["baseline"]["kernels"] and "aten::bmm" in data["baseline"]["kernels"]
    assert FUSED in data["candidate"]["kernels"] and "aten::_softmax" not in data["candidate"]["kernels"]
    assert all(s["status"] == "swapped" for s in data["sites"] if s["kind"] == "mha")
    assert run.check("kernels")["passed"] and run.check("accuracy")["passed"]


def test_mha_fast_path_wrapper_restores_the_global_setting():
    session = open_session(f"{STYLES_FILE}:build_mha_no_weights", seq_len=32, batch_size=2)
    before = torch.backends.mha.get_fastpath_enabled()
    session.swapper.apply("sdpa")
    x, mask = A.example_inputs(2, 32)
    with torch.no_grad():
        session.loaded.model(x, mask)
    assert torch.backends.mha.get_fastpath_enabled() == before
    session.swapper.revert()
    assert all("forward" not in m.__dict__ for m in session.loaded.model.attn)


def test_the_styles_file_is_found_by_path():
    assert Path(STYLES_FILE).is_file()
