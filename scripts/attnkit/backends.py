"""The attention backends, whether each can run here, and which one ``auto`` picks.

Names are transformers' ``attn_implementation`` values, so a choice here is passed to
``set_attn_implementation`` unchanged:

========================  =============  ============================================
backend                   layout         what runs
========================  =============  ============================================
``eager``                 [B, H, S, D]   matmul -> softmax -> matmul; materialises the
                                         [B, H, S, S] score matrix (the baseline)
``sdpa``                  [B, H, S, D]   ``F.scaled_dot_product_attention``: a fused
                                         kernel (flash, efficient, cudnn; flash on CPU)
                                         or the unfused math fallback
``flash_attention_2``     [B, S, H, D]   ``flash_attn_func`` / ``flash_attn_varlen_func``
                                         (flash-attn package); varlen drops padding
``flash_attention_3``     [B, S, H, D]   ``flash_attn_interface.flash_attn_func``
                                         (FlashAttention-3, the Hopper build)
``flex_attention``        [B, H, S, D]   ``torch.nn.attention.flex_attention``, compiled
========================  =============  ============================================

``availability()`` gives each backend's verdict with its reason (not installed, the
import error, GPU capability, dtype, head_dim, the model class); ``choose()`` applies
them: ``auto`` takes the first available of ``AUTO_ORDER`` and records why every other
backend was not taken; a forced backend that cannot run raises ``CannotRun``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .env import Environment, architecture
from .report import CannotRun

#: The largest head_dim flash-attn compiles kernels for ("All head dimensions up to 256",
#: flash-attn README, FlashAttention-2 section); SDPA's CUDA flash kernel has the same limit.
FLASH_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class BackendInfo:
    """One entry of the catalogue."""

    name: str
    description: str
    layout: str
    package: str | None  # module that must import, or None for torch itself
    dtypes: tuple[torch.dtype, ...] | None  # None: any floating dtype
    cuda_only: bool
    min_capability: tuple[int, int] | None
    max_head_dim: int | None
    class_flag: str | None  # transformers' PreTrainedModel flag that says the class supports it
    fused_markers: tuple[str, ...]  # substrings of profiler names that prove it ran


CATALOGUE: dict[str, BackendInfo] = {
    "eager": BackendInfo(
        "eager", "hand-written matmul -> softmax -> matmul; materialises the [B, H, S, S] scores",
        "[B, H, S, D]", None, None, False, None, None, None, ()),
    "sdpa": BackendInfo(
        "sdpa", "torch.nn.functional.scaled_dot_product_attention: dispatches to a fused kernel "
                "(flash, efficient, cudnn on CUDA; flash on CPU) or falls back to math",
        "[B, H, S, D]", None, None, False, None, None, "_supports_sdpa",
        ("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
         "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_fused_attention_overrideable")),
    "flash_attention_2": BackendInfo(
        "flash_attention_2", "flash_attn_func / flash_attn_varlen_func from the flash-attn package "
                             "(FlashAttention-2); transformers' varlen path drops padding tokens",
        "[B, S, H, D]", "flash_attn", (torch.float16, torch.bfloat16), True, (8, 0), FLASH_MAX_HEAD_DIM,
        "_supports_flash_attn", ("flash_attn", "flash_fwd")),
    "flash_attention_3": BackendInfo(
        "flash_attention_3", "flash_attn_interface.flash_attn_func (FlashAttention-3, the separate Hopper build)",
        "[B, S, H, D]", "flash_attn_interface", (torch.float16, torch.bfloat16), True, (8, 0), FLASH_MAX_HEAD_DIM,
        "_supports_flash_attn", ("flash_attn_3", "flash_attn_interface", "flash_fwd", "FlashAttnFwd")),
    "flex_attention": BackendInfo(
        "flex_attention", "torch.nn.attention.flex_attention: score_mod / block_mask compiled by torch.compile",
        "[B, H, S, D]", "torch.nn.attention.flex_attention", None, False, None, None, "_supports_flex_attn",
        ("flex_attention",)),
}

BACKENDS = tuple(CATALOGUE)

#: ``auto`` takes the first available of these, and says why in ``WHY``.
AUTO_ORDER = ("flash_attention_3", "flash_attention_2", "sdpa")

WHY = {
    "flash_attention_3": "FlashAttention-3 is written for Hopper (asynchronous wgmma and TMA, warp specialisation); "
                         "its paper's abstract reports a 'speedup on H100 GPUs by 1.5-2.0x with FP16 reaching up to "
                         "740 TFLOPs/s' (Shah et al. 2024, arXiv:2407.08608)",
    "flash_attention_2": "the FlashAttention-2 kernels that SDPA's flash kernel is built from, plus transformers' "
                         "varlen path, which skips padding tokens instead of masking them, and native sliding windows",
    "sdpa": "ships with torch and dispatches to the fastest fused kernel the inputs allow "
            "(flash, cuDNN or memory-efficient on CUDA; the fused flash kernel on CPU)",
}

NOT_AUTO = {
    "eager": "the baseline: hand-written attention materialises the [B, H, S, S] scores; kept as the reference to beat",
    "flex_attention": "not picked by auto: it compiles a kernel per shape with torch.compile (slow first call); "
                      "pass --backend flex_attention to measure it",
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(text: str, env: Environment, device: str) -> torch.dtype:
    """``auto`` (bf16 on sm80+ GPUs, fp16 on older GPUs, fp32 on CPU) or a dtype name.

    Raises ``CannotRun`` for an unknown name.
    """
    if text == "auto":
        return env.default_dtype(device)
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise CannotRun(f"unknown --dtype {text!r}; choose auto, float32, bfloat16 or float16",
                        "bfloat16 on Ampere-or-newer GPUs, float32 on CPU") from None


def resolve_device(text: str, env: Environment) -> str:
    """``auto`` (cuda when a GPU is visible, else cpu), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises ``CannotRun`` when the device does not exist here.
    """
    if text == "auto":
        return env.default_device()
    if text == "cpu":
        return "cpu"
    if text == "cuda" or text.startswith("cuda:"):
        if not env.cuda_available:
            raise CannotRun(f"--device {text}: no CUDA GPU is visible to torch {env.torch_version} "
                            f"(CUDA build: {env.cuda_version or 'none, a CPU-only build'})", "use --device cpu")
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= len(env.gpus):
            raise CannotRun(f"--device {text}: only {len(env.gpus)} GPU(s) visible", "use --device cuda:0")
        return text
    raise CannotRun(f"unknown --device {text!r}; choose auto, cpu, cuda or cuda:N", "")


@dataclass
class Availability:
    """Whether ``backend`` can run for this model, device and dtype, and why not."""

    backend: str
    available: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "available": self.available, "reason": self.reason}


def head_dim_of(model: Any) -> int | None:
    """head_dim from a transformers config (``head_dim`` or hidden_size / num_attention_heads)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        config = config.get_text_config()
    except AttributeError:
        pass
    head_dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    return head_dim


def availability(name: str, *, env: Environment, device: str, dtype: torch.dtype, model: Any = None) -> Availability:
    """Can ``name`` run here? Checks the model class, the dtype, the package, the device,
    the GPU capability and head_dim; every failing one is a reason, in that order, joined
    by "; " (the first is the headline).

    Raises ``CannotRun`` for a name not in ``CATALOGUE``.
    """
    if name not in CATALOGUE:
        raise CannotRun(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}", "")
    info = CATALOGUE[name]
    reasons = []
    if model is not None and info.class_flag and hasattr(model, info.class_flag) and not getattr(model, info.class_flag):
        reasons.append(f"{type(model).__name__} does not support {name} (transformers sets {info.class_flag} = False "
                       "for this class)")
    if info.dtypes and dtype not in info.dtypes:
        reasons.append(f"{name} runs fp16 and bf16 only (its kernels have no {dtype_name(dtype)} path); "
                       "pass --dtype bfloat16 (or float16 on GPUs older than Ampere)")
    if name == "sdpa" and not env.torch_sdpa_ok:
        reasons.append(f"torch {env.torch_version} is older than 2.2: no fused SDPA kernels")
    if info.package:
        probe = getattr(env, info.package, None)
        if probe is None:  # a torch submodule, e.g. flex_attention
            try:
                __import__(info.package)
            except Exception as exc:
                reasons.append(f"{info.package} does not import ({type(exc).__name__}: {exc})")
        elif not probe.importable:
            reasons.append(f"{info.package}: {probe.meaning} [{probe.error}]")
    if info.cuda_only and not device.startswith("cuda"):
        reasons.append(f"{name} needs a CUDA GPU; the device here is {device}")
    elif info.min_capability and env.capability is not None and env.capability < info.min_capability:
        reasons.append(f"{name} needs compute capability {info.min_capability[0]}.{info.min_capability[1]}+; "
                       f"GPU 0 is {architecture(env.capability)}")
    head_dim = head_dim_of(model)
    if info.max_head_dim and head_dim and head_dim > info.max_head_dim:
        reasons.append(f"head_dim {head_dim} > {info.max_head_dim}, the largest {name} compiles")
    return Availability(name, not reasons, "; ".join(reasons) or "available")


@dataclass
class Choice:
    """The backend to switch to, why, and why each other one was not taken."""

    backend: str
    why: str
    rejected: list[Availability]


def choose(requested: str, *, env: Environment, device: str, dtype: torch.dtype, model: Any = None) -> Choice:
    """Pick the backend: ``auto`` or a forced name.

    ``auto`` takes the first available of ``AUTO_ORDER`` (FlashAttention-3 only on Hopper,
    the GPU it is written for). Raises ``CannotRun`` when a forced backend cannot run here,
    with what to install or pass, or when ``auto`` finds nothing better than eager.
    """
    verdicts = {name: availability(name, env=env, device=device, dtype=dtype, model=model) for name in BACKENDS}
    if requested != "auto":
        if requested not in CATALOGUE:
            raise CannotRun(f"unknown --backend {requested!r}; choose from auto, {', '.join(BACKENDS)}", "")
        v = verdicts[requested]
        if not v.available:
            raise CannotRun(f"--backend {requested} cannot run here: {v.reason}", _hint(requested, v.reason))
        chosen, why = requested, "forced with --backend"
    else:
        chosen, why = None, ""
        for name in AUTO_ORDER:
            v = verdicts[name]
            if name == "flash_attention_3" and v.available and (env.capability or (0, 0))[0] != 9:
                verdicts[name] = Availability(name, True, "available, but auto takes FlashAttention-3 only on Hopper "
                                                          "(sm90), the GPU it is written for")
                continue
            if v.available:
                chosen, why = name, WHY[name]
                break
        if chosen is None:
            raise CannotRun("no fused attention backend can run here: " +
                            "; ".join(f"{n}: {verdicts[n].reason}" for n in AUTO_ORDER), "see check_env.py")
    rejected = []
    for name in BACKENDS:
        if name == chosen:
            continue
        v = verdicts[name]
        if name in NOT_AUTO:
            reason = NOT_AUTO[name] if v.available else f"{v.reason}"
        elif v.available and v.reason == "available":
            reason = f"available, but {chosen} was preferred" + (" (forced)" if requested != "auto" else "")
        else:
            reason = v.reason
        rejected.append(Availability(name, v.available, reason))
    return Choice(chosen, why, rejected)


def _hint(name: str, reason: str) -> str:
    if "fp16 and bf16" in reason:
        return "pass --dtype bfloat16 (or --backend sdpa, which runs fp32 too)"
    if "not installed" in reason:
        return "install it, or use --backend sdpa, which ships with torch"
    if "needs a CUDA GPU" in reason:
        return "run on a machine with an NVIDIA GPU, or use --backend sdpa on this one"
    return "use --backend auto to take the best backend that runs here"
