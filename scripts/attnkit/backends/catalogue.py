"""The backend records: adding a backend means adding one record here.

Names are transformers' ``attn_implementation`` values (``eager``, ``sdpa``,
``flash_attention_2``, ``flash_attention_3``, ``flash_attention_4``, ``flex_attention``),
so a choice is passed to ``set_attn_implementation`` unchanged. SDPA's own kernels
(cudnn, flash, efficient, math) are records inside the ``sdpa`` record.

Every statement of support names its source. FlashAttention is detected by pip
distribution, never by a successful import: FA2 is ``flash-attn`` (module ``flash_attn``),
FA3 ``flash-attn-3`` (module ``flash_attn_interface``, built from the repository's
``hopper/`` folder, not on PyPI), FA4 ``flash-attn-4`` (module ``flash_attn.cute``). FA4's
wheel ships ``flash_attn/cute/`` without ``flash_attn/__init__.py``, so with FA4 alone
``import flash_attn`` succeeds as an empty namespace package.
"""

from __future__ import annotations

import torch

from . import calls
from .record import FEATURES, Backend, SdpaKernel, Support

HALF = (torch.float16, torch.bfloat16)

#: The largest head_dim flash-attn compiles kernels for ("All head dimensions up to 256",
#: flash-attn README, FlashAttention-2 section); SDPA's CUDA flash kernel has the same limit.
FLASH_MAX_HEAD_DIM = 256

FA2_DOC = "flash_attn_func docstring (flash-attn): 'Supports multi-query and grouped-query attention (MQA/GQA) by " \
          "passing in KV with fewer heads than Q'"
FA_CHANGELOG = "flash-attn README changelog"
FA3_SIG = "hopper/flash_attn_interface.py flash_attn_func signature (flash-attention repository)"
FA4_SIG = "flash_attn/cute/interface.py flash_attn_func signature (flash-attn-4 4.0.0b36 wheel)"
SDPA_DOC = "torch SDPA docs (torch.nn.functional.scaled_dot_product_attention)"
FLEX_DOC = "torch.nn.attention.flex_attention docs"

EAGER = Backend(
    "eager", "hand-written matmul -> softmax -> matmul; materialises the [B, H, S, S] scores", "[B, H, S, D]",
    features={f: Support(True, "written out in PyTorch ops", "transformers' eager_attention_forward")
              for f in FEATURES},
    causal_alignment="as written", auto=False, call=calls.eager,
    not_auto="the baseline: hand-written attention materialises the [B, H, S, S] scores; kept as the reference to beat",
)

SDPA = Backend(
    "sdpa", "torch.nn.functional.scaled_dot_product_attention: dispatches to a fused kernel (flash, efficient, cudnn "
            "on CUDA; flash on CPU) or falls back to math", "[B, H, S, D]",
    class_flag="_supports_sdpa",
    kernel_markers=("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                    "aten::_scaled_dot_product_cudnn_attention",
                    "aten::_scaled_dot_product_fused_attention_overrideable"),
    kernels=(
        SdpaKernel("cudnn", "CUDNN_ATTENTION", ("aten::_scaled_dot_product_cudnn_attention",), ("cuda",)),
        SdpaKernel("flash", "FLASH_ATTENTION", ("aten::_scaled_dot_product_flash_attention",
                                                "aten::_scaled_dot_product_flash_attention_for_cpu"), ("cpu", "cuda")),
        SdpaKernel("efficient", "EFFICIENT_ATTENTION", ("aten::_scaled_dot_product_efficient_attention",), ("cuda",)),
        SdpaKernel("math", "MATH", ("aten::_scaled_dot_product_attention_math",), ("cpu", "cuda"), fused=False),
    ),
    features={
        "gqa": Support(True, "enable_gqa=True, or the key/value heads repeated first",
                       "torch SDPA docs (enable_gqa, torch 2.5+); transformers/integrations/sdpa_attention.py"),
        "mqa": Support(True, "as GQA with one key/value head", "torch SDPA docs (enable_gqa)"),
        "sliding_window": Support(True, "an explicit attn_mask; on CUDA a mask rules out the flash kernel, efficient "
                                        "or cuDNN run instead", "pytorch sdp_utils: 'Flash Attention does not support "
                                                                "non-null attn_mask'"),
        "padding": Support(True, "an explicit attn_mask: padded positions are masked, still computed",
                           "transformers/integrations/sdpa_attention.py"),
        "softcap": Support(False, "transformers' SDPA path raises: '`sdpa` attention does not support `softcap`'",
                           "transformers/integrations/sdpa_attention.py"),
        "alibi": Support(True, "an additive float attn_mask", "torch SDPA docs (attn_mask)"),
        "dropout": Support(True, "dropout_p", SDPA_DOC),
    },
    causal_alignment="top-left (is_causal: query i sees keys 0..i)", call=calls.sdpa,
    why="ships with torch and dispatches to the fastest fused kernel the inputs allow (flash, cuDNN or "
        "memory-efficient on CUDA; the fused flash kernel on CPU)",
)

FLASH_ATTENTION_2 = Backend(
    "flash_attention_2", "flash_attn_func / flash_attn_varlen_func from the flash-attn package (FlashAttention-2); "
                         "transformers' varlen path drops padding tokens", "[B, S, H, D]",
    distributions=("flash-attn",), module="flash_attn", entry="flash_attn_func",
    install="pip install flash-attn --no-build-isolation (builds from source: needs the CUDA toolkit, a CUDA build "
            "of torch and an Ampere-or-newer GPU; or pip install '.[flash]')",
    devices=("cuda",), min_capability=(8, 0), dtypes=HALF, max_head_dim=FLASH_MAX_HEAD_DIM,
    class_flag="_supports_flash_attn", kernel_markers=("flash_attn::", "flash_fwd", "flash_bwd"),
    features={
        "gqa": Support(True, "key/value with fewer heads than the query", FA2_DOC),
        "mqa": Support(True, "key/value with one head", FA2_DOC),
        "sliding_window": Support(True, "window_size=(left, right)",
                                  f"{FA_CHANGELOG}, 2.3: 'Local (i.e., sliding window) attention'"),
        "padding": Support(True, "flash_attn_varlen_func with cu_seqlens: padding removed, not computed",
                           "flash_attn_varlen_func signature (flash-attn)"),
        "softcap": Support(True, "softcap=", f"{FA_CHANGELOG}, 2.6: 'Softcapping'"),
        "alibi": Support(True, "alibi_slopes=", f"{FA_CHANGELOG}, 2.4: 'ALiBi (attention with linear bias)'"),
        "dropout": Support(True, "dropout_p=", "flash_attn_func signature (flash-attn)"),
    },
    causal_alignment="bottom-right (flash-attn 2.1+: query i sees keys 0..i + S_k - S_q)", varlen=True,
    kv_cache=True, call=calls.flash_attn_2,
    source_name="flash_attn_func", source_import=("from flash_attn import flash_attn_func",),
    why="the FlashAttention-2 kernels that SDPA's flash kernel is built from, plus transformers' varlen path, which "
        "skips padding tokens instead of masking them, and native sliding windows",
)

FLASH_ATTENTION_3 = Backend(
    "flash_attention_3", "flash_attn_interface.flash_attn_func (FlashAttention-3, the separate Hopper build)",
    "[B, S, H, D]",
    distributions=("flash-attn-3", "flash_attn_3"), module="flash_attn_interface", entry="flash_attn_func",
    install="build FlashAttention-3 from the flash-attention repository's hopper/ folder (cd hopper && python "
            "setup.py install); it is not on PyPI and needs an sm90 (Hopper) GPU and CUDA 12.3+",
    devices=("cuda",), min_capability=(8, 0), dtypes=HALF, max_head_dim=FLASH_MAX_HEAD_DIM,
    class_flag="_supports_flash_attn", kernel_markers=("flash_attn_3", "flash_attn_interface", "FlashAttnFwd"),
    features={
        "gqa": Support(True, "key/value with fewer heads (pack_gqa=)", FA3_SIG),
        "mqa": Support(True, "key/value with one head", FA3_SIG),
        "sliding_window": Support(True, "window_size=(left, right)", FA3_SIG),
        "padding": Support(True, "flash_attn_varlen_func with cu_seqlens", FA3_SIG),
        "softcap": Support(True, "softcap=", FA3_SIG),
        "alibi": Support(False, "flash_attn_func has no alibi_slopes parameter", FA3_SIG),
        "dropout": Support(False, "flash_attn_func has no dropout_p parameter", FA3_SIG),
    },
    causal_alignment="bottom-right", varlen=True, kv_cache=True, call=calls.flash_attn_3,
    why="FlashAttention-3 is written for Hopper (asynchronous wgmma and TMA, warp specialisation); its paper's "
        "abstract reports a 'speedup on H100 GPUs by 1.5-2.0x with FP16 reaching up to 740 TFLOPs/s' (Shah et al. "
        "2024, arXiv:2407.08608)",
)

FLASH_ATTENTION_4 = Backend(
    "flash_attention_4", "flash_attn.cute.flash_attn_func (FlashAttention-4, written in the CuTe DSL and compiled "
                         "per configuration on first use)", "[B, S, H, D]",
    distributions=("flash-attn-4",), module="flash_attn.cute", entry="flash_attn_func",
    install="pip install 'flash-attn-4==4.0.0b36' (a pre-release: pin it; with a CUDA 13 build of torch, "
            "'flash-attn-4[cu13]==4.0.0b36'); or pip install '.[fa4]'",
    # Forward runs on sm80 too, but its backward needs sm90+ and transformers takes FA4 only on
    # compute capability 9+ (FLASH_ATTENTION_COMPATIBILITY_MATRIX[4]: cuda_min_major_version 9).
    devices=("cuda",), capabilities=(9, 10), dtypes=HALF, max_head_dim=FLASH_MAX_HEAD_DIM, head_dim_multiple=8,
    class_flag="_supports_flash_attn",
    # What torch.profiler shows: the autograd.Function FlashAttnFunc on the CPU side, and the CuTe
    # DSL kernels kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_...
    # on the GPU (seen on an H100, references/measurements/fa4-probe-h100.json).
    kernel_markers=("FlashAttnFunc", "FlashAttnVarlenFunc", "flash_attncute"),
    features={
        "gqa": Support(True, "key/value with fewer heads than the query (pack_gqa)", FA4_SIG),
        "mqa": Support(True, "key/value with one head", FA4_SIG),
        "sliding_window": Support(True, "window_size=(left, right), None for unbounded", FA4_SIG),
        "padding": Support(True, "flash_attn_varlen_func with cu_seqlens", FA4_SIG),
        "softcap": Support(True, "softcap=", FA4_SIG),
        "alibi": Support(False, "no alibi_slopes parameter (a score_mod can add the bias)", FA4_SIG),
        "dropout": Support(False, "no dropout parameter: training with attention dropout would change the model "
                                  "(transformers drops it without an error at forward time)", FA4_SIG),
    },
    causal_alignment="bottom-right (query i sees keys 0..i + S_k - S_q)", varlen=True, call=calls.flash_attn_4,
    compiles="JIT-compiles one kernel per (dtype, head_dim, GQA ratio, causal, window) on first use; "
             "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 keeps them on disk",
    source_name="flash_attn_cute_func",
    source_import=("try:  # FlashAttention-4 (pip install flash-attn-4); the call falls back to SDPA without it",
                   "    from flash_attn.cute import flash_attn_func as flash_attn_cute_func",
                   "except ImportError:",
                   "    flash_attn_cute_func = None"),
    returns_tuple=True, falls_back_to_sdpa=True,
    why="FlashAttention-4 targets Hopper and Blackwell with kernels generated by the CuTe DSL",
)

FLEX_ATTENTION = Backend(
    "flex_attention", "torch.nn.attention.flex_attention: score_mod / block_mask compiled by torch.compile",
    "[B, H, S, D]", module="torch.nn.attention.flex_attention", entry="flex_attention",
    class_flag="_supports_flex_attn", kernel_markers=("flex_attention",),
    features={
        "gqa": Support(True, "enable_gqa=True", "torch.nn.attention.flex_attention signature"),
        "mqa": Support(True, "enable_gqa=True", "torch.nn.attention.flex_attention signature"),
        "sliding_window": Support(True, "a block_mask", FLEX_DOC),
        "padding": Support(True, "a block_mask", FLEX_DOC),
        "softcap": Support(True, "a score_mod", FLEX_DOC),
        "alibi": Support(True, "a score_mod", FLEX_DOC),
        "dropout": Support(False, "flex_attention has no dropout argument",
                           "torch.nn.attention.flex_attention signature"),
    },
    causal_alignment="as the block mask says", call=calls.flex,
    compiles="torch.compile builds a kernel per shape (Triton on CUDA, C++ through inductor on CPU)",
    why="torch.compile generates a fused kernel for the model's own score and mask functions",
)

#: name -> record, in the order reports list them.
BACKENDS: dict[str, Backend] = {b.name: b for b in (EAGER, SDPA, FLASH_ATTENTION_2, FLASH_ATTENTION_3,
                                                     FLASH_ATTENTION_4, FLEX_ATTENTION)}
