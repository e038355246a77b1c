"""Which backend can run here, why not, and what auto picks."""

import pytest
import torch
from attnkit import backends, env as env_mod, models
from attnkit.backends import BACKENDS, probe
from attnkit.env import environment
from attnkit.report import CannotRun


@pytest.fixture(scope="module")
def env():
    return environment()


def test_auto_picks_sdpa_on_cpu_and_says_why_not_the_others(env):
    model = models.load("demo:llama", device="cpu", dtype=torch.float32).model
    choice = backends.choose("auto", env=env, device="cpu", dtype=torch.float32, model=model)
    assert choice.backend == "sdpa"
    reasons = {r.backend: r.reason for r in choice.rejected}
    assert set(reasons) == {"eager", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention",
                            "fp8"}
    assert "fp16 and bf16 only" in reasons["flash_attention_2"]
    assert "needs a CUDA GPU" in reasons["flash_attention_2"]
    assert "baseline" in reasons["eager"]


def test_every_reason_is_listed_in_order(env):
    v = backends.availability("flash_attention_2", env=env, device="cpu", dtype=torch.float32)
    assert not v.available
    parts = v.reason.split("; ")
    assert parts[0].startswith("flash_attention_2 runs fp16 and bf16 only")
    if probe.installed(BACKENDS["flash_attention_2"]) is None:
        assert any(p.startswith("flash_attn: not installed") for p in parts)


def test_forced_backend_that_cannot_run_raises_with_a_hint(env):
    with pytest.raises(CannotRun) as info:
        backends.choose("flash_attention_3", env=env, device="cpu", dtype=torch.bfloat16)
    assert "cannot run here" in info.value.message and info.value.hint


def test_a_class_without_sdpa_support_is_refused_by_its_flag(env):
    class NoSdpa(torch.nn.Module):
        _supports_sdpa = False

    v = backends.availability("sdpa", env=env, device="cpu", dtype=torch.float32, model=NoSdpa())
    assert not v.available and "_supports_sdpa = False" in v.reason


def test_head_dim_over_256_rules_out_flash(env):
    from transformers import LlamaConfig

    model = type("M", (), {"config": LlamaConfig(hidden_size=1152, num_attention_heads=4)})()
    v = backends.availability("flash_attention_2", env=env, device="cpu", dtype=torch.bfloat16, model=model)
    assert "head_dim 288 > 256" in v.reason


def test_dtype_and_device_parsing(env):
    assert env_mod.parse_dtype("bf16", env, "cpu") is torch.bfloat16
    assert env_mod.parse_dtype("auto", env, "cpu") is torch.float32
    assert env_mod.resolve_device("auto", env) == ("cuda" if env.cuda_available else "cpu")
    with pytest.raises(CannotRun):
        env_mod.parse_dtype("int8", env, "cpu")
