"""Verdicts that cannot lie (issue 19): every check passes only when it proved something.

Each test is a way ``pass`` used to mean nothing: a reference that is a different function,
a swap that drops the mask, a "speed-up" where nothing changed, a site counted as swapped
that never called SDPA, and a measurement whose exception left the model on another
backend. Real torch and transformers throughout; the models are in tests/models/verdicts.py.
"""

import pytest
import torch
from conftest import FAST, MODELS, run_script

from attnkit import models
from attnkit.measure.accuracy import REFERENCE_FACTOR, compare, reference
from attnkit.measure.timing import measure_backend, run_backend
from attnkit.swap import switch

VERDICTS = MODELS / "verdicts.py"


def test_a_dtype_dependent_constant_gets_a_same_dtype_reference_that_the_report_names(tmp_path):
    """Its norm's eps is 1e-5 in float32 and 1e-3 in float64: the float64 run is another
    function, so the baseline's own error is far beyond what float32 explains and 2 x that
    error would accept anything. The check compares with the float32 baseline instead, under
    a tolerance derived from the dtype, and says so."""
    run = run_script("enable_flash.py", "--model", f"{VERDICTS}:dtype_eps", "--backend", "sdpa", "--device", "cpu",
                     "--dtype", "float32", "--seq-len", "64", "--report-dir", str(tmp_path / "run"), *FAST)
    acc = run.result["data"]["accuracy"]
    eps = torch.finfo(torch.float32).eps
    assert acc["reference_trusted"] is False
    assert acc["baseline_max_abs_err"] > acc["reference_error_bound"]
    assert acc["reference"] == "the eager baseline in float32"
    assert "not the same function" in acc["note"]
    scale = acc["max_abs_err"] / acc["max_rel_err"]  # max|baseline|
    assert acc["tolerance"] == pytest.approx(2 * REFERENCE_FACTOR * eps * scale, rel=1e-6)
    assert acc["tolerance"] < acc["baseline_max_abs_err"]  # never 2 x an untrustworthy error
    assert "same-dtype rule" in run.check("accuracy")["evidence"]


def _outputs(spec, dtype, backend="sdpa"):
    loaded = models.load(spec, device="cpu", dtype=dtype)
    inputs = loaded.inputs(1, 64)
    base = run_backend(loaded, inputs, "eager")
    cand = run_backend(loaded, inputs, backend)
    ref, name = reference(loaded, inputs)
    return loaded, inputs, base, cand, ref, name


def test_a_swap_that_drops_the_causal_mask_fails_accuracy():
    """A real attention function that calls SDPA without the mask (registered with
    transformers' AttentionInterface, as a user's own kernel would be), judged against the
    float64 reference: outside tolerance. The same function with the mask passes."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def without_mask(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, None, is_causal=False, **kwargs)

    AttentionInterface.register("sdpa_without_mask", without_mask)
    loaded, inputs, base, cand, ref, name = _outputs("demo:llama", torch.float32, "sdpa_without_mask")
    dropped = compare(cand, base, ref, valid=inputs.valid, dtype=torch.float32, language_model=True,
                      reference_name=name)
    kept = compare(run_backend(loaded, inputs, "sdpa"), base, ref, valid=inputs.valid, dtype=torch.float32,
                   language_model=True, reference_name=name)
    assert kept.passed and kept.reference_trusted
    assert not dropped.passed and dropped.max_abs_err > 10 * dropped.tolerance


def test_an_untrusted_reference_never_passes_in_bf16_and_still_catches_a_dropped_mask_in_float32():
    """With a reference that is another function: in float32 the same-dtype rule still fails a
    swap that dropped the mask; in bf16 that rule could not tell, so the verdict is "cannot
    verify", never pass."""
    loaded, inputs, base, _, ref, _ = _outputs(f"{VERDICTS}:dtype_eps", torch.float32)
    assert float((base.double() - ref).abs().max()) > REFERENCE_FACTOR * torch.finfo(torch.float32).eps * \
        float(ref.abs().max())
    wrong = base + 0.1 * base.abs().max()  # what a dropped mask does: outputs moved by their own scale
    judged = compare(wrong, base, ref, valid=None, dtype=torch.float32, language_model=False)
    assert judged.reference_trusted is False and not judged.passed
    # in bf16 the bound is 64 x 2**-7 = 0.5 of the scale: a reference of the opposite sign is beyond it
    untrusted_bf16 = compare(base.bfloat16(), base.bfloat16(), -ref, valid=None, dtype=torch.bfloat16,
                             language_model=False)
    assert not untrusted_bf16.passed and untrusted_bf16.note.startswith("cannot verify")


def test_a_no_op_swap_makes_no_speed_claim(tmp_path):
    """--baseline sdpa --backend sdpa: the same ops run before and after, so whatever the clock
    says, neither speed nor kernels can pass."""
    run = run_script("enable_flash.py", "--model", "demo:llama", "--baseline", "sdpa", "--backend", "sdpa",
                     "--seq-len", "64", "--report-dir", str(tmp_path / "run"), *FAST)
    assert run.result["status"] == "fail" and run.rc == 1
    assert not run.check("speed")["passed"]
    assert "no speed claim: the same attention ops ran before and after" in run.check("speed")["evidence"]
    assert not run.check("kernels")["passed"]
    base, cand = run.result["data"]["baseline"], run.result["data"]["candidate"]
    assert base["kernel_counts"] == cand["kernel_counts"]
    assert len(base["latency_samples_ms"]) >= 5 and len(cand["latency_samples_ms"]) >= 5


def test_speed_rests_on_interleaved_samples(tmp_path):
    """A real switch: at least 5 interleaved samples a side, the median and IQR from them."""
    run = run_script("enable_flash.py", "--model", f"{VERDICTS}:plain", "--backend", "sdpa", "--seq-len", "128",
                     "--report-dir", str(tmp_path / "run"), *FAST)
    base, cand = run.result["data"]["baseline"], run.result["data"]["candidate"]
    for side in (base, cand):
        samples = sorted(side["latency_samples_ms"])
        assert len(samples) >= 5
        assert side["latency_ms"] == pytest.approx(samples[len(samples) // 2])
    evidence = run.check("speed")["evidence"]
    assert "interleaved samples a side" in evidence
    assert any(t in evidence for t in ("IQR [", "no measurable change", "measurably slower"))


def test_a_site_behind_a_run_time_guard_is_not_counted_as_swapped(tmp_path):
    """The rewrite keeps the original path when the guard holds, and it holds here: the site's
    trial ran softmax and bmm, not SDPA, so the site stays kept with that reason, and the
    main job refuses rather than report "2 of 2 sites swapped"."""
    found = run_script("find_attention.py", "--model", f"{VERDICTS}:guarded", "--seq-len", "32",
                       "--report-dir", str(tmp_path / "find"))
    sites = found.result["data"]["sites"]
    assert sites and all(s["status"] == "kept" for s in sites)
    assert all("did not call sdpa" in s["reason"] and "aten::_softmax" in s["reason"] for s in sites)
    run = run_script("enable_flash.py", "--model", f"{VERDICTS}:guarded", "--backend", "sdpa", "--seq-len", "64",
                     "--report-dir", str(tmp_path / "run"), *FAST)
    assert run.rc == 2 and run.result["status"] == "error"
    assert "no site could be swapped" in run.result["summary"]


@pytest.mark.parametrize("spec", ["demo:llama", f"{VERDICTS}:plain"])
def test_an_exception_inside_a_measurement_leaves_the_model_on_its_backend(spec):
    """A measurement that raises (token ids beyond the vocabulary) inside ``switch.using``:
    the model is back on the backend it had, for a transformers switch and for swapped
    hand-written attention alike."""
    from attnkit.steps.session import open_session

    session = open_session(spec, device="cpu", dtype="float32", seq_len=32)
    loaded, inputs = session.loaded, session.inputs
    before = switch.current(loaded.model)
    assert before == "eager"
    key = "input_ids" if "input_ids" in inputs.kwargs else None
    bad_ids = torch.full((1, 32), 10**6, dtype=torch.long)
    bad = type(inputs)(1, 32, () if key else (bad_ids,), {key: bad_ids} if key else {}, None, "bad ids")
    with pytest.raises(IndexError):
        measure_backend(loaded, bad, "sdpa", min_run_time=0.01)
    assert switch.current(loaded.model) == before
    with pytest.raises(RuntimeError, match="inside"):
        with switch.using(loaded.model, "sdpa"):
            assert switch.current(loaded.model) == "sdpa"
            raise RuntimeError("inside the scope")
    assert switch.current(loaded.model) == before
