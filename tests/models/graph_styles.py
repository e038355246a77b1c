"""Hand-written attention that the source matcher (swap/scan) refuses, for the graph path
(swap/graph.py, issue 20): each style is written here, in the manner of the constructs the
issue lists (helpers with extra flags, nn.Softmax built inline, scores in branches, einsum
equations built at run time, baddbmm over torch.empty, in-place scaling and masking, biases
summed in a loop, K stored pre-transposed, arithmetic masks).

Every style takes x [B, S, D] and a padding mask [B, S] (1 = real token) and returns
[B, S, D]; ``sdpa(x, mask)`` computes the same attention with F.scaled_dot_product_attention
from the same projections. ``STYLES`` maps a name to (class, expected): 'swap', or the words
the refusal must contain. ``build_<name>()`` (lower case) wraps a style in a two-block model.

Layouts are named on every reshape: [B, H, S, D] is SDPA's.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

D_MODEL, HEADS = 64, 4


def softmax(x, dim, onnx_trace=False, upcast=True):
    """fairseq utils.softmax style: a helper with extra flags, upcast to float32 by default."""
    if onnx_trace:
        return F.softmax(x.float(), dim=dim)
    if upcast:
        return F.softmax(x, dim=dim, dtype=torch.float32)
    return F.softmax(x, dim=dim)


def key_padding(mask):
    """[B, S] long (1 = real token) -> [B, 1, 1, S] bool, True where the key is padding."""
    return (mask == 0)[:, None, None, :]


class Heads(nn.Module):
    """q, k, v projections; ``split`` gives [B, H, S, D] each."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__()
        self.h, self.hd = h, d // h
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def split(self, x):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.h, self.hd).transpose(1, 2)  # [B, H, S, D]
        k = self.wk(x).view(B, S, self.h, self.hd).transpose(1, 2)
        v = self.wv(x).view(B, S, self.h, self.hd).transpose(1, 2)
        return q, k, v

    def merge(self, o):  # [B, H, S, D] -> [B, S, H*D]
        B, H, S, D = o.shape
        return self.wo(o.transpose(1, 2).reshape(B, S, H * D))

    def sdpa(self, x, mask, **kw):
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, **kw))


class HelperSoftmax(Heads):
    """The softmax through the model's own helper, with extra flags (onnx_trace, upcast)."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.hd ** -0.5
        probs = softmax(scores, dim=-1, onnx_trace=False).type_as(scores)
        return self.merge(torch.matmul(probs, v))


class InlineSoftmaxModule(Heads):
    """An nn.Softmax(dim=-1) built inside forward and called on the next line, with a key-padding mask."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        attn = attn.masked_fill(key_padding(mask), float("-inf"))
        normalize = nn.Softmax(dim=-1)
        attn = normalize(attn)
        return self.merge(attn @ v)

    def sdpa(self, x, mask):
        return super().sdpa(x, mask, attn_mask=~key_padding(mask))


class BranchedCache(Heads):
    """Scores computed in branches: one with a KV cache (concatenated keys), one without."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__(d, h)
        self.cache = None  # (k, v) [B, H, S_past, D] while decoding

    def forward(self, x, mask):
        q, k, v = self.split(x)
        if self.cache is not None:
            k = torch.cat([self.cache[0], k], dim=2)
            v = torch.cat([self.cache[1], v], dim=2)
            w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hd)
        else:
            w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hd)
            w = w.masked_fill(key_padding(mask), -1e9)
        w = F.softmax(w, dim=-1)
        return self.merge(torch.matmul(w, v))

    def sdpa(self, x, mask):
        return super().sdpa(x, mask, attn_mask=~key_padding(mask))


class EinsumFString(Heads):
    """einsum equations from an f-string; a causal mask through torch.where."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        b, h = "b", "h"
        S = x.shape[1]
        sim = torch.einsum(f"{b}{h}id,{b}{h}jd->{b}{h}ij", q, k) * self.hd ** -0.5
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        sim = torch.where(causal, sim, torch.finfo(sim.dtype).min)
        attn = sim.softmax(dim=-1)
        out = torch.einsum(f"{b}{h}ij,{b}{h}jd->{b}{h}id", attn, v)
        return self.merge(out)

    def sdpa(self, x, mask):
        return super().sdpa(x, mask, is_causal=True)


class BaddbmmEmpty(Heads):
    """GPT-NeoX style: torch.baddbmm over torch.empty with beta=0, alpha=1/sqrt(d), the operands
    by keyword (batch1=, batch2=), K stored pre-transposed [B*H, D, S]."""

    def forward(self, x, mask):
        B, S, _ = x.shape
        q, k, v = self.split(x)
        q = q.reshape(B * self.h, S, self.hd)  # [B*H, S, D]
        k = k.transpose(-1, -2).reshape(B * self.h, self.hd, S)  # [B*H, D, S], pre-transposed
        v = v.reshape(B * self.h, S, self.hd)
        norm = math.sqrt(self.hd)
        w = torch.baddbmm(torch.empty(B * self.h, S, S, dtype=q.dtype, device=q.device), batch1=q, batch2=k,
                          beta=0.0, alpha=1.0 / norm)
        w = F.softmax(w, dim=-1)
        return self.merge(torch.bmm(w, v).view(B, self.h, S, self.hd))


class InPlace(Heads):
    """In-place scaling and masking: q /= sqrt(d), then w.mul_(s).masked_fill_(...) chained."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        q = q.contiguous()
        q /= math.sqrt(self.hd)
        w = q @ k.transpose(-1, -2)
        w.mul_(0.5).masked_fill_(key_padding(mask), float("-inf"))
        return self.merge(w.softmax(-1) @ v)

    def sdpa(self, x, mask):
        return super().sdpa(x, mask, attn_mask=~key_padding(mask), scale=0.5 / math.sqrt(self.hd))


class BiasLoop(Heads):
    """Biases summed in a loop (ALiBi and a learned relative-position table): for b in biases: a += b."""

    def __init__(self, d=D_MODEL, h=HEADS, max_len=4096):
        super().__init__(d, h)
        self.register_buffer("slopes", torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)]), persistent=False)
        self.rel = nn.Parameter(0.1 * torch.randn(h, 2 * max_len - 1))
        self.max_len = max_len

    def biases(self, S, device):
        pos = torch.arange(S, device=device)
        distance = pos[None, :] - pos[:, None]  # [S, S], key minus query
        alibi = self.slopes[:, None, None] * distance.abs().neg()[None]  # [H, S, S]
        table = self.rel[:, distance + self.max_len - 1]  # [H, S, S]
        return [alibi, table]

    def forward(self, x, mask):
        q, k, v = self.split(x)
        a = torch.matmul(q, k.transpose(-1, -2)) * self.hd ** -0.5
        for b in self.biases(x.shape[1], x.device):
            a += b
        a = F.softmax(a, dim=-1)
        return self.merge(torch.matmul(a, v))

    def sdpa(self, x, mask):
        alibi, table = self.biases(x.shape[1], x.device)
        return super().sdpa(x, mask, attn_mask=alibi + table)


class ArithmeticMask(Heads):
    """The TF-style arithmetic mask w * m + -1e9 * (1 - m) on a key-padding mask, the softmax
    upcast and cast back (x.float().softmax(-1).type_as(x))."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        w = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
        m = mask[:, None, None, :].to(w.dtype)  # [B, 1, 1, S], 1 = real key
        w = w * m + -1e9 * (1 - m)
        w = w.float().softmax(-1).type_as(w)
        return self.merge(w @ v)

    def sdpa(self, x, mask):
        return super().sdpa(x, mask, attn_mask=~key_padding(mask))


# ----------------------------------------------------------------------------- flex_attention only (issue 21)

def alibi_slopes(h):
    """ALiBi's per-head slopes, 2^(-8 i / h) for i = 1..h (Press et al. 2022, for h a power of 2)."""
    return torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)])


class AlibiArange(Heads):
    """ALiBi built in forward from positions: slope[h] * -|i - j| added to the scores, causal by
    masked_fill; the bias [H, S, S] is a function of (head, query, key) that flex computes per score."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__(d, h)
        self.register_buffer("slopes", alibi_slopes(h))

    def forward(self, x, mask):
        q, k, v = self.split(x)
        S = x.shape[1]
        pos = torch.arange(S, device=x.device)
        distance = (pos[None, :] - pos[:, None]).abs().neg()  # [S, S]
        bias = self.slopes[:, None, None] * distance  # [H, S, S]
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hd) + bias
        causal = pos[None, :] > pos[:, None]
        s = s.masked_fill(causal, float("-inf"))
        return self.merge(torch.matmul(torch.softmax(s, dim=-1), v))

    def sdpa(self, x, mask):
        S = x.shape[1]
        pos = torch.arange(S)
        bias = self.slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs().neg()
        bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        return super().sdpa(x, mask, attn_mask=bias)


class CausalArange(Heads):
    """AlibiArange without the bias: causal by masked_fill from positions (the unmodified model)."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        pos = torch.arange(x.shape[1], device=x.device)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hd)
        s = s.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        return self.merge(torch.matmul(torch.softmax(s, dim=-1), v))

    def sdpa(self, x, mask):
        return super().sdpa(x, mask, is_causal=True)


class SoftCapKeyAlibi(AlibiArange):
    """BLOOM-style ALiBi, slope[h] * j as [H, 1, S] (softmax is shift-invariant per row), then a
    soft-cap: a term of positions along the key axis alone, read as the small tensor it is."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        pos = torch.arange(x.shape[1], device=x.device)
        s = q @ k.transpose(-1, -2) * self.hd ** -0.5 + self.slopes[:, None, None] * pos[None, None, :]
        s = 20.0 * torch.tanh(s / 20.0)
        return self.merge(torch.softmax(s, dim=-1) @ v)

    sdpa = None


class Differential(Heads):
    """Differential attention (Ye et al. 2024, "Differential Transformer"): q and k split into
    two half-width maps per head, one softmax over the 2H maps, combined as w0 - λ w1 before
    ·V. By linearity it is two SDPA calls per head combined after ·V."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__(d, h)
        self.lam = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, mask):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, 2 * self.h, self.hd // 2).transpose(1, 2)  # [B, 2H, S, D/2]
        k = self.wk(x).view(B, S, 2 * self.h, self.hd // 2).transpose(1, 2)
        v = self.wv(x).view(B, S, self.h, self.hd).transpose(1, 2)  # [B, H, S, D]
        w = torch.matmul(q, k.transpose(-1, -2)) * (self.hd // 2) ** -0.5
        w = F.softmax(w, dim=-1, dtype=torch.float32).type_as(w)
        w = w.view(B, self.h, 2, S, S)
        w = w[:, :, 0] - self.lam * w[:, :, 1]
        return self.merge(torch.matmul(w, v))

    def sdpa(self, x, mask):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.h, 2, self.hd // 2).permute(0, 2, 3, 1, 4)  # [B, H, 2, S, D/2]
        k = self.wk(x).view(B, S, self.h, 2, self.hd // 2).permute(0, 2, 3, 1, 4)
        v = self.wv(x).view(B, S, self.h, self.hd).transpose(1, 2)
        o0 = F.scaled_dot_product_attention(q[:, :, 0], k[:, :, 0], v)
        o1 = F.scaled_dot_product_attention(q[:, :, 1], k[:, :, 1], v)
        return self.merge(o0 - self.lam * o1)


class SoftCapAlibi(AlibiArange):
    """Gemma-2 style soft-cap after an ALiBi bias (both in one score_mod): 20 * tanh((s + b) / 20)."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        pos = torch.arange(x.shape[1], device=x.device)
        s = q @ k.transpose(-1, -2) * self.hd ** -0.5 + self.slopes[:, None, None] * -(pos[None, :] - pos[:, None]).abs()
        s = 20.0 * torch.tanh(s / 20.0)
        return self.merge(F.softmax(s, dim=-1) @ v)

    sdpa = None


class Sinks(Heads):
    """Attention sinks (as gpt-oss writes them): a learned per-head logit joined as an extra
    score column before the softmax and sliced off after it. It equals SDPA with one zero
    key and value whose mask column holds the sink logit."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__(d, h)
        self.sinks = nn.Parameter(torch.randn(h))

    def masked(self, s, mask):
        return s.masked_fill(key_padding(mask), float("-inf"))

    def forward(self, x, mask):
        q, k, v = self.split(x)
        B, H, S, _ = q.shape
        s = self.masked(q @ k.transpose(-1, -2) * self.hd ** -0.5, mask)
        s = torch.cat([s, self.sinks.reshape(1, H, 1, 1).expand(B, -1, S, -1)], dim=-1)
        w = torch.softmax(s, dim=-1)[..., :-1]
        return self.merge(w @ v)

    def sdpa(self, x, mask):
        q, k, v = self.split(x)
        B, H, S, D = q.shape
        k, v = (torch.cat([t, t.new_zeros(B, H, 1, D)], 2) for t in (k, v))
        m = torch.zeros(B, 1, 1, S).masked_fill(key_padding(mask), float("-inf")).expand(B, H, 1, S)
        m = torch.cat([m, self.sinks.reshape(1, H, 1, 1).expand(B, H, 1, 1)], -1)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=m))


class SinksWindow(Sinks):
    """gpt-oss's layers: Sinks with a causal sliding window built from positions instead of
    the padding mask; flex_attention takes both (the window as a BlockMask, the sink as a
    zero key whose score is the logit). Compared with the module itself, not ``sdpa``."""

    W = 16
    sdpa = None

    def masked(self, s, mask):
        pos = torch.arange(s.shape[-1], device=s.device)
        far = (pos[None, :] > pos[:, None]) | (pos[:, None] - pos[None, :] >= self.W)
        return s.masked_fill(far, float("-inf"))


# ----------------------------------------------------------------------------- refused, for the right reason

class SoftCapHelper(Heads):
    """Gemma-2 style soft-capping 30 * tanh(s / 30), softmax through the helper: no mask expresses it."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        s = torch.matmul(q, k.transpose(-1, -2)) * self.hd ** -0.5
        s = 30.0 * torch.tanh(s / 30.0)
        return self.merge(torch.matmul(softmax(s, dim=-1).type_as(s), v))

    sdpa = None


class TalkingHeadsInline(Heads):
    """CaiT talking heads: the scores mixed across heads before the softmax, an nn.Softmax inline."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__(d, h)
        self.mix = nn.Parameter(torch.eye(h) + 0.1 * torch.randn(h, h))

    def forward(self, x, mask):
        q, k, v = self.split(x)
        dots = torch.einsum("bhid,bhjd->bhij", q, k) * self.hd ** -0.5
        dots = torch.einsum("bhij,hg->bgij", dots, self.mix)
        attn = nn.Softmax(dim=-1)(dots)
        return self.merge(torch.einsum("bhij,bhjd->bhid", attn, v))

    sdpa = None


# ----------------------------------------------------------------------------- held-out set 4's constructs

def stable_softmax(t, dim=-1):
    """A softmax helper that subtracts each row's max first: softmax(x - max x) = softmax(x)."""
    t = t - t.amax(dim=dim, keepdim=True).detach()
    return t.softmax(dim)


class RowMaxShift(Heads):
    """The row max subtracted before the softmax, inside the model's own helper."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        s = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.hd ** -0.5
        s = s.masked_fill(key_padding(mask), float("-inf"))
        return self.merge(torch.einsum("b h i j, b h j d -> b h i d", stable_softmax(s), v))

    def sdpa(self, x, mask):
        return super().sdpa(x, mask, attn_mask=~key_padding(mask))


class SharedKeyEllipsis(Heads):
    """Multi-query attention in ellipsis einsums: one key and value head [B, S, D] shared by
    every query head ('... h i d, ... j d -> ... h i j')."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__(d, h)
        self.wk, self.wv = nn.Linear(d, d // h), nn.Linear(d, d // h)

    def forward(self, x, mask):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.h, self.hd).transpose(1, 2)  # [B, H, S, D]
        k, v = self.wk(x), self.wv(x)  # [B, S, D]
        s = torch.einsum("... h i d, ... j d -> ... h i j", q, k) / math.sqrt(self.hd)
        s = s.masked_fill(key_padding(mask), float("-inf"))
        return self.merge(torch.einsum("... h i j, ... j d -> ... h i d", s.softmax(-1), v))

    def sdpa(self, x, mask):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.h, self.hd).transpose(1, 2)
        k, v = (w(x)[:, None].expand(-1, self.h, -1, -1) for w in (self.wk, self.wv))
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=~key_padding(mask)))


class RelativeLogits(Heads):
    """Content logits Q·Kᵀ plus relative logits Q·Rᵀ read at each key-minus-query offset, and
    values half as wide as queries and keys."""

    def __init__(self, d=D_MODEL, h=HEADS, max_len=4096):
        super().__init__(d, h)
        self.wv, self.wo = nn.Linear(d, d // 2), nn.Linear(d // 2, d)
        self.rel = nn.Parameter(0.1 * torch.randn(2 * max_len - 1, d // h))
        self.max_len = max_len

    def relative(self, q, S):
        pos = torch.arange(S, device=q.device)
        offset = pos[None, :] - pos[:, None] + self.max_len - 1  # [S, S]
        rel = q @ self.rel.t()  # [B, H, S, 2 max_len - 1]
        return rel.gather(-1, offset.expand(*rel.shape[:2], S, S))

    def forward(self, x, mask):
        B, S, _ = x.shape
        q, k = (w(x).view(B, S, self.h, self.hd).transpose(1, 2) for w in (self.wq, self.wk))
        v = self.wv(x).view(B, S, self.h, self.hd // 2).transpose(1, 2)
        s = (q @ k.transpose(-1, -2) + self.relative(q, S)) / math.sqrt(self.hd)
        return self.merge(s.softmax(-1) @ v)

    def sdpa(self, x, mask):
        B, S, _ = x.shape
        q, k = (w(x).view(B, S, self.h, self.hd).transpose(1, 2) for w in (self.wq, self.wk))
        v = self.wv(x).view(B, S, self.h, self.hd // 2).transpose(1, 2)
        bias = self.relative(q, S) / math.sqrt(self.hd)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


class _WeightsToo(nn.Module):
    """Returns (output, weights), as many attention functions do; its caller drops the weights."""

    def forward(self, q, k, v, masked, dropout=None):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        p = F.softmax(s.masked_fill(masked, -1e9), dim=-1)
        if dropout is not None:
            p = dropout(p)
        return p @ v, p


class ReturnsWeights(Heads):
    """The attention module returns its weights beside its output; the caller drops them."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__(d, h)
        self.core, self.drop = _WeightsToo(), nn.Dropout(0.1)

    def forward(self, x, mask):
        q, k, v = self.split(x)
        out, _ = self.core(q, k, v, key_padding(mask), dropout=self.drop)
        return self.merge(out)

    def sdpa(self, x, mask):
        return super().sdpa(x, mask, attn_mask=~key_padding(mask))


class RefilledMask(Heads):
    """masked_fill(-inf) before the softmax and masked_fill(0) after it with the same mask."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        masked = key_padding(mask)
        s = (q @ k.transpose(-1, -2) * self.hd ** -0.5).masked_fill(masked, float("-inf"))
        return self.merge(torch.softmax(s, dim=-1).masked_fill(masked, 0.0) @ v)

    def sdpa(self, x, mask):
        return super().sdpa(x, mask, attn_mask=~key_padding(mask))


class CosineTau(Heads):
    """Scaled cosine attention: the scores over each query's norm and over a learned per-head
    temperature clamped from below (both constant along the keys: Q's rows scaled)."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__(d, h)
        self.tau = nn.Parameter(torch.linspace(0.2, 1.0, h).view(1, h, 1, 1))

    def forward(self, x, mask):
        q, k, v = self.split(x)
        s = q @ F.normalize(k, dim=-1).transpose(-1, -2) / q.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        s = s / self.tau.clamp(min=0.01)
        s = s.masked_fill(key_padding(mask), float("-inf"))
        return self.merge(s.softmax(-1) @ v)

    def sdpa(self, x, mask):
        q, k, v = self.split(x)
        q = q / q.norm(dim=-1, keepdim=True).clamp(min=1e-6) / self.tau.clamp(min=0.01)
        return self.merge(F.scaled_dot_product_attention(q, F.normalize(k, dim=-1), v,
                                                         attn_mask=~key_padding(mask), scale=1.0))



class CosineProjected(CosineTau):
    """CosineTau with Q, K and V projected by a matmul with a weight tensor (x @ W): the
    query's norm comes out of a contraction too, as the scores do."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__(d, h)
        self.w_qkv = nn.Parameter(torch.randn(d, 3 * d) * d ** -0.5)

    def split(self, x):
        B, S, _ = x.shape
        q, k, v = (x @ self.w_qkv).view(B, S, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        return q, k, v


class SummedProducts(Heads):
    """Latent-style scores: a content product plus a positional one, q·kᵀ + q_r·k_rᵀ, the
    positional key [B, S, R] shared by every head (as decoupled rotary keys are), each
    product scaled on its own; Q and K are head_dim wide, their positional parts R = 8."""

    R = 8

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__(d, h)
        self.wqr, self.wkr = nn.Linear(d, h * self.R), nn.Linear(d, self.R)

    def positional(self, x):
        B, S, _ = x.shape
        return self.wqr(x).view(B, S, self.h, self.R).transpose(1, 2), self.wkr(x)  # [B, H, S, R], [B, S, R]

    def forward(self, x, mask):
        q, k, v = self.split(x)
        qr, kr = self.positional(x)
        scale = (self.hd + self.R) ** -0.5
        s = torch.matmul(q, k.transpose(-1, -2)) * scale + torch.einsum("bhid,bjd->bhij", qr, kr) * scale
        s = s.masked_fill(key_padding(mask), float("-inf"))
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))

    def sdpa(self, x, mask):
        q, k, v = self.split(x)
        qr, kr = self.positional(x)
        q, k = torch.cat([q, qr], -1), torch.cat([k, kr[:, None].expand(-1, self.h, -1, -1)], -1)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=~key_padding(mask)))


class ViewAsMask(Heads):
    """A 0/1 mask laid out by ``view_as(scores)`` and filled into the scores in place: the
    scores are read for their shape alone, before the in-place fill."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hd)
        keep = (mask[:, None, None, :] != 0).expand(-1, self.h, s.shape[-2], -1).reshape(-1, s.shape[-1])
        keep = keep.view_as(s)
        s = s.masked_fill_(keep.float() == 0, -1e9)
        return self.merge(s.softmax(dim=-1) @ v)

    def sdpa(self, x, mask):
        return super().sdpa(x, mask, attn_mask=~key_padding(mask))


class NanZeroed(Heads):
    """The global max subtracted, a -inf padding fill, and the weights' NaNs (rows with every
    key masked) set to 0 after the softmax."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        s = torch.matmul(q, k.transpose(-1, -2)) * self.hd ** -0.5
        s = s.masked_fill(key_padding(mask), float("-inf"))
        w = (s - s.max()).softmax(dim=-1)
        w = w.masked_fill(torch.isnan(w), 0)
        return self.merge(torch.matmul(w, v))

    def sdpa(self, x, mask):
        return super().sdpa(x, mask, attn_mask=~key_padding(mask))


class ChannelsFirst(Heads):
    """Values [B, H, D, S] times the transposed weights, output [B, H, D, S] read with
    ``.view``: the call's output must be contiguous, as the product's was."""

    def forward(self, x, mask):
        B, S, _ = x.shape
        q, k, v = self.split(x)
        w = (torch.matmul(q, k.transpose(-1, -2)) * self.hd ** -0.5).softmax(dim=-1)
        o = torch.matmul(v.transpose(-1, -2).contiguous(), w.permute(0, 1, 3, 2))  # [B, H, D, S]
        return self.wo(o.view(B, self.h * self.hd, S).transpose(1, 2))

    def sdpa(self, x, mask):
        return super().sdpa(x, mask)

STYLES = {
    "HelperSoftmax": (HelperSoftmax, "swap"),
    "InlineSoftmaxModule": (InlineSoftmaxModule, "swap"),
    "BranchedCache": (BranchedCache, "swap"),
    "EinsumFString": (EinsumFString, "swap"),
    "BaddbmmEmpty": (BaddbmmEmpty, "swap"),
    "InPlace": (InPlace, "swap"),
    "BiasLoop": (BiasLoop, "swap"),
    "ArithmeticMask": (ArithmeticMask, "swap"),
    "RowMaxShift": (RowMaxShift, "swap"),
    "SharedKeyEllipsis": (SharedKeyEllipsis, "swap"),
    "RelativeLogits": (RelativeLogits, "swap"),
    "ReturnsWeights": (ReturnsWeights, "swap"),
    "RefilledMask": (RefilledMask, "swap"),
    "CosineTau": (CosineTau, "swap"),
    "CosineProjected": (CosineProjected, "swap"),
    "SummedProducts": (SummedProducts, "swap"),
    "ViewAsMask": (ViewAsMask, "swap"),
    "NanZeroed": (NanZeroed, "swap"),
    "ChannelsFirst": (ChannelsFirst, "swap"),
    "Sinks": (Sinks, "swap"),
    "SoftCapHelper": (SoftCapHelper, "torch.tanh"),
    "TalkingHeadsInline": (TalkingHeadsInline, "talking heads"),
}


#: score modifiers that flex_attention's score_mod takes (issue 21): name -> (class, what SDPA
#: does with it: 'swap' with the bias materialised, or the words of its refusal)
FLEX_STYLES = {
    "AlibiArange": (AlibiArange, "swap"),
    "CausalArange": (CausalArange, "swap"),
    "Differential": (Differential, "swap"),
    "SoftCapHelper": (SoftCapHelper, "torch.tanh"),
    "SoftCapAlibi": (SoftCapAlibi, "torch.tanh"),
    "SoftCapKeyAlibi": (SoftCapKeyAlibi, "torch.tanh"),
    "Sinks": (Sinks, "swap"),
    "SinksWindow": (SinksWindow, "swap"),
}


def pad_mask(batch_size, seq_len):
    """[B, S] long, 1 = real token: row i keeps its first S - i*S/(2B) tokens."""
    m = torch.ones(batch_size, seq_len, dtype=torch.long)
    for i in range(1, batch_size):
        m[i, seq_len - (i * seq_len) // (2 * batch_size):] = 0
    return m


class Block(nn.Module):
    def __init__(self, style, d=D_MODEL, h=HEADS):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = {**STYLES, **FLEX_STYLES}[style][0](d, h)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, mask):
        x = x + self.attn(self.ln(x), mask)
        return x + self.mlp(x)


class StyleModel(nn.Module):
    """x [B, S, D] and a padding mask [B, S] -> [B, S, D]: two blocks of one style."""

    def __init__(self, style, layers=2, d=D_MODEL, h=HEADS):
        super().__init__()
        self.d = d
        self.blocks = nn.ModuleList(Block(style, d, h) for _ in range(layers))

    def forward(self, x, mask):
        for block in self.blocks:
            x = block(x, mask)
        return x


#: the width of the models ``example_inputs`` feeds: D_MODEL, or WIDE's for build_<name>_wide
_WIDTH = [D_MODEL]
#: d_model and heads of the build_<name>_wide models (head_dim 64), for timing on a GPU
WIDE = (1024, 16)


def example_inputs(batch_size, seq_len):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, seq_len, _WIDTH[0], generator=gen), pad_mask(batch_size, seq_len)


def _factory(style, d=D_MODEL, h=HEADS, suffix=""):
    def build():
        torch.manual_seed(0)
        _WIDTH[0] = d
        return StyleModel(style, d=d, h=h)

    build.__name__ = f"build_{style.lower()}{suffix}"
    return build


for _style in {**STYLES, **FLEX_STYLES}:
    globals()[f"build_{_style.lower()}"] = _factory(_style)
    globals()[f"build_{_style.lower()}_wide"] = _factory(_style, *WIDE, suffix="_wide")
