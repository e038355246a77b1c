"""FlashAttention-4 on a machine where it cannot run, with the real flash-attn-4 wheel.

The wheel ships only flash_attn/cute/, so `import flash_attn` succeeds as an empty
namespace package: FA4 must be found by its pip distribution, never mistaken for
FlashAttention-2, and refused here with the reason. The test extra installs the wheel
(pyproject.toml); on a machine without it these tests skip.
"""

import importlib
import importlib.metadata
from pathlib import Path

import pytest
import torch
from attnkit.backends import BACKENDS
from attnkit.env import distribution_version
from attnkit.swap import patch as patch_mod
from attnkit.swap import scan
from conftest import MODELS, run_script

FA4_VERSION = distribution_version("flash-attn-4")
needs_fa4 = pytest.mark.skipif(FA4_VERSION is None, reason="the flash-attn-4 wheel is not installed "
                                                           "(pip install -e '.[test]' installs it)")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA GPU")


@needs_fa4
def test_the_namespace_clash_is_real():
    flash_attn = importlib.import_module("flash_attn")
    assert getattr(flash_attn, "__file__", None) is None  # a namespace package: no __init__.py
    assert not hasattr(flash_attn, "flash_attn_func")
    assert "flash-attn-4" in importlib.metadata.packages_distributions()["flash_attn"]
    assert distribution_version("flash-attn") is None


@needs_fa4
@no_gpu
def test_check_env_reports_fa4_installed_but_not_usable_and_no_fa2():
    run = run_script("check_env.py")
    assert run.rc == 0, run.stderr
    entries = {e["backend"]: e for e in run.result["data"]["flash_attn"]}
    assert set(entries) == {"flash_attention_2", "flash_attention_3", "flash_attention_4"}
    fa4 = entries["flash_attention_4"]
    assert fa4 == {**fa4, "distribution": "flash-attn-4", "installed": True, "version": FA4_VERSION, "usable": False}
    assert "no CUDA GPU" in fa4["reason"]
    assert not entries["flash_attention_2"]["installed"] and not entries["flash_attention_2"]["usable"]
    assert entries["flash_attention_2"]["reason"].startswith("not installed")
    assert run.result["data"]["recommendation"]["backend"] not in ("flash_attention_2", "flash_attention_4")
    required = run_script("check_env.py", "--require", "flash_attn")
    assert required.rc == 1 and "not installed" in required.check("flash_attn")["evidence"]


@needs_fa4
@no_gpu
def test_forcing_fa4_here_is_one_line_and_exit_2():
    run = run_script("enable_flash.py", "--backend", "flash_attention_4", "--dtype", "bfloat16", "--no-report")
    assert run.rc == 2 and run.result["status"] == "error"
    assert "--backend flash_attention_4 cannot run here" in run.result["summary"]
    assert "needs a CUDA GPU" in run.result["summary"]
    assert "Traceback" not in run.stderr


def test_fa2_is_never_claimed_from_an_import():
    record = BACKENDS["flash_attention_2"]
    from attnkit.backends import probe

    if distribution_version("flash-attn") is None:
        assert probe.installed(record) is None
        assert not probe.package_probe("flash_attn").importable


def _causal_site():
    source = (MODELS / "attention_zoo.py").read_text()
    sites = scan.analyze_source(source, str(MODELS / "attention_zoo.py"))
    nano = next(s for s in sites if s.function == "NanoGPT.forward")
    return source, nano


def test_hand_written_site_gets_an_fa4_call_with_an_sdpa_fallback():
    _, site = _causal_site()
    assert site.swappable and site.mask == "causal buffer"
    assert site.fa4_call.startswith("(flash_attn_cute_func(")
    assert "[0]" in site.fa4_call and "causal=True" in site.fa4_call  # FA4 returns (out, lse)
    assert ".transpose(1, 2)" in site.fa4_call  # [B, H, S, D] <-> [B, S, H, D]
    assert "flash_attn_cute_func is not None and q.is_cuda" in site.fa4_call
    assert "else F.scaled_dot_product_attention(" in site.fa4_call
    # nanoGPT's nn.Dropout: FA4 has none, so the call takes SDPA (and its dropout) whenever p is not 0
    assert "and (self.attn_dropout.p if self.attn_dropout.training else 0.0) == 0" in site.fa4_call
    assert "flash_attention_4" in site.variant_edits
    masked = [s for s in scan.analyze_source((MODELS / "attention_zoo.py").read_text(), "zoo")
              if s.swappable and s.mask in ("boolean", "additive")]
    assert masked and all(not s.fa4_call and "flash_attention_4" not in s.variant_edits for s in masked)


def test_the_fa4_patch_runs_sdpa_where_fa4_cannot_run(tmp_path):
    """The written FA4 patch imports FA4 in a try block; where it is missing (or cannot
    import, as on this CPU-only machine), the call falls back to SDPA: same outputs."""
    source, site = _causal_site()
    record = BACKENDS["flash_attention_4"]
    import ast

    last_import = max(n.end_lineno for n in ast.parse(source).body if isinstance(n, (ast.Import, ast.ImportFrom)))
    line = source.splitlines()[last_import - 1]
    edits = site.variant_edits["flash_attention_4"] + [(last_import, last_import, [line, *record.source_import])]
    patched = tmp_path / "zoo_fa4.py"
    patched.write_text(patch_mod.apply_edits(source, edits))
    spec = importlib.util.spec_from_file_location("zoo_fa4", patched)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = importlib.util.module_from_spec(spec_orig := importlib.util.spec_from_file_location(
        "zoo_orig", MODELS / "attention_zoo.py"))
    spec_orig.loader.exec_module(original)
    ids, pad = original.example_inputs(2, 32)
    with torch.no_grad():
        want = original.nanogpt()(ids, pad)
        got = module.nanogpt()(ids, pad)
    assert module.flash_attn_cute_func is None or torch.cuda.is_available()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert Path(patched).read_text().count("from flash_attn.cute import flash_attn_func as flash_attn_cute_func") == 1
