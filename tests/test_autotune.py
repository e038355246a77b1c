"""--backend auto is a measurement: every candidate timed on the same inputs, gated on accuracy."""

import pytest
import torch
from attnkit.env import environment
from attnkit.measure import autotune
from attnkit.steps.enable_flash import EnableOptions, _refuse_without_dropout
from attnkit.report import CannotRun
from conftest import run_script


@pytest.fixture(scope="module")
def auto_run():
    run = run_script("enable_flash.py", "--seq-len", "512", "--min-run-time", "0.3", "--no-report")
    assert run.rc in (0, 1), run.stderr
    return run.result


def test_auto_times_every_candidate_and_takes_the_fastest_that_passed(auto_run):
    tune = auto_run["data"]["autotune"]
    rows = tune["candidates"]
    timed = [c for c in rows if c["latency_ms"] is not None and c["status"] != "baseline"]
    assert len(timed) >= 2, rows  # on a CPU: SDPA's flash and math kernels at least
    passed = [c for c in timed if c["status"] == "passed"]
    fastest = min(passed, key=lambda c: c["latency_ms"])
    assert (tune["chosen"], tune["chosen_kernel"]) == (fastest["backend"], fastest["kernel"])
    assert auto_run["data"]["candidate"]["backend"] == tune["chosen"] == auto_run["data"]["chosen"]
    assert all(c["accuracy_passed"] for c in passed)
    assert all(c["compile_s"] is not None and c["compile_s"] >= 0 for c in timed)
    skipped = [c for c in rows if c["status"] == "skipped"]
    assert skipped and all(c["reason"] for c in skipped)  # cudnn/efficient/FA have no CPU kernel: said why
    assert next(c for c in rows if c["backend"] == "eager")["status"] == "baseline"
    assert "measured" in auto_run["data"]["chosen_because"]


def _qkv(b=2, s=64, h=4, h_kv=2, d=32, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(b, s, h, d, generator=gen, dtype=dtype), torch.randn(b, s, h_kv, d, generator=gen, dtype=dtype),
            torch.randn(b, s, h_kv, d, generator=gen, dtype=dtype))


@pytest.mark.parametrize("causal", [False, True])
def test_operator_level_tuning_on_cpu(causal):
    q, k, v = _qkv()
    cands = autotune.candidates(environment(), "cpu", torch.float32)
    autotune.tune_op(q, k, v, cands, causal=causal, min_run_time=0.05)
    best = autotune.chosen(cands)
    assert best is not None and best.backend != "eager"
    passed = [c for c in cands if c.status == "passed"]
    assert best.latency_ms == min(c.latency_ms for c in passed)
    assert all(c.max_abs_err is not None and c.max_abs_err <= c.tolerance for c in passed)
    assert all(c.tflops and c.tflops > 0 for c in passed)


def test_a_candidate_outside_tolerance_is_never_chosen():
    """The gate is real: against a reference 1e-2 away from what the model computes, and a
    baseline that matches that reference exactly, every candidate falls outside tolerance."""
    from attnkit import models

    loaded = models.load("demo:llama", device="cpu", dtype=torch.float32)
    inputs = loaded.inputs(1, 64)
    cands = [c for c in autotune.candidates(environment(), "cpu", torch.float32, loaded.model)
             if c.backend == "sdpa"]
    with torch.no_grad():
        base = loaded.forward(inputs)
    wrong = base.double() + 1e-2  # a reference the model does not compute
    autotune.tune_model(loaded, inputs, cands, baseline_out=wrong.float(), reference=wrong, dtype=torch.float32,
                        min_run_time=0.05)
    timed = [c for c in cands if c.latency_ms is not None]
    assert timed and all(c.status == "failed" and "outside tolerance" in c.reason for c in timed)
    assert autotune.chosen(cands) is None


def test_training_with_dropout_refuses_a_backend_without_dropout():
    with pytest.raises(CannotRun) as info:
        _refuse_without_dropout("flash_attention_4", EnableOptions(train=True), "attention_dropout = 0.1")
    assert "does not have" in info.value.message and "dropout" in info.value.message
    _refuse_without_dropout("sdpa", EnableOptions(train=True), "attention_dropout = 0.1")  # SDPA has dropout_p
    _refuse_without_dropout("flash_attention_4", EnableOptions(train=False), "attention_dropout = 0.1")


def test_the_run_off_retimes_only_the_candidates_close_to_the_fastest():
    """A quick pass cannot order two kernels within 10 %: those are timed again, longer, and
    the run-off's order decides. Here the quick figures put `slow` first by 5 %, but it
    really takes twice as long as `fast`; `far` (50x) and a candidate that failed the gate
    are not re-timed."""
    import contextlib
    import time

    cands = [autotune.Candidate("slow", status="passed", latency_ms=1.0),
             autotune.Candidate("fast", status="passed", latency_ms=1.05),
             autotune.Candidate("far", status="passed", latency_ms=50.0),
             autotune.Candidate("wrong", status="failed", latency_ms=0.5)]
    runs = {"slow": lambda: time.sleep(0.004), "fast": lambda: time.sleep(0.002),
            "far": lambda: time.sleep(0.002), "wrong": lambda: time.sleep(0.002)}
    again = autotune.runoff(cands, runs, lambda c: contextlib.nullcontext(), 0.1, "cpu", None)
    assert [c.backend for c in again] == ["slow", "fast"] and all(c.runoff for c in again)
    slow, fast, far, wrong = cands
    assert fast.latency_ms < slow.latency_ms and autotune.chosen(cands) is fast
    assert (far.latency_ms, far.runoff, wrong.latency_ms, wrong.runoff) == (50.0, False, 0.5, False)
    assert "timed again" in autotune.explain(fast, cands)
    # a clear winner: nothing is re-timed
    clear = [autotune.Candidate("a", status="passed", latency_ms=1.0),
             autotune.Candidate("b", status="passed", latency_ms=1.5)]
    assert autotune.runoff(clear, runs, lambda c: contextlib.nullcontext(), 0.1, "cpu", None) == []


def test_a_compiling_backend_wins_only_where_its_speed_pays_back_its_compile_time():
    """The model-level rule: first-call cost + PAYBACK_CALLS x latency. A backend 1.5x faster
    that compiles for 30 s loses to one without a compile at 10,000 calls (it would need
    60,000); the steady-state rule (the operator grid's) takes it."""
    flex = autotune.Candidate("flex_attention", status="passed", latency_ms=1.0, compile_s=30.0)
    sdpa = autotune.Candidate("sdpa", kernel="flash", status="passed", latency_ms=1.5, compile_s=0.01)
    assert autotune.chosen([flex, sdpa]) is flex
    assert autotune.chosen([flex, sdpa], autotune.PAYBACK_CALLS) is sdpa
    why = autotune.explain(sdpa, [flex, sdpa], autotune.PAYBACK_CALLS)
    assert "flex_attention runs faster" in why and "59,980 calls" in why
    flex.compile_s = 2.0  # pays back after 3,980 calls: taken
    assert autotune.chosen([flex, sdpa], autotune.PAYBACK_CALLS) is flex
