"""Soft-capped attention (issue 21, first part): a transformers model whose class takes no SDPA
(Gemma-2: ``_supports_sdpa = False``, "sdpa does not support softcapping") is given
flex_attention by ``auto``, which keeps the soft-cap as a score_mod in a compiled kernel.

Before this change the main job stopped with "no fused attention backend can run here", and
a forced flex_attention failed ``kernels`` ("none seen"): the profiler names no op for a
compiled graph. Its evidence now is a compiled graph that ran inside transformers' call of
flex_attention (``kernels.call_range``).
"""

from attnkit.measure import kernels
from conftest import FAST, run_script


def test_auto_gives_a_soft_capped_model_flex_attention_and_proves_it(tmp_path):
    run = run_script("enable_flash.py", "--model", "demo:gemma2", "--seq-len", "64", "--report-dir",
                     str(tmp_path / "run"), *FAST)
    assert run.rc in (0, 1), run.result["summary"]  # speed on 2 CPU cores at S 64 is for benchmarks, not tests
    data = run.result["data"]
    assert data["chosen"] == "flex_attention"
    assert "none of flash_attention_3, flash_attention_2, sdpa can run this model" in data["chosen_because"]
    assert run.check("switch")["passed"] and run.check("accuracy")["passed"]
    kernel = run.check("kernels")
    assert kernel["passed"] and "flex_attention (compiled)" in kernel["evidence"]
    assert "aten::_softmax" not in data["candidate"]["kernel_counts"]
    assert data["candidate"]["first_call_s"] > data["baseline"]["first_call_s"]  # torch.compile's cost, measured
    assert any("first call took" in n and "paid once per shape" in n for n in data["notes"])


def test_the_call_range_is_put_back():
    import transformers.modeling_utils as mu

    functions = mu.ALL_ATTENTION_FUNCTIONS
    before = functions["flex_attention"]
    with kernels.call_range("flex_attention"):
        assert functions["flex_attention"] is not before
        assert functions["flex_attention"].__wrapped__ is before
    assert functions["flex_attention"] is before and "flex_attention" not in functions._local_mapping
    with kernels.call_range("no_such_backend"):
        pass


def test_a_backend_without_softcap_is_refused_for_a_soft_capped_model_and_the_cap_matters():
    """transformers 5.17 lets Gemma-2 run SDPA and drops the cap; our availability refuses any
    backend whose record says it has no soft-capping. The demo's scores are large enough that
    dropping the cap changes the output far beyond a bf16 tolerance, so no accuracy check
    could pass such a swap."""
    import torch
    from attnkit import models
    from attnkit.backends import availability
    from attnkit.env import environment

    loaded = models.load("demo:gemma2", device="cpu", dtype=torch.float32)
    verdict = availability("sdpa", env=environment(), device="cpu", dtype=torch.float32, model=loaded.model)
    assert not verdict.available and "soft-caps its attention logits (attn_logit_softcapping = 50.0)" in verdict.reason
    assert "soft-caps" not in availability("flex_attention", env=environment(), device="cpu", dtype=torch.float32,
                                           model=loaded.model).reason
    inputs = loaded.inputs(1, 128, 0.0)
    with torch.no_grad():
        capped = loaded.model(**inputs.kwargs).logits
        for layer in loaded.model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = loaded.model(**inputs.kwargs).logits
    assert float((capped - uncapped).abs().max()) > 0.05 * float(capped.abs().max())
