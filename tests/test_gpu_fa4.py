"""FlashAttention-4 on a real Hopper/Blackwell GPU: run with `python -m pytest -m gpu`.

Skipped without a CUDA GPU or without flash-attn-4. Each test compares with a float64
reference under the flash-attn tests' rule: err <= 2 x err(SDPA in the same dtype) +
eps(dtype) x max|ref|.
"""

import pytest
import torch
from attnkit.backends import BACKENDS, calls
from attnkit.env import distribution_version
from conftest import MODELS, run_script

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(distribution_version("flash-attn-4") is None, reason="needs flash-attn-4"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] not in (9, 10),
                       reason="FlashAttention-4 runs on sm90 and sm100"),
]


def _qkv(b, s_q, s_k, h, h_kv, d, grad=False):
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda s, n: torch.randn(b, s, n, d, device="cuda", dtype=torch.bfloat16, generator=gen,  # noqa: E731
                                  requires_grad=grad)
    return mk(s_q, h), mk(s_k, h_kv), mk(s_k, h_kv)


def _tolerance(ref, sdpa_out):
    return 2 * (sdpa_out.double() - ref).abs().max().item() + torch.finfo(torch.bfloat16).eps * ref.abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_backward_against_float64(causal):
    q, k, v = _qkv(2, 1024, 1024, 16, 16, 128, grad=True)
    out = calls.flash_attn_4(q, k, v, causal=causal)
    ref = calls.eager(q.double(), k.double(), v.double(), causal=causal)
    sd = calls.sdpa(q, k, v, causal=causal)
    assert (out.double() - ref).abs().max().item() <= _tolerance(ref, sd)
    grad = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, q, grad)
    (dq_ref,) = torch.autograd.grad(ref, q, grad.double())
    (dq_sd,) = torch.autograd.grad(sd, q, grad)
    assert (dq.double() - dq_ref).abs().max().item() <= _tolerance(dq_ref, dq_sd)


def test_gqa_window_and_bottom_right_causal_alignment():
    # GQA: 32 query heads share 8 key/value heads
    q, k, v = _qkv(2, 512, 512, 32, 8, 64)
    ref = calls.eager(q.double(), k.double(), v.double())
    assert (calls.flash_attn_4(q, k, v).double() - ref).abs().max().item() <= _tolerance(ref, calls.sdpa(q, k, v))
    # q_len != k_len, causal: FA4 aligns the diagonal bottom-right (query i sees keys 0..i + S_k - S_q)
    q, k, v = _qkv(2, 128, 1024, 16, 16, 128)
    ref = calls.eager(q.double(), k.double(), v.double(), causal=True)  # eager here is bottom-right too
    out = calls.flash_attn_4(q, k, v, causal=True)
    top_left = calls.sdpa(q, k, v, causal=True)  # SDPA's is_causal is top-left: a different function
    tol = torch.finfo(torch.bfloat16).eps * ref.abs().max().item() * 4
    assert (out.double() - ref).abs().max().item() <= tol
    assert (top_left.double() - ref).abs().max().item() > tol
    # a sliding window of 128 keys to the left
    q, k, v = _qkv(1, 1024, 1024, 8, 8, 64)
    out = calls.flash_attn_4(q, k, v, causal=True, window=(127, 0))
    full = calls.flash_attn_4(q, k, v, causal=True)
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    i = torch.arange(1024, device="cuda")
    keep = (i[None] <= i[:, None]) & (i[None] >= i[:, None] - 127)
    scores = (qd @ kd.transpose(-2, -1) / 8.0).masked_fill(~keep, float("-inf"))
    ref = (scores.softmax(-1) @ vd).transpose(1, 2)
    assert (out.double() - ref).abs().max().item() <= tol
    assert (full.double() - ref).abs().max().item() > tol


def _switched_and_correct(run):
    """Switch, kernels and accuracy hold; speed is the benchmark's business (a small demo
    model at a short sequence can be launch-bound), so a speed failure is allowed."""
    assert run.rc in (0, 1), run.stderr
    for name in ("switch", "kernels", "accuracy"):
        assert run.check(name)["passed"], run.check(name)
    assert [c["name"] for c in run.result["checks"] if not c["passed"]] in ([], ["speed"])


def test_a_transformers_model_switched_to_fa4(tmp_path):
    run = run_script("enable_flash.py", "--model", "demo:llama", "--backend", "flash_attention_4", "--device", "cuda",
                     "--seq-len", "2048", "--min-run-time", "0.5", "--report-dir", str(tmp_path))
    _switched_and_correct(run)
    assert run.result["data"]["candidate"]["backend"] == "flash_attention_4"
    markers = BACKENDS["flash_attention_4"].kernel_markers
    assert any(m in k for k in run.result["data"]["candidate"]["kernels"] for m in markers)


def test_hand_written_attention_swapped_to_fa4(tmp_path):
    run = run_script("enable_flash.py", "--model", f"{MODELS / 'attention_zoo.py'}:nanogpt_bench", "--backend",
                     "flash_attention_4", "--device", "cuda", "--seq-len", "2048", "--min-run-time", "0.5",
                     "--report-dir", str(tmp_path))
    _switched_and_correct(run)
    assert run.result["data"]["sites_swapped"] >= 1
    assert "flash_attn_cute_func" in (tmp_path / "swap.patch").read_text()


def test_measured_auto_on_the_gpu():
    run = run_script("enable_flash.py", "--model", "demo:llama", "--device", "cuda", "--seq-len", "2048",
                     "--min-run-time", "0.5", "--no-report")
    assert run.rc in (0, 1), run.stderr
    tune = run.result["data"]["autotune"]
    timed = [c for c in tune["candidates"] if c["status"] == "passed"]
    assert len(timed) >= 3  # SDPA's kernels and FlashAttention-4 at least
    best = min(timed, key=lambda c: c["latency_ms"])
    assert (tune["chosen"], tune["chosen_kernel"]) == (best["backend"], best["kernel"])
    assert run.result["data"]["candidate"]["backend"] == tune["chosen"]
