"""What the profiler saw, peak memory, FLOPs."""

import torch
from attnkit import models
from attnkit.measure import flops, timing


def test_flops_follow_the_flash_attn_benchmark_formula():
    b, s, h, d = 2, 1024, 8, 64
    # flash-attn benchmarks: 4 * batch * seqlen**2 * nheads * headdim, halved for causal
    assert flops.attention_flops(b, s, h, d, 1, causal=False) == 4 * b * s**2 * h * d
    causal = flops.attention_flops(b, s, h, d, 1, causal=True)
    assert causal == 4 * b * h * d * s * (s + 1) // 2  # the diagonal counted
    assert abs(causal / (4 * b * s**2 * h * d / 2) - 1) < 1 / s + 1e-12
    window = flops.attention_flops(b, s, h, d, 1, causal=True, sliding_window=64)
    assert window == 4 * b * h * d * (64 * 65 // 2 + (s - 64) * 64)


def test_matmul_params_count_linear_and_gpt2_conv1d():
    loaded = models.load("demo:gpt2", device="cpu", dtype=torch.float32)
    from transformers.pytorch_utils import Conv1D

    expected = sum(m.weight.numel() for m in loaded.model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    assert flops.matmul_params(loaded.model) == expected > 0


def test_kernels_and_peak_memory_before_and_after():
    loaded = models.load("demo:llama", device="cpu", dtype=torch.float32)
    inputs = loaded.inputs(1, 1024)
    eager, _ = timing.measure_backend(loaded, inputs, "eager", min_run_time=0.05)
    sdpa, out = timing.measure_backend(loaded, inputs, "sdpa", min_run_time=0.05)
    layers = loaded.attention_shape()["layers"]
    assert eager.kernel_counts["aten::_softmax"] == layers and eager.kernel_counts["aten::bmm"] == 2 * layers
    assert sdpa.kernel_counts == {"aten::_scaled_dot_product_flash_attention_for_cpu": layers}
    assert sdpa.fused and not eager.fused
    # eager writes [B, H, S, S] fp32 score matrices; the fused kernel never does
    scores_mb = 1 * 8 * 1024 * 1024 * 4 / 2**20
    assert eager.peak_memory_mb - sdpa.peak_memory_mb > scores_mb
    assert out.shape == (1, 1024, 8192)
    assert sdpa.flops == eager.flops and sdpa.tflops > 0


def test_oom_is_recognised_for_cpu_and_cuda_allocators():
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        assert timing.is_oom(exc)
        assert timing.oom_message(exc).startswith("out of memory")
    assert timing.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert not timing.is_oom(RuntimeError("shape mismatch"))


def test_profile_step_sweeps_sequence_lengths(tmp_path):
    from conftest import FAST, run_script

    run = run_script("profile_attention.py", "--seq-len", "64", "--seq-len", "128", "--report-dir", str(tmp_path),
                     *FAST)
    assert run.rc in (0, 1)
    rows = run.result["data"]["measurements"]
    assert [(m["seq_len"], m["backend"]) for m in rows] == [(64, "eager"), (64, "sdpa"), (128, "eager"),
                                                           (128, "sdpa")]
    assert [r["seq_len"] for r in run.result["data"]["sweep"]] == [64, 128]
    assert run.check("kernels")["passed"]
    assert (tmp_path / "report.png").exists()


def test_profile_and_accuracy_steps_compare_two_model_specs(tmp_path, minilm_dir):
    from conftest import FAST, run_script

    saved = tmp_path / "minilm-eager"
    from transformers import AutoModel

    AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").save_pretrained(saved)
    prof = run_script("profile_attention.py", "--model", str(saved), "--against", str(minilm_dir), "--backends",
                      "eager,sdpa", "--batch-size", "2", "--seq-len", "64", "--no-report", *FAST)
    labels = [m["label"] for m in prof.result["data"]["measurements"]]
    assert labels == [f"{saved}: eager", f"{minilm_dir}: sdpa"]
    acc = run_script("compare_accuracy.py", "--model", str(saved), "--against", str(minilm_dir), "--baseline", "eager",
                     "--candidate", "sdpa", "--batch-size", "2", "--seq-len", "64", "--no-report")
    assert acc.rc == 0 and acc.result["status"] == "pass", acc.result["summary"]
