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

from . import calls, fp8_cudnn
from .record import FEATURES, Backend, Fp8Path, SdpaKernel, Support

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
CUDNN_FP8_SURFACE = "cudnn-frontend 1.17.0 include/cudnn_frontend/node/sdpa_support_surface.h, FP8 branch for sm90"
CUDNN_FP8_PROBE = "built and run on an H100 (sm90) with cuDNN 9.19 and nvidia-cudnn-frontend 1.17.0, 2026-11-23"

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
    backward_devices=("cuda",),  # torch 2.13 on CPU: "FlexAttention does not support backward on CPU"
    causal_alignment="as the block mask says", call=calls.flex,
    compiles="torch.compile builds a kernel per shape (Triton on CUDA, C++ through inductor on CPU)",
    why="torch.compile generates a fused kernel for the model's own score and mask functions",
)



def _cudnn_library(env) -> str:
    """'' when the cuDNN library torch loaded can run FP8 attention (9.1 or newer, not
    9.10.0: the frontend's support surface), else why not. Without a GPU the device check
    already says why."""
    if not env.cuda_available:
        return ""
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if version is None:
        return f"torch {env.torch_version} loaded no cuDNN library"
    if version < 90100 or 91000 <= version < 91001:
        return f"cuDNN {version} cannot run FP8 attention: it needs 9.1 or newer, not 9.10.0 ({CUDNN_FP8_SURFACE})"
    return ""


FP8 = Backend(
    "fp8", "cuDNN's FP8 attention (graph op sdpa_fp8 of nvidia-cudnn-frontend): q, k and v quantised per tensor "
           "to float8_e4m3fn, e4m3 output de-quantised to the model's dtype; forward only", "[B, H, S, D]",
    distributions=("nvidia-cudnn-frontend",), module="cudnn", entry="pygraph",
    install="pip install nvidia-cudnn-frontend==1.17.0 (or pip install '.[fp8]'); it drives the cuDNN library a CUDA "
            "build of torch ships",
    devices=("cuda",), capabilities=(9, 10), dtypes=HALF, max_head_dim=fp8_cudnn.MAX_HEAD_DIM,
    head_dim_multiple=fp8_cudnn.HEAD_DIM_MULTIPLE, class_flag="_supports_attention_backend",
    kernel_markers=(fp8_cudnn.PROFILER_RANGE,),
    features={
        "gqa": Support(True, "key/value with fewer heads than the query (H a multiple of H_kv)",
                       f"{CUDNN_FP8_PROBE}, 32 query / 8 key-value heads"),
        "mqa": Support(True, "as GQA with one key/value head", "the same graph as GQA (H_kv = 1)"),
        "sliding_window": Support(False, "the FP8 graphs here are causal or full; a window mask is refused",
                                  "scripts/attnkit/backends/fp8_cudnn.py (no bounds other than causal)"),
        "padding": Support(False, "no padding mask: a padded batch is refused (sm90 FP8 dropped packed variable "
                                  "sequences)", "cudnn-frontend 1.22.0 release notes: 'fp8 datatype with packed "
                                                "variable sequences (THD) is no longer supported for SM90'"),
        "softcap": Support(False, "the FP8 graph here has no soft-capping",
                           "scripts/attnkit/backends/fp8_cudnn.py (its sdpa_fp8 graph)"),
        "alibi": Support(False, "no bias on the FP8 path", "cudnn-frontend 1.32.0 sdpa_support_surface.h: bias "
                                                            "refused for FP8"),
        "dropout": Support(False, "inference only: scale_s = 448 assumes no dropout",
                           "cudnn-frontend 1.32.0 sdpa_fp8 docstring, Amax S: '448 for E4M3 without dropout'"),
    },
    causal_alignment="top-left only on sm90 (bottom-right is Blackwell-only: " + CUDNN_FP8_SURFACE + ")",
    backward=False, auto=False, call=fp8_cudnn.call, extra_probe=_cudnn_library, hf=False, precision="fp8_e4m3",
    why="FP8 tensor cores on Hopper: cuDNN's FP8 forward through a PyPI wheel, no compiler needed",
    not_auto="never picked by auto: FP8 changes the numerics (about 0.06 relative RMS error per attention call, "
             "against 0.002 for bf16); force it with --backend fp8, which judges it by the FP8 accuracy rule",
)

#: name -> record, in the order reports list them.
BACKENDS: dict[str, Backend] = {b.name: b for b in (EAGER, SDPA, FLASH_ATTENTION_2, FLASH_ATTENTION_3,
                                                     FLASH_ATTENTION_4, FLEX_ATTENTION, FP8)}

FA4_FP8 = "flash_attn/cute/interface.py (flash-attn-4 4.0.0b36): FP8 inputs run on SM100 only, forward only"

#: Every library that runs FP8 attention, for ``check_env`` (``choice.fp8_availability``).
FP8_PATHS: tuple[Fp8Path, ...] = (
    Fp8Path("cudnn", "cuDNN sdpa_fp8 through nvidia-cudnn-frontend: the fp8 backend here", (9, 10),
            f"{CUDNN_FP8_SURFACE}; {CUDNN_FP8_PROBE}", record=FP8),
    Fp8Path("flash_attention_3", "FlashAttention-3 flash_attn_interface.flash_attn_func with e4m3 inputs and "
                                 "descales", (9,),
            "flash-attention README, FlashAttention-3 section: 'FP8 forward', H100 / H800", record=FLASH_ATTENTION_3),
    Fp8Path("flash_attention_4", "FlashAttention-4 flash_attn.cute.flash_attn_func with e4m3 inputs", (10,), FA4_FP8,
            record=FLASH_ATTENTION_4),
    Fp8Path("flashinfer", "flashinfer.single_prefill_with_kv_cache with e4m3 q, k, v and per-head scales, bf16 out",
            (9, 10), "flashinfer-python 0.7.2.post1 run on an H200 (issue 12); other GPUs not checked",
            distributions=("flashinfer-python",), module="flashinfer",
            install="pip install flashinfer-python (it compiles its kernels with nvcc on first use: 80 s for the FP8 "
                    "module at head_dim 128; set FLASHINFER_WORKSPACE_BASE to keep them)", needs_nvcc=True),
)
