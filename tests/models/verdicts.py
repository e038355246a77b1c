"""Models whose verdicts must not lie (issue 19): each one is a way for ``pass`` to mean nothing.

* ``guarded``: hand-written attention whose score path has a branch SDPA cannot express
  (talking heads: the scores mixed across heads), behind a parameter that holds when the
  model runs. The rewrite keeps the original path behind that guard, so the "swapped"
  code computes exactly what eager does, without calling SDPA.
* ``dtype_eps``: a norm whose eps is picked by dtype (1e-5 in float32, 1e-3 otherwise): the
  float64 reference is a different function from the model in float32.
* ``plain``: the same attention with neither, for contrast.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class TalkingHeadsAttention(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mix = nn.Linear(heads, heads, bias=False)  # talking heads: mixes the scores across heads

    def forward(self, x, talking_heads=True):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if talking_heads:
            att = self.mix(att.transpose(1, -1)).transpose(1, -1)
        att = F.softmax(att, dim=-1)
        y = att @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Norm(nn.Module):
    """A LayerNorm whose eps depends on the dtype it runs in (as some reference code does)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + eps) * self.weight


class Attention(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att, dim=-1)
        y = att @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Model(nn.Module):
    def __init__(self, attention=Attention, vocab=64, d=32, norms=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norms = nn.ModuleList([Norm(d) if norms else nn.Identity() for _ in range(2)])
        self.blocks = nn.ModuleList([attention(d) for _ in range(2)])
        self.head = nn.Linear(d, vocab)
        with torch.no_grad():
            self.emb.weight.mul_(0.02)  # small activations: the norm's eps matters

    def forward(self, idx):
        x = self.emb(idx)
        for n, b in zip(self.norms, self.blocks):
            x = x + b(n(x))
        return self.head(x)


def guarded():
    torch.manual_seed(0)
    return Model(TalkingHeadsAttention).eval()


def dtype_eps():
    torch.manual_seed(0)
    return Model(Attention, norms=True).eval()


def plain():
    torch.manual_seed(0)
    return Model(Attention).eval()


def llama_head_dim_6():
    """A tiny transformers Llama with head_dim 6, for a GPU in float32: flash and cuDNN take no
    float32, and memory-efficient attention needs a head_dim divisible by 4 in float32, so SDPA
    falls back to its math kernel, and torch says why."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=6, max_position_embeddings=512,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).eval()
