"""FP8 attention on the GPU (marker ``gpu``): cuDNN's sdpa_fp8 kernel against float64 and
against its emulation, the graph cache, the profiler evidence, the fp8_attention step on a
small grid, and ``enable_flash --backend fp8`` on a tiny Llama in bf16 (the FP8 rule).

Skipped without an sm90/sm100 GPU and nvidia-cudnn-frontend. Without pytest (a bare GPU
machine), ``python tests/test_fp8_gpu.py`` runs the same tests and prints one line each.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import torch  # noqa: E402  (before cudnn: see backends/fp8_cudnn.py)
import torch.nn.functional as F  # noqa: E402
from attnkit.backends import BACKENDS, availability, fp8_cudnn  # noqa: E402
from attnkit.env import environment  # noqa: E402
from attnkit.measure import accuracy as acc  # noqa: E402
from attnkit.measure.kernels import attention_kernels, library_kernels, profiled  # noqa: E402
from attnkit.report import CannotRun, Reporter  # noqa: E402


def _why_not() -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    verdict = availability("fp8", env=environment(), device="cuda", dtype=torch.bfloat16)
    return "" if verdict.available else verdict.reason


REASON = _why_not()

try:
    import pytest

    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(REASON), reason=REASON or "runs")]
    parametrize = pytest.mark.parametrize
    raises = pytest.raises
except ImportError:  # run by __main__ below
    pytest = None

    def parametrize(names, values):
        def mark(fn):
            fn.cases = [dict(zip(names.split(","), v if isinstance(v, tuple) else (v,))) for v in values]
            return fn
        return mark

    class raises:  # noqa: N801 - pytest.raises' name
        def __init__(self, exc, match=""):
            self.exc, self.match = exc, match

        def __enter__(self):
            return self

        def __exit__(self, kind, value, tb):
            assert kind is not None and issubclass(kind, self.exc), f"{self.exc.__name__} not raised"
            assert self.match in str(value), f"{self.match!r} not in {value}"
            return True

SHAPES = [(2, 1024, 8, 8, 64, False), (2, 1024, 8, 8, 64, True), (2, 2048, 8, 2, 128, False),
          (2, 2048, 8, 2, 128, True), (1, 4096, 4, 4, 128, True)]


def _inputs(b, s, h, kv, d, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, s, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for n in (h, kv, kv)]


def _reference(q, k, v, causal):
    rep = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    return F.scaled_dot_product_attention(qh, kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1),
                                          is_causal=causal).transpose(1, 2)


@parametrize("b,s,h,kv,d,causal", SHAPES)
def test_kernel_errs_like_fp8_against_float64_and_matches_its_emulation(b, s, h, kv, d, causal):
    q, k, v = _inputs(b, s, h, kv, d)
    out = fp8_cudnn.call(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    ref = _reference(q, k, v, causal)
    bf16 = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                          enable_gqa=h != kv).transpose(1, 2)
    err, bf16_err = acc.rel_rms(out, ref), acc.rel_rms(bf16, ref)
    # an H100 run measured 0.054-0.060 end to end; a layout or scale bug gives 0.3 or more
    assert 0.01 < err < 0.1, err
    assert bf16_err < 0.01
    cos = float((out.double().flatten() @ ref.flatten()) / (out.double().norm() * ref.norm()))
    assert cos > 0.99
    assert err <= 2 * bf16_err + float(torch.finfo(torch.float8_e4m3fn).eps)  # fp8_attention.py's rule
    # the kernel against the same arithmetic in PyTorch, on the same quantised inputs
    q8, dq = fp8_cudnn.quantize(q.transpose(1, 2))
    k8, dk = fp8_cudnn.quantize(k.transpose(1, 2))
    v8, dv = fp8_cudnn.quantize(v.transpose(1, 2))
    scale_o = fp8_cudnn.output_scale(dv)
    o8, amax_o = fp8_cudnn.sdpa_fp8(q8, k8, v8, dq, dk, dv, scale_o, causal=causal)
    e8, e_amax = fp8_cudnn.emulate(q8, k8, v8, dq, dk, dv, scale_o, causal=causal)
    descale_o = dv * fp8_cudnn.OUTPUT_MARGIN
    kernel, emulated = fp8_cudnn.dequantize(o8, descale_o), fp8_cudnn.dequantize(e8, descale_o)
    assert acc.rel_rms(kernel, emulated) < fp8_cudnn.E4M3_UNIT_ROUNDOFF  # they differ by output rounding only
    assert float(amax_o) == _approx(float(e_amax), 0.05)


def _approx(value, rel):
    return pytest.approx(value, rel=rel) if pytest else _Approx(value, rel)


class _Approx:
    def __init__(self, value, rel):
        self.value, self.rel = value, rel

    def __eq__(self, other):
        return abs(other - self.value) <= self.rel * abs(self.value)


def test_a_graph_is_built_once_per_shape():
    q, k, v = _inputs(1, 512, 4, 4, 64, seed=1)
    fp8_cudnn.call(q, k, v, causal=True)
    built = len(fp8_cudnn.graph_builds())
    fp8_cudnn.call(q * 2, k, v, causal=True)  # same shape, new values and scales: no rebuild
    assert len(fp8_cudnn.graph_builds()) == built
    fp8_cudnn.call(q, k, v, causal=False)
    assert len(fp8_cudnn.graph_builds()) == built + 1


def test_the_profiler_sees_the_fp8_kernel_inside_its_range():
    q, k, v = _inputs(1, 1024, 8, 8, 128)
    fp8_cudnn.call(q, k, v)  # build first
    with profiled("cuda") as prof:
        fp8_cudnn.call(q, k, v)
        torch.cuda.synchronize()
    events = list(prof.events())
    counts = attention_kernels(events)
    assert fp8_cudnn.PROFILER_RANGE in counts
    launched = library_kernels(events)  # torch links a kernel to the innermost CPU event at its launch
    gpu = [k for k in counts if k.startswith("gpu:")]
    print(f"kernels linked to {fp8_cudnn.PROFILER_RANGE}: {sorted(launched)}; attention kernels named: {gpu}")
    assert gpu, "no GPU kernel of the FP8 call is named in the evidence (neither linked to the range nor by its name)"


def test_the_step_runs_a_small_grid_and_names_the_kernel(tmp_path):
    from attnkit.steps.fp8_attention import Fp8Options, fp8_attention

    result = fp8_attention(Fp8Options(batch_size=2, heads=8, head_dims=[64, 128], seq_lens=[1024, 2048],
                                      min_run_time=0.05, report_dir=str(tmp_path)), Reporter(quiet=True))
    assert result.status == "pass", result.summary + " | " + " | ".join(c.evidence for c in result.checks)
    shapes = result.data["shapes"]
    assert len(shapes) == 8 and all(r["fp8"]["tflops"] > 0 and r["fp8_kernels"]["main"] for r in shapes)
    kernel = next(c for c in result.checks if c.name == "fp8_kernel")
    assert shapes[0]["fp8_kernels"]["main"] in kernel.evidence
    assert (tmp_path / "report.png").is_file() and (tmp_path / "report.md").is_file()
    assert "| shape |" in result.data["table"]


def test_enable_flash_fp8_passes_the_fp8_rule_on_a_tiny_llama():
    from attnkit.steps.enable_flash import EnableOptions, enable_flash

    result = enable_flash(EnableOptions(model="demo:llama", backend="fp8", dtype="bfloat16", device="cuda",
                                        seq_len=2048, min_run_time=0.2, write_report=False), Reporter(quiet=True))
    checks = {c.name: c for c in result.checks}
    accuracy = result.data["accuracy"]
    assert accuracy["rule"] == acc.FP8_RULE and accuracy["precision"] == "fp8_e4m3"
    assert checks["accuracy"].passed, checks["accuracy"].evidence
    assert checks["kernels"].passed, checks["kernels"].evidence
    assert fp8_cudnn.PROFILER_RANGE in result.data["candidate"]["kernels"]
    assert len(accuracy["attention"]) == 4 and max(a["rel_rms"] for a in accuracy["attention"]) < 0.125
    assert checks["switch"].passed


def test_padding_and_training_are_refused_on_the_gpu():
    from attnkit.steps.enable_flash import EnableOptions, enable_flash

    with raises(CannotRun, match="padding"):
        enable_flash(EnableOptions(model="demo:llama", backend="fp8", dtype="bfloat16", device="cuda", batch_size=2,
                                   seq_len=256, pad_fraction=0.25, write_report=False), Reporter(quiet=True))
    with raises(CannotRun, match="backward"):
        enable_flash(EnableOptions(model="demo:llama", backend="fp8", dtype="bfloat16", device="cuda", train=True,
                                   write_report=False), Reporter(quiet=True))
    assert not BACKENDS["fp8"].backward


def _main() -> int:
    """Run every test here without pytest: one line each, exit 1 if any failed."""
    if REASON:
        print(f"SKIP all: {REASON}")
        return 0
    failed = 0
    for name, fn in list(globals().items()):
        if not name.startswith("test_") or not callable(fn):
            continue
        for case in getattr(fn, "cases", [{}]):
            label = name + (f"[{','.join(str(v) for v in case.values())}]" if case else "")
            kwargs = dict(case)
            if "tmp_path" in fn.__code__.co_varnames[:fn.__code__.co_argcount]:
                kwargs["tmp_path"] = Path(tempfile.mkdtemp(prefix="fp8-gpu-"))
            try:
                fn(**kwargs)
                print(f"PASS {label}", flush=True)
            except Exception:
                failed += 1
                print(f"FAIL {label}\n{traceback.format_exc()}", flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
