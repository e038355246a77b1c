"""Factory models for the tests: `tests/models/zoo.py:<name>` specs."""

import torch
from torch import nn


def not_a_module():
    return {"weights": [1, 2, 3]}


def no_attention():
    return nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 100))


def raises():
    raise FileNotFoundError("checkpoint.pt not found")


class MhaEncoder(nn.Module):
    """Plain PyTorch attention (nn.MultiheadAttention): attention, but no transformers switch."""

    def __init__(self, d_model=32, heads=4):
        super().__init__()
        self.d_model = d_model
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)

    def forward(self, x):  # x: [B, S, d_model]
        return self.attn(x, x, x)[0]


def mha():
    return MhaEncoder()


def llama_factory():
    """A transformers model returned by a factory: switchable like a hub checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def wide_llama():
    """One layer, 16 heads, vocab 256: eager's [B, H, S, S] scores dwarf everything else,
    so a memory limit can stop the eager baseline while SDPA still runs."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=65536)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def gemma2_softcap():
    """Gemma-2 soft-caps its attention logits: a feature SDPA does not provide."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0,
                          max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")
