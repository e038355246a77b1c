"""FP8 attention (workflow 3) on any machine: the quantisation and scale maths, the arithmetic
of cuDNN's FP8 graph (emulated), the FP8 accuracy rule, the registration with transformers,
and the honest skip or refusal where no sm90/sm100 GPU is. The kernel itself is tested on a
GPU in tests/test_fp8_gpu.py (marker ``gpu``)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from attnkit import models
from attnkit.backends import BACKENDS, choose, fp8_cudnn, probe
from attnkit.backends.fp8_cudnn import E4M3, E4M3_MAX
from attnkit.env import environment
from attnkit.measure import accuracy as acc
from attnkit.report import CannotRun
from attnkit.swap import registered, switch
from conftest import run_script

ON_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)


def e4m3_grid() -> torch.Tensor:
    """Every finite float8_e4m3fn value, from its 256 bit patterns (NaN excluded), sorted."""
    values = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(E4M3).float()
    return values[torch.isfinite(values)].unique()


def test_e4m3_facts_the_scales_rest_on():
    grid = e4m3_grid()
    assert float(grid.max()) == E4M3_MAX == 448.0
    # 3 mantissa bits: between 1 and 2 the values step by 2**-3, so rounding errs by at most 2**-4
    ones = grid[(grid >= 1) & (grid <= 2)]
    assert torch.allclose(ones.diff(), torch.full_like(ones.diff(), 2**-3))
    assert fp8_cudnn.E4M3_UNIT_ROUNDOFF == 2**-4 and fp8_cudnn.OUTPUT_MARGIN == 1.0625


def test_quantize_is_round_to_nearest_at_scale_448_over_amax():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 4, 32, dtype=torch.bfloat16).transpose(1, 2)  # a [B, H, S, D] view of [B, S, H, D]
    x8, descale = fp8_cudnn.quantize(x)
    assert x8.dtype == E4M3 and x8.shape == x.shape and x8.stride() == x.stride()  # no copy of the layout
    amax = float(x.float().abs().max())
    assert descale.shape == (1, 1, 1, 1) and descale.dtype == torch.float32
    assert float(descale) == pytest.approx(amax / 448, rel=1e-6)
    assert float(x8.float().abs().max()) == 448.0  # the largest |x| maps to the largest e4m3 value
    # against a reference: the nearest e4m3 value to x * 448 / amax, found by brute force
    grid = e4m3_grid()
    scaled = x.float().flatten() * (448 / amax)
    nearest = grid[(scaled[:, None] - grid[None, :]).abs().argmin(dim=1)]
    got = x8.float().flatten()
    ties = ((scaled[:, None] - grid[None, :]).abs().topk(2, largest=False).values.diff(dim=1).abs() < 1e-6).flatten()
    assert torch.equal(got[~ties], nearest[~ties])
    back = fp8_cudnn.dequantize(x8, descale)
    normal = x.float().abs() >= 2**-6 * float(descale)  # e4m3's normal range: relative error <= 2**-4
    assert float(((back - x.float()).abs() / x.float().abs())[normal].max()) <= 2**-4 + 1e-6


def test_scales_never_overflow_or_divide_by_zero():
    zeros = torch.zeros(1, 2, 8, 16)
    x8, descale = fp8_cudnn.quantize(zeros)
    assert bool(torch.isfinite(descale).all()) and float(x8.float().abs().max()) == 0.0
    fp32 = torch.randn(3, 5)
    kept = fp32.clone()
    fp8_cudnn.quantize(fp32)
    assert torch.equal(fp32, kept)  # the caller's tensor is never scaled in place
    v = torch.randn(1, 2, 8, 16)
    _, descale_v = fp8_cudnn.quantize(v)
    scale_o = fp8_cudnn.output_scale(descale_v)
    assert float(scale_o) == pytest.approx(448 / (1.0625 * float(v.abs().max())), rel=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_the_fp8_arithmetic_errs_as_measured_on_the_gpu(causal):
    """cuDNN's graph, emulated: against float64, FP8 errs by about 0.05 relative RMS (0.054
    to 0.060 on an H100), bf16 by about 0.002, and |O| stays within the output scale."""
    torch.manual_seed(0)
    q = torch.randn(1, 512, 8, 64, dtype=torch.bfloat16)  # [B, S, H, D]
    k, v = (torch.randn(1, 512, 2, 64, dtype=torch.bfloat16) for _ in range(2))  # GQA: 2 key/value heads
    out = fp8_cudnn.emulated_call(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == torch.bfloat16

    def bhsd(t, rep=1):
        return t.double().transpose(1, 2).repeat_interleave(rep, dim=1)

    ref = F.scaled_dot_product_attention(bhsd(q), bhsd(k, 4), bhsd(v, 4), is_causal=causal).transpose(1, 2)
    bf16 = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                          enable_gqa=True).transpose(1, 2)
    fp8_err, bf16_err = acc.rel_rms(out, ref), acc.rel_rms(bf16, ref)
    assert 0.03 < fp8_err < 0.08 and bf16_err < 0.005
    assert fp8_err <= 2 * bf16_err + float(torch.finfo(E4M3).eps)  # the step's per-shape rule
    q8, dq = fp8_cudnn.quantize(q.transpose(1, 2))
    k8, dk = fp8_cudnn.quantize(k.transpose(1, 2))
    v8, dv = fp8_cudnn.quantize(v.transpose(1, 2))
    o8, amax_o = fp8_cudnn.emulate(q8, k8, v8, dq, dk, dv, fp8_cudnn.output_scale(dv), causal=causal)
    assert float(amax_o) <= float(v.abs().max()) * fp8_cudnn.OUTPUT_MARGIN  # no output reaches 448 before rounding
    assert bool(torch.isfinite(o8.float()).all())


def test_shapes_the_kernel_does_not_take_are_named():
    q = torch.randn(1, 8, 4, 72, dtype=torch.bfloat16)
    assert any("multiple of 16" in p for p in fp8_cudnn.shape_problems(q, q, q))
    q = torch.randn(1, 8, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 3, 64, dtype=torch.bfloat16)
    assert any("not a multiple of 3" in p for p in fp8_cudnn.shape_problems(q, k, k))
    with pytest.raises(ValueError, match="window"):
        fp8_cudnn.call(q, q, q, window=(16, 0))


def _logits(seed, scale, base=None, shape=(2, 64, 512)):
    gen = torch.Generator().manual_seed(seed)
    ref = base if base is not None else torch.randn(shape, generator=gen, dtype=torch.float64)
    return ref + scale * ref.std() * torch.randn(ref.shape, generator=gen, dtype=torch.float64)


def test_the_fp8_rule_scales_the_baseline_error_by_eps_e4m3_over_eps_bf16():
    ref = _logits(0, 0.0)
    base = _logits(1, 0.003, ref)  # bf16-sized noise
    good = _logits(2, 0.02, ref)  # about 7x: FP8-sized
    bad = _logits(3, 0.09, ref)  # 30x: beyond r = 16
    assert acc.precision_ratio(torch.bfloat16) == 16 and acc.precision_ratio(torch.float16) == 128
    layers = [{"layer": 0, "rel_rms": 0.05, "shape": [1, 8, 64, 32]}]
    ok = acc.compare_fp8(good, base, ref, valid=None, dtype=torch.bfloat16, language_model=True, attention=layers)
    assert ok.passed and ok.rule == acc.FP8_RULE and ok.tolerance == pytest.approx(16 * ok.baseline_rel_rms_err)
    assert ok.min_top1_agreement < ok.top1_agreement <= 1.0
    text = ok.evidence()
    assert "16 x baseline" in text and "top-1 agreement" in text and "eps(e4m3) 0.125" in text
    too_far = acc.compare_fp8(bad, base, ref, valid=None, dtype=torch.bfloat16, language_model=True, attention=layers)
    assert not too_far.passed and too_far.rel_rms_err > too_far.rel_rms_tolerance
    # a layout bug (rows swapped) fails, though its values are all of the right size
    swapped = good.flip(1)
    assert not acc.compare_fp8(swapped, base, ref, valid=None, dtype=torch.bfloat16, language_model=True).passed
    # one layer whose attention errs by more than one e4m3 unit fails the whole rule
    sharp = layers + [{"layer": 1, "rel_rms": 0.2, "shape": [1, 8, 64, 32]}]
    assert not acc.compare_fp8(good, base, ref, valid=None, dtype=torch.bfloat16, language_model=True,
                               attention=sharp).passed
    # the dtype rule, which FP8 can never meet, would have refused the good candidate
    assert not acc.compare(good, base, ref, valid=None, dtype=torch.bfloat16, language_model=True).passed


def test_the_fp8_record_is_forward_only_forced_only_and_registered_by_us():
    fp8 = BACKENDS["fp8"]
    assert not fp8.auto and not fp8.backward and not fp8.hf and fp8.precision == "fp8_e4m3"
    assert fp8.distributions == ("nvidia-cudnn-frontend",) and fp8.module == "cudnn"
    assert fp8.capabilities == (9, 10) and fp8.dtypes == (torch.float16, torch.bfloat16)
    assert fp8.kernel_markers == (fp8_cudnn.PROFILER_RANGE,)
    assert all(support.source for support in fp8.features.values())
    assert not fp8.supports("padding").supported and fp8.supports("gqa").supported


def test_auto_never_takes_fp8():
    env = environment()
    device = "cuda" if env.cuda_available else "cpu"
    choice = choose("auto", env=env, device=device, dtype=torch.bfloat16)
    assert choice.backend != "fp8"
    assert "fp8" in {r.backend for r in choice.rejected}


def _emulated_record():
    """The fp8 record with the emulated kernel: the transformers path, runnable on a CPU."""
    return dataclasses.replace(BACKENDS["fp8"], name="fp8_emulated", call=fp8_cudnn.emulated_call)


def test_a_llama_runs_fp8_attention_through_transformers_and_passes_the_rule():
    record = _emulated_record()
    registered.register(record)
    assert registered.registered("fp8_emulated")
    loaded = models.load("demo:llama", device="cpu", dtype=torch.bfloat16)
    inputs = loaded.inputs(1, 256, 0.0)
    loaded.model.set_attn_implementation("eager")
    with torch.inference_mode():
        base = loaded.forward(inputs)
    errors = acc.attention_errors(loaded, inputs, "fp8_emulated")
    assert loaded.model.config._attn_implementation == "eager"  # measured inside switch.using: restored
    assert [e["layer"] for e in errors] == [0, 1, 2, 3]  # every layer went through the FP8 function
    assert all(0.005 < e["rel_rms"] < acc.E4M3_EPS for e in errors)
    with switch.using(loaded.model, "fp8_emulated"), torch.inference_mode():
        cand = loaded.forward(inputs)
    ref = acc.reference_output(loaded, inputs, "eager")
    result = acc.compare_fp8(cand, base, ref, valid=inputs.valid, dtype=torch.bfloat16, language_model=True,
                             attention=errors)
    assert result.passed, result.evidence()
    assert 0.005 < result.rel_rms_vs_baseline < 0.125


def test_a_padded_batch_is_refused_not_computed_wrongly():
    registered.register(_emulated_record())
    loaded = models.load("demo:llama", device="cpu", dtype=torch.bfloat16)
    loaded.model.set_attn_implementation("fp8_emulated")
    padded = loaded.inputs(2, 64, 0.25)
    with pytest.raises(CannotRun, match="takes no attention mask"), torch.inference_mode():
        loaded.forward(padded)
    with torch.inference_mode():  # an all-ones mask is plainly causal: transformers passes no mask, and it runs
        assert loaded.forward(loaded.inputs(2, 64, 0.0)).shape[:2] == (2, 64)


@pytest.mark.skipif(ON_FP8_GPU, reason="this machine can run FP8 attention: tests/test_fp8_gpu.py runs it")
def test_the_step_skips_with_its_reason_where_fp8_cannot_run():
    run = run_script("fp8_attention.py")
    assert run.rc == 0 and run.result["status"] == "skip"
    assert run.result["summary"].startswith("FP8 attention not run: ")
    assert "\n" not in run.result["summary"]
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in run.result["summary"]
    paths = {p["path"]: p for p in run.result["data"]["fp8"]}
    assert set(paths) == {"cudnn", "flash_attention_3", "flash_attention_4", "flashinfer"}
    bad = run_script("fp8_attention.py", "--head-dim", "72")
    assert bad.rc == 2 and "multiple of 16" in bad.result["summary"]


@pytest.mark.skipif(ON_FP8_GPU, reason="this machine can run FP8 attention")
def test_forcing_fp8_where_it_cannot_run_is_one_line_and_exit_2():
    run = run_script("enable_flash.py", "--backend", "fp8", "--dtype", "bfloat16", "--no-report")
    assert run.rc == 2 and run.result["status"] == "error" and "\n" not in run.result["summary"]
    assert "--backend fp8 cannot run here" in run.result["summary"]
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in run.result["summary"] and "GPU" in run.result["next"]
    if probe.installed(BACKENDS["fp8"]) is None:
        assert "not installed: pip install nvidia-cudnn-frontend" in run.result["summary"]


def test_training_with_fp8_is_refused_before_anything_loads():
    run = run_script("enable_flash.py", "--backend", "fp8", "--train", "--no-report")
    assert run.rc == 2 and "--train needs a backward pass and fp8 has none" in run.result["summary"]


def test_saving_a_config_transformers_could_not_load_is_refused(tmp_path):
    run = run_script("enable_flash.py", "--backend", "fp8", "--save", str(tmp_path / "copy"), "--no-report")
    assert run.rc == 2 and "a name transformers does not ship" in run.result["summary"]
    assert "registered.register(BACKENDS['fp8'])" in run.result["next"] and not (tmp_path / "copy").exists()


def test_check_env_reports_every_fp8_path():
    run = run_script("check_env.py", "--require", "fp8")
    paths = {p["path"]: p for p in run.result["data"]["fp8"]}
    assert set(paths) == {"cudnn", "flash_attention_3", "flash_attention_4", "flashinfer"}
    assert paths["cudnn"]["distribution"] == "nvidia-cudnn-frontend"
    for p in paths.values():
        assert set(p) >= {"path", "distribution", "installed", "version", "usable", "reason", "source"}
        assert p["usable"] or p["reason"]
    assert "FP8 attention" in {f["name"] for f in run.result["data"]["facts"]}
    assert (run.rc == 0) == paths["cudnn"]["usable"]
    if not torch.cuda.is_available():
        assert run.rc == 1 and not run.check("fp8")["passed"]
