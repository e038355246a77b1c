"""Loading keeps the user's model: complex rotary tables, integer and bool buffers survive the
cast to the run's dtype, and the first forward after placing the model is the factory's own.

torch's ``Module.to(dtype=float)`` casts complex tensors to real and drops the imaginary part,
so a Meta-Llama-style ``freqs_cis`` buffer became cosine-only when a factory model was loaded:
these tests load such a model through the real ``attnkit.models.load`` and the real script.
"""

import importlib.util
import math
import sys

import pytest
import torch
from attnkit import models
from attnkit.models.loading import LoadedModel, check_placement, place
from attnkit.report import CannotRun
from conftest import FAST, run_script
from torch import nn

#: A tiny Llama in the style of Meta's reference code: 2 layers, hidden 32, 4 heads, rotary
#: tables kept as a complex ``freqs_cis`` buffer (torch.polar), applied through
#: view_as_complex / view_as_real; manual softmax attention; a long position buffer and a
#: bool causal buffer.
LLAMA = '''
import math

import torch
import torch.nn.functional as F
from torch import nn

DIM, HEADS, LAYERS, VOCAB, MAX_LEN = 32, 4, 2, 64, 128


def precompute_freqs_cis(dim, end, theta=10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(end, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis[None, :, None, :]
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_heads, self.head_dim = HEADS, DIM // HEADS
        self.wq = nn.Linear(DIM, DIM, bias=False)
        self.wk = nn.Linear(DIM, DIM, bias=False)
        self.wv = nn.Linear(DIM, DIM, bias=False)
        self.wo = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x, freqs_cis, causal):
        B, S, _ = x.shape
        xq = self.wq(x).view(B, S, self.n_heads, self.head_dim)
        xk = self.wk(x).view(B, S, self.n_heads, self.head_dim)
        xv = self.wv(x).view(B, S, self.n_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        scores = torch.matmul(xq, xk.transpose(2, 3)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~causal, float("-inf"))
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        out = torch.matmul(scores, xv)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.attention_norm = RMSNorm(DIM)
        self.ffn_norm = RMSNorm(DIM)
        self.w1 = nn.Linear(DIM, 2 * DIM, bias=False)
        self.w2 = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x, freqs_cis, causal):
        h = x + self.attention(self.attention_norm(x), freqs_cis, causal)
        return h + self.w2(F.silu(self.w1(self.ffn_norm(h))))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(DIM // HEADS, MAX_LEN), persistent=False)
        self.register_buffer("positions", torch.arange(MAX_LEN), persistent=False)  # long
        self.register_buffer("causal", torch.ones(MAX_LEN, MAX_LEN, dtype=torch.bool).tril(), persistent=False)

    def forward(self, tokens, start_pos=0):
        S = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[self.positions[start_pos:start_pos + S]]
        causal = self.causal[:S, :S]
        for layer in self.layers:
            h = layer(h, freqs_cis, causal)
        return self.output(self.norm(h)).float()


def build():
    torch.manual_seed(0)
    return Transformer()
'''

#: Models whose placement changes them, for the check itself (a CPU -> CPU move cannot lose a
#: tensor, so ``_apply`` is overridden to do what a lossy conversion would).
BROKEN = '''
import torch
from torch import nn


class CorruptsBuffer(nn.Module):
    """Halves a registered buffer whenever it is converted or moved."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("scale", torch.ones(8))

    def forward(self, x):
        return self.lin(x) * self.scale

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.scale.mul_(0.5)
        return out


class CorruptsPlainAttribute(nn.Module):
    """Reads a tensor kept as a plain attribute, which its _apply changes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.table = torch.ones(8)

    def forward(self, x):
        return self.lin(x) * self.table

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.table = self.table * 0.5
        return out


class Noisy(nn.Module):
    """Adds fresh noise on every forward: compared under the same seed, it is the same model."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) + torch.randn_like(x)


class NeedsThreeInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, y, z):
        return self.lin(x + y + z)


def corrupts_buffer():
    torch.manual_seed(0)
    return CorruptsBuffer()


def corrupts_plain_attribute():
    torch.manual_seed(0)
    return CorruptsPlainAttribute()


def noisy():
    torch.manual_seed(0)
    return Noisy()


def needs_three_inputs():
    torch.manual_seed(0)
    return NeedsThreeInputs()
'''


@pytest.fixture
def llama_file(tmp_path):
    path = tmp_path / "meta_llama.py"
    path.write_text(LLAMA)
    return path


@pytest.fixture
def broken_file(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text(BROKEN)
    return path


def _factory_model(path, name="build"):
    """The model as the factory returns it, from a module of its own (not the one load imported)."""
    spec = importlib.util.spec_from_file_location(f"_test_loading_{path.stem}_{id(path)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)().eval()


def _moved(inputs, device="cpu"):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in inputs.args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_complex_rotary_buffer_survives_loading(llama_file, dtype):
    own = _factory_model(llama_file)
    loaded = models.load(f"{llama_file}:build", device="cpu", dtype=dtype)
    freqs = loaded.model.freqs_cis
    assert freqs.dtype == torch.complex64, freqs.dtype  # not cast to real: the imaginary part is kept
    assert torch.equal(freqs, own.freqs_cis)
    assert freqs.imag.abs().max() > 0.5
    for name, p in loaded.model.named_parameters():
        assert p.dtype == dtype, name  # the floating weights are the run's dtype
    inputs = loaded.probe()
    with torch.no_grad():
        expected = own(*_moved(inputs))
        out = loaded.forward(inputs)
    if dtype == torch.float32:  # the same model, the same computation: bit for bit
        assert torch.equal(out, expected)
    else:  # bf16 weights: close to the float32 model, far closer than a cosine-only rotary table would be
        rel = (out.float() - expected).abs().max() / expected.abs().max()
        assert rel < 0.05, float(rel)
    assert any(n.startswith("loading kept the model: max|diff| 0") and "float32" in n for n in loaded.notes), \
        loaded.notes


def test_integer_and_bool_buffers_keep_their_dtype(llama_file):
    own = _factory_model(llama_file)
    loaded = models.load(f"{llama_file}:build", device="cpu", dtype=torch.bfloat16)
    assert loaded.model.positions.dtype == torch.long and torch.equal(loaded.model.positions, own.positions)
    assert loaded.model.causal.dtype == torch.bool and torch.equal(loaded.model.causal, own.causal)


def test_place_casts_only_floating_tensors():
    m = nn.Linear(4, 4)
    m.register_buffer("rot", torch.polar(torch.ones(3), torch.arange(3.0)))
    m.register_buffer("ids", torch.arange(3))
    m.register_buffer("mask", torch.tensor([True, False, True]))
    m.register_buffer("f64", torch.ones(2, dtype=torch.float64))
    rot = m.rot.clone()
    assert place(m, "cpu", torch.float16) is m
    assert m.weight.dtype == m.bias.dtype == m.f64.dtype == torch.float16
    assert isinstance(m.weight, nn.Parameter)
    assert (m.rot.dtype, m.ids.dtype, m.mask.dtype) == (torch.complex64, torch.long, torch.bool)
    assert torch.equal(m.rot, rot)
    place(m, "cpu")  # no dtype: moved only
    assert m.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="floating"):
        place(m, "cpu", torch.int32)


def test_enable_flash_notes_the_loading_check(llama_file, tmp_path):
    run = run_script("enable_flash.py", "--model", f"{llama_file}:build", "--device", "cpu", "--dtype", "float32",
                     "--seq-len", "64", "--report-dir", str(tmp_path / "report"), *FAST)
    assert run.result is not None and run.result["status"] in ("pass", "fail", "error", "cannot_run"), run.stderr
    notes = run.result["data"].get("notes", [])
    assert any("loading kept the model" in n for n in notes), (run.result["summary"], notes)


@pytest.mark.parametrize("name,cause", [("corrupts_buffer", "buffer scale"),
                                        ("corrupts_plain_attribute", "plain attribute")])
def test_a_placement_that_changes_the_model_is_refused(broken_file, name, cause):
    model = _factory_model(broken_file, name)
    loaded = LoadedModel(model, f"{broken_file}:{name}", name, "factory", "module", "cpu", torch.float32)
    with pytest.raises(CannotRun) as err:
        check_placement(loaded, "cpu")
    message = err.value.message
    assert "\n" not in message and "max|diff|" in message and cause in message, message
    assert err.value.hint


def test_load_refuses_a_factory_model_its_placement_changes(broken_file):
    with pytest.raises(CannotRun, match=r"max\|diff\| .*buffer scale"):
        models.load(f"{broken_file}:corrupts_buffer", device="cpu", dtype=torch.float32)


def test_a_forward_with_random_ops_is_compared_under_one_seed(broken_file):
    loaded = models.load(f"{broken_file}:noisy", device="cpu", dtype=torch.float32)
    assert any(n.startswith("loading kept the model: max|diff| 0") for n in loaded.notes), loaded.notes


def test_a_model_that_cannot_run_the_probe_is_loaded_with_the_check_skipped(broken_file):
    loaded = models.load(f"{broken_file}:needs_three_inputs", device="cpu", dtype=torch.bfloat16)
    assert loaded.model.lin.weight.dtype == torch.bfloat16
    assert any(n.startswith("loading check skipped") and "TypeError" in n for n in loaded.notes), loaded.notes


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-n", "0", "-q"]))
