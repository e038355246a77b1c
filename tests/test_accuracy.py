"""The float64 reference and the tolerance rule."""

import pytest
import torch
from attnkit import models
from attnkit.measure import accuracy


def test_exact_cast_restores_every_tensor_bit_for_bit():
    loaded = models.load("demo:llama", device="cpu", dtype=torch.bfloat16)
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # kept fp32 inside a bf16 model
    with accuracy.exact_cast(model):
        assert all(p.dtype == torch.float64 for p in model.parameters())
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    for k, v in model.named_buffers():
        assert v.dtype == buffers[k].dtype and torch.equal(v, buffers[k]), k


def test_reference_is_float64_and_leaves_the_backend_as_it_was():
    loaded = models.load("demo:qwen2", device="cpu", dtype=torch.float32)
    loaded.model.set_attn_implementation("sdpa")
    inputs = loaded.inputs(2, 32, 0.25)
    ref = accuracy.reference_output(loaded, inputs)
    assert ref.dtype == torch.float64 and ref.shape[:2] == (2, 32)
    assert loaded.model.config._attn_implementation == "sdpa"
    assert next(loaded.model.parameters()).dtype == torch.float32
    with torch.inference_mode():
        out = loaded.forward(inputs)
    assert (out.double() - ref)[inputs.valid].abs().max() < 1e-4


def _triple(seed=0, shape=(2, 8, 16)):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(*shape, generator=g, dtype=torch.float64)
    base = (ref + 1e-6 * torch.randn(*shape, generator=g, dtype=torch.float64)).float()
    return ref, base


def test_a_candidate_as_good_as_the_baseline_passes():
    ref, base = _triple()
    cand = (ref + 1e-6 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).float()
    acc = accuracy.compare(cand, base, ref, valid=None, dtype=torch.float32, language_model=False)
    assert acc.passed and acc.max_abs_err <= acc.tolerance
    assert acc.tolerance == pytest.approx(2 * acc.baseline_max_abs_err + torch.finfo(torch.float32).eps
                                          * ref.abs().max().item())


def test_a_candidate_worse_than_twice_the_baseline_fails():
    ref, base = _triple()
    cand = base.clone()
    cand[0, 3, 5] += 1e-3
    acc = accuracy.compare(cand, base, ref, valid=None, dtype=torch.float32, language_model=False)
    assert not acc.passed and acc.max_abs_err > acc.tolerance
    assert "max_abs_err" in acc.evidence() and ">" in acc.evidence()


def test_padding_is_left_out_and_reported_apart():
    ref, base = _triple()
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 5:] = False
    cand = base.clone()
    cand[1, 5:] = 1e3  # garbage at padding only
    acc = accuracy.compare(cand, base, ref, valid=valid, dtype=torch.float32, language_model=True)
    assert acc.passed
    assert acc.padding_positions == 3 and acc.compared_positions == 13
    assert acc.padding_max_abs_err > 100
    assert acc.top1_agreement is not None


def test_nan_at_a_real_token_fails():
    ref, base = _triple()
    cand = base.clone()
    cand[0, 0, 0] = float("nan")
    acc = accuracy.compare(cand, base, ref, valid=None, dtype=torch.float32, language_model=False)
    assert not acc.passed and "NaN" in acc.note


def test_top1_agreement_counts_argmax_matches():
    ref = torch.zeros(1, 4, 3, dtype=torch.float64)
    ref[0, :, 0] = 1.0
    base = ref.float()
    cand = base.clone()
    cand[0, 0] = torch.tensor([0.0, 2.0, 0.0])
    acc = accuracy.compare(cand, base, ref, valid=None, dtype=torch.float32, language_model=True)
    assert acc.top1_agreement == 0.75 and not acc.passed
