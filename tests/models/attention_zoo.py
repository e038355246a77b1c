"""A zoo of hand-written attention, written the ways research code writes it.

Each style is a small model: `zoo_model(style)` builds an embedding (or a float input),
two blocks of the style's attention, and a head, so find_attention.py and enable_flash.py
can run it as `tests/models/attention_zoo.py:<style>`. Shapes are named on every reshape:
[B, H, S, D] for SDPA's layout, [B, S, H, D] for flash-attn's.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import eager_attention_forward as bert_eager_attention
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager_attention

D_MODEL, HEADS, MAX_LEN = 64, 4, 4096


class FusedQKV(nn.Module):
    """One projection to q, k and v; ``split`` gives them as [B, H, S, D]."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__()
        self.h, self.hd = h, d // h
        self.qkv = nn.Linear(d, 3 * d)

    def split(self, x):
        B, T, _ = x.shape
        return self.qkv(x).reshape(B, T, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)  # 3 x [B, H, S, D]


class NanoGPT(nn.Module):
    """karpathy/nanoGPT: a registered tril buffer, scale after the product, nn.Dropout."""

    def __init__(self, d=D_MODEL, h=HEADS, block=MAX_LEN, dropout=0.0):
        super().__init__()
        self.n_head, self.n_embd = h, d
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class PreScaledCausal(nn.Module):
    """Scale applied to q before the product; causal triu mask filled with -1e9."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__()
        self.h, self.head_dim = h, d // h
        self.scale = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(B, T, self.h, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.h, self.head_dim).transpose(1, 2)
        q = q * self.scale
        scores = torch.matmul(q, k.transpose(-1, -2))
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=1)
        scores = scores.masked_fill(causal, -1e9)
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, C))


class BaddbmmPadding(FusedQKV):
    """Fused qkv, [B*H, S, D] batched matmuls: baddbmm with an additive padding mask and the
    scale as alpha, softmax upcast to fp32 and cast back."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__(d, h)
        self.out = nn.Linear(d, d)

    def forward(self, x, pad_mask):  # pad_mask: [B, S], 1 = real token
        B, T, C = x.shape
        D = C // self.h
        q, k, v = self.qkv(x).view(B, T, 3, self.h, D).permute(2, 0, 3, 1, 4).reshape(3, B * self.h, T, D).unbind(0)
        bias = (1.0 - pad_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # [B, 1, 1, S]
        bias = bias.expand(B, self.h, T, T).reshape(B * self.h, T, T)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=D ** -0.5)
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        ctx = torch.bmm(weights, v)  # [B*H, S, D]
        return self.out(ctx.view(B, self.h, T, D).transpose(1, 2).reshape(B, T, C))


class EinsumBoolMask(FusedQKV):
    """[B, S, H, D] layout with einsum, an explicit constant scale, a boolean keep-mask by where."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__(d, h)
        self.out = nn.Linear(d, d)

    def forward(self, x, pad_mask):  # pad_mask: [B, S], 1 = real token
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, C // self.h).unbind(2)  # each [B, S, H, D]
        keep = pad_mask[:, None, None, :].bool()  # [B, 1, 1, S]
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
        s = torch.where(keep, s, float("-inf"))
        p = s.softmax(dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", p, v)  # [B, S, H, D]
        return self.out(o.reshape(B, T, C))


class GroupedQuery(nn.Module):
    """GQA: 4 query heads share 2 key/value heads, repeated with repeat_interleave on dim 1;
    softmax upcast; causal from tril(ones) == 0."""

    def __init__(self, d=D_MODEL, h=HEADS, kv_heads=2):
        super().__init__()
        self.h, self.kv, self.hd = h, kv_heads, d // h
        self.wq = nn.Linear(d, h * self.hd)
        self.wkv = nn.Linear(d, 2 * kv_heads * self.hd)
        self.wo = nn.Linear(h * self.hd, d)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.h, self.hd).transpose(1, 2)  # [B, H, S, D]
        k, v = self.wkv(x).view(B, T, 2, self.kv, self.hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H_kv, S, D]
        keys = torch.repeat_interleave(k, self.h // self.kv, dim=1)  # [B, H, S, D]
        values = v.repeat_interleave(self.h // self.kv, dim=1)
        scores = q @ keys.transpose(2, 3) / math.sqrt(self.hd)
        mask = torch.tril(torch.ones(T, T, device=x.device)) == 0
        scores = scores.masked_fill(mask, float("-inf"))
        attn = F.softmax(scores.float(), dim=-1).type_as(q)
        out = attn @ values
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a memory of another length; no mask."""

    def __init__(self, d=D_MODEL, h=HEADS, memory_len=24):
        super().__init__()
        self.h, self.head_dim = h, d // h
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)
        self.memory = nn.Parameter(torch.randn(1, memory_len, d) * 0.02)

    def forward(self, x):
        B, T, C = x.shape
        mem = self.memory.expand(B, -1, -1)
        q = self.q(x).view(B, T, self.h, self.head_dim).transpose(1, 2)  # [B, H, S_q, D]
        k, v = self.kv(mem).view(B, -1, 2, self.h, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, S_k, D]
        w = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        w = w.softmax(-1)
        y = torch.matmul(w, v)  # [B, H, S_q, D]
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class FunctionalDropoutInPlace(nn.Module):
    """Scale on k; an in-place masked_fill_ with a 2-D causal buffer; F.dropout in training."""

    def __init__(self, d=D_MODEL, h=HEADS, p=0.1):
        super().__init__()
        self.h, self.hd, self.p = h, d // h, p
        self.proj = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.register_buffer("causal", torch.ones(MAX_LEN, MAX_LEN).tril(), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.proj(x).reshape(B, T, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)  # [B, H, S, D] each
        k = k * self.hd ** -0.5
        s = q @ k.mT
        s.masked_fill_(self.causal[:T, :T] == 0, float("-inf"))
        a = F.softmax(s, dim=-1)
        a = F.dropout(a, p=self.p, training=self.training)
        return self.out((a @ v).transpose(1, 2).reshape(B, T, C))


class SoftmaxModuleBmm(nn.Module):
    """An encoder layer with [B*H, S, D] bmm, nn.Softmax and nn.Dropout modules, no mask."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__()
        self.h, self.hd = h, d // h
        self.qkv = nn.Linear(d, 3 * d)
        self.softmax = nn.Softmax(dim=-1)
        self.drop = nn.Dropout(0.0)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.h, self.hd).permute(2, 0, 3, 1, 4).reshape(3, B * self.h, T, self.hd)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B*H, S, D]
        sim = torch.bmm(q, k.transpose(1, 2)) * self.hd ** -0.5
        attn = self.drop(self.softmax(sim))
        out = torch.bmm(attn, v).reshape(B, self.h, T, self.hd).transpose(1, 2).reshape(B, T, C)
        return self.out(out)


class ReturnsWeights(FusedQKV):
    """Unsupported: the attention weights leave the module and are used by its caller."""

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.split(x)
        att = torch.softmax(q @ k.transpose(-2, -1) * self.hd ** -0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return y, att


class ScaledAfterMask(FusedQKV):
    """An additive mask added before the scale, so the mask is scaled too: exact to fold
    (softmax((S + M) c) = softmax(S c + M c)), which the replay form does."""

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.split(x)
        bias = torch.zeros(T, T, device=x.device, dtype=x.dtype)
        s = (q @ k.transpose(-2, -1) + bias) / math.sqrt(self.hd)
        p = s.softmax(-1)
        return (p @ v).transpose(1, 2).reshape(B, T, C)


class SoftCapped(FusedQKV):
    """Unsupported: logit soft-capping (tanh of the scores), which no mask expresses."""

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.split(x)
        s = q @ k.transpose(-2, -1) * self.hd ** -0.5
        s = 50.0 * torch.tanh(s / 50.0)
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)


# ----------------------------------------------------------------------------- code nobody here wrote


class MhaNeedWeights(nn.Module):
    """nn.MultiheadAttention called with need_weights left at its default (True)."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, h, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0]


class EncoderLayer(nn.Module):
    """torch.nn.TransformerEncoderLayer as it is (it already calls SDPA with need_weights=False)."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, h, dim_feedforward=2 * d, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class LlamaEagerFunction(nn.Module):
    """transformers' Llama eager_attention_forward (GQA through repeat_kv), called by hand."""

    def __init__(self, d=D_MODEL, h=HEADS, kv_heads=2):
        super().__init__()
        self.h, self.kv, self.hd = h, kv_heads, d // h
        self.num_key_value_groups = h // kv_heads
        self.q_proj = nn.Linear(d, h * self.hd)
        self.k_proj = nn.Linear(d, kv_heads * self.hd)
        self.v_proj = nn.Linear(d, kv_heads * self.hd)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.hd).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(B, T, self.kv, self.hd).transpose(1, 2)  # [B, H_kv, S, D]
        v = self.v_proj(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        causal = torch.full((T, T), float("-inf"), device=x.device, dtype=x.dtype).triu(1)[None, None]  # additive
        out, _ = llama_eager_attention(self, q, k, v, causal, scaling=self.hd ** -0.5)
        return self.o_proj(out.reshape(B, T, C))


class BertEagerFunction(nn.Module):
    """transformers' BERT eager_attention_forward with an additive padding mask."""

    def __init__(self, d=D_MODEL, h=HEADS):
        super().__init__()
        self.h, self.hd = h, d // h
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x, pad_mask):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)  # [B, H, S, D] each
        additive = (1.0 - pad_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        out, _ = bert_eager_attention(self, q, k, v, additive, scaling=self.hd ** -0.5)
        return self.o(out.reshape(B, T, C))


# ----------------------------------------------------------------------------- small models around them

STYLES = {cls.__name__: cls for cls in (NanoGPT, PreScaledCausal, BaddbmmPadding, EinsumBoolMask, GroupedQuery,
                                        CrossAttention, FunctionalDropoutInPlace, SoftmaxModuleBmm, ReturnsWeights,
                                        ScaledAfterMask, SoftCapped, MhaNeedWeights, EncoderLayer, LlamaEagerFunction,
                                        BertEagerFunction)}
TAKES_MASK = {"BaddbmmPadding", "EinsumBoolMask", "BertEagerFunction"}


class Block(nn.Module):
    def __init__(self, style: str, **kw):
        super().__init__()
        self.style = style
        self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.attn = STYLES[style](**kw)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, 2 * D_MODEL), nn.GELU(), nn.Linear(2 * D_MODEL, D_MODEL))

    def forward(self, x, pad_mask):
        h = self.ln1(x)
        a = self.attn(h, pad_mask) if self.style in TAKES_MASK else self.attn(h)
        if isinstance(a, tuple):  # ReturnsWeights: its caller uses the weights
            a, weights = a
            a = a + weights.mean(dim=(1, 3))[..., None]
        x = x + a
        return x + self.mlp(self.ln2(x))


class ZooModel(nn.Module):
    """Token ids [B, S] (and a padding mask [B, S], 1 = real token) -> logits [B, S, vocab]."""

    def __init__(self, style: str, vocab: int = 256, layers: int = 2, **kw):
        super().__init__()
        self.emb = nn.Embedding(vocab, D_MODEL)
        self.blocks = nn.ModuleList(Block(style, **kw) for _ in range(layers))
        self.ln = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, vocab)

    def forward(self, ids, pad_mask):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x, pad_mask)
        return self.head(self.ln(x))


def example_inputs(batch_size, seq_len):
    """Token ids [B, S] and a padding mask [B, S]: row i keeps its first S - i*S/(2B) tokens."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (batch_size, seq_len), generator=gen)
    pad_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for i in range(1, batch_size):
        pad_mask[i, seq_len - (i * seq_len) // (2 * batch_size):] = 0
    return ids, pad_mask


def _factory(style):
    def build():
        torch.manual_seed(0)
        return ZooModel(style)

    build.__name__ = style
    return build


for _style in STYLES:
    globals()[_style.lower()] = _factory(_style)


def nanogpt_bench():
    """The benchmark model of references/benchmarks.md: nanoGPT's hand-written causal
    attention in 4 blocks, d_model 256, 8 heads (head_dim 32), vocabulary 256, and a
    causal buffer for sequences up to 8192."""
    torch.manual_seed(0)
    model = ZooModel("NanoGPT", layers=4, d=256, h=8, block=8192)
    model.emb = nn.Embedding(256, 256)
    for block in model.blocks:
        block.ln1, block.ln2 = nn.LayerNorm(256), nn.LayerNorm(256)
        block.mlp = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    model.ln, model.head = nn.LayerNorm(256), nn.Linear(256, 256)
    return model
