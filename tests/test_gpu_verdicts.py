"""Verdicts on a GPU (marker ``gpu``): SDPA's math kernel is a fallback, never proof.

On a GPU the math kernel does the work of eager attention in the same unfused ops, so a
switch that lands there has not made attention fast: ``kernels`` fails, with torch's own
reasons why no fused kernel took the inputs. Skipped without a CUDA GPU.
"""

import pytest
import torch
from conftest import FAST, MODELS, run_script

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def test_a_fallback_to_the_math_kernel_fails_kernels_with_torchs_reason(tmp_path):
    run = run_script("enable_flash.py", "--model", f"{MODELS / 'verdicts.py'}:llama_head_dim_6", "--backend", "sdpa",
                     "--device", "cuda", "--dtype", "float32", "--seq-len", "128",
                     "--report-dir", str(tmp_path / "run"), *FAST)
    cand = run.result["data"]["candidate"]
    assert "aten::_scaled_dot_product_attention_math" in cand["kernels"], cand["kernels"]
    kernels = run.check("kernels")
    assert not kernels["passed"]
    assert "unfused math kernel on the GPU" in kernels["evidence"]
    assert cand["fallback_reason"] and "torch gave no reason" not in cand["fallback_reason"]
    assert cand["fallback_reason"] in kernels["evidence"]
    assert run.result["status"] == "fail" and run.rc == 1
