"""Statements between the scores and their softmax that read the scores (issue 20's held-out
finding: a rewrite removed the scores and left such a line reading a name that no longer
existed, NameError).

* ``keeps_dtype``: ``dt = scores.dtype`` only feeds the softmax's cast back: it goes with the
  chain, and the site is swapped.
* ``reads_later``: ``keys = scores.size(-1)`` is read again after the attention (a statistic
  the module keeps): removing the scores would break it, so the site is refused, naming
  both lines.
"""

import math

import torch
from torch import nn


class KeepsDtype(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, self.heads, -1).split(c // self.heads, dim=-1)  # [B, T, H, D] each
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(c // self.heads)
        dt = scores.dtype
        w = torch.softmax(scores.float(), dim=-1).to(dt)
        y = torch.einsum("bhts,bshd->bthd", w, v)
        return self.proj(y.reshape(b, t, c))


class ReadsLater(KeepsDtype):
    def __init__(self, d=32, heads=4):
        super().__init__(d, heads)
        self.keys_seen = 0

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, self.heads, -1).split(c // self.heads, dim=-1)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(c // self.heads)
        keys = scores.size(-1)
        w = torch.softmax(scores, dim=-1)
        y = torch.einsum("bhts,bshd->bthd", w, v)
        self.keys_seen += keys
        return self.proj(y.reshape(b, t, c))


class Model(nn.Module):
    def __init__(self, attention=KeepsDtype, d=32, layers=2):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(attention(d) for _ in range(layers))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return h


def example_inputs(batch_size, seq_len):
    return (torch.randn(batch_size, seq_len, 8, generator=torch.Generator().manual_seed(0)),)


def keeps_dtype():
    torch.manual_seed(0)
    return Model()


def reads_later():
    torch.manual_seed(0)
    return Model(ReadsLater)
