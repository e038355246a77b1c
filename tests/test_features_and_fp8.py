"""check_features (workflow 2) and fp8_attention (workflow 3)."""

import re

import torch
from attnkit.backends import BACKENDS
from attnkit.steps.fp8_attention import E4M3_MAX, quantize, reference
from conftest import FAST, MODELS, ROOT, run_script


def test_sdpa_is_proved_on_gqa_sliding_window_and_padding(tmp_path):
    run = run_script("check_features.py", "--model", "demo:mistral", "--backend", "sdpa", "--report-dir",
                     str(tmp_path))
    assert run.rc == 0 and run.result["status"] == "pass", run.result["summary"]
    needed = run.result["data"]["needed"]
    assert set(needed) == {"gqa", "sliding_window", "padding"}
    assert "(exercised)" in needed["sliding_window"]  # seq_len 256 > window 64
    assert run.check("accuracy")["passed"] and run.result["data"]["accuracy"]["padding_positions"] > 0


def test_a_backend_that_cannot_run_here_is_skipped_with_the_reason():
    run = run_script("check_features.py", "--backend", "flash_attention_2", "--dtype", "bfloat16", "--no-report")
    if run.result["status"] != "skip":  # a machine where flash-attn runs proves it instead
        assert run.result["status"] == "pass"
        return
    assert run.rc == 0
    assert "cannot run here to prove it" in run.result["summary"]
    rows = {r["feature"]: r for r in run.result["data"]["features"]}
    assert rows["gqa"]["needed"] and rows["gqa"]["supported"] and "flash_attn_func docstring" in rows["gqa"]["source"]


def test_a_needed_feature_the_backend_lacks_fails():
    run = run_script("check_features.py", "--model", f"{MODELS / 'zoo.py'}:gemma2_softcap", "--backend", "sdpa",
                     "--no-report")
    assert run.rc == 1 and run.result["status"] == "fail"
    assert "sdpa lacks softcap" in run.check("supported")["evidence"]


def test_the_reference_table_agrees_with_the_code():
    """references/advanced-features.md's support table says what the backend records say."""
    text = (ROOT / "references" / "advanced-features.md").read_text()
    table = text.split("## Which backend provides what", 1)[1].split("\n\n", 2)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    names = {"GQA / MQA (fewer key/value heads)": "gqa", "sliding window": "sliding_window", "padding": "padding",
             "logit soft-capping": "softcap", "ALiBi": "alibi", "attention dropout": "dropout"}
    for row in rows:
        feature = names[row[0]]
        for backend, cell in zip(("sdpa", "flash_attention_2", "flash_attention_3"), row[1:]):
            documented = cell.startswith("yes")
            assert documented == BACKENDS[backend].supports(feature).supported, (feature, backend, cell)


def test_fp8_is_skipped_with_its_reasons_where_it_cannot_run():
    run = run_script("fp8_attention.py")
    if run.result["status"] != "skip":
        return  # a Hopper GPU with FlashAttention-3: the run itself is the test
    assert run.rc == 0
    assert re.search(r"Hopper|no CUDA GPU", run.result["summary"])
    assert "flash_attn_interface" in run.result["summary"]
    bad = run_script("fp8_attention.py", "--head-dim", "72")
    assert bad.rc == 2 and "multiple of 16" in bad.result["summary"]


def test_fp8_quantisation_scales_per_batch_and_key_value_head():
    x = torch.randn(2, 32, 8, 16, dtype=torch.bfloat16)  # [B, S, H, D], 8 query heads
    x8, descale = quantize(x, kv_heads=2)  # 4 query heads per key/value head
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (2, 2) and descale.dtype == torch.float32
    assert float(x8.float().abs().max()) == E4M3_MAX  # each group's largest value maps to 448
    back = x8.float() * descale.repeat_interleave(4, dim=1)[:, None, :, None]
    # e4m3 keeps 3 mantissa bits: relative rounding error at most 2**-4 of each group's amax
    assert float((back - x.float()).abs().max()) <= 2**-4 * float(x.float().abs().max()) + 1e-6


def test_fp8_reference_handles_gqa_in_the_flash_layout():
    q = torch.randn(1, 8, 4, 16)
    kv = torch.randn(1, 8, 2, 16)
    out = reference(q, kv, kv, causal=True)
    rep = kv.repeat_interleave(2, dim=2)
    expected = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), rep.transpose(1, 2),
                                                                rep.transpose(1, 2), is_causal=True).transpose(1, 2)
    assert out.shape == q.shape and torch.allclose(out, expected, atol=1e-6)


def test_check_features_on_the_default_model_needs_gqa_and_padding():
    run = run_script("check_features.py", "--no-report", *FAST[:0])
    assert set(run.result["data"]["needed"]) == {"gqa", "padding"}
