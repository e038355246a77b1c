"""FP8 attention forward on Hopper: cuDNN's ``sdpa_fp8`` graph, through nvidia-cudnn-frontend.

The kernel behind the ``fp8`` backend record. ``call(q, k, v, causal=, scale=)`` takes
bf16/fp16 q [B, S, H, D], k and v [B, S, H_kv, D] (transformers' and flash-attn's layout),
quantises each to ``float8_e4m3fn`` with one scale per tensor, runs the kernel and
returns out [B, S, H, D] in q's dtype. Forward only.

Scales (per tensor, on the GPU, no host sync):

* q, k, v: ``scale = 448 / max|x|``, ``x8 = e4m3(x * scale)``, ``descale = max|x| / 448``
  (448: ``torch.finfo(torch.float8_e4m3fn).max``).
* softmax probabilities: ``scale_s = 448``: the unnormalised online-softmax P = exp(S -
  running row max) is in [0, 1] (cuDNN frontend's ``sdpa_fp8`` docstring: "Amax S ... 448
  for E4M3 without dropout").
* output: ``scale_o = 448 / (OUTPUT_MARGIN * amax(V))``: |O| <= max|V|, but the numerator
  uses e4m3-rounded P and the denominator fp32 P, so the weights may sum to 1 + 2**-4.

What the graph computes (cudnn-frontend ``scaled_dot_product_flash_attention.h`` and its
test oracle ``test/python/sdpa/fp8_ref.py``; ``emulate`` is the same in PyTorch)::

    S  = (Q8 @ K8^T) * descale_q * descale_k * attn_scale                  fp32
    P  = exp(S - running row max)           in [0, 1]                       online softmax
    O  = e4m3(P * scale_s) @ V8 * descale_s * descale_v / rowsum(P)         fp32
    O8 = e4m3(O * scale_o)

cuDNN 9.19 on Hopper (frontend 1.17.0 ``sdpa_support_surface.h``; an H100 probe,
2026-11-23): e4m3 output only ("HALF/BFLOAT16 output only on Blackwell"), head_dim <= 256
and a multiple of 16, causal top-left only, no bias, no padding mask here. ``import torch``
first: it preloads libnvrtc-builtins, which the runtime-compiled FP8 engine needs.

A graph is built per (device, shapes, strides, causal, scale) on first use (0.05 to 1.2 s
on an H100: NVRTC) and kept in ``_GRAPHS`` (``graph_builds()``); scales are device tensors
read at run time, so new values need no rebuild.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

E4M3 = torch.float8_e4m3fn
#: The largest finite e4m3 value (torch.finfo(torch.float8_e4m3fn).max).
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448.0
#: e4m3's unit roundoff: 3 mantissa bits, so rounding moves a value by at most 2**-4 of itself.
E4M3_UNIT_ROUNDOFF = torch.finfo(E4M3).eps / 2  # 0.0625
#: The softmax-probability scale: P <= 1, so P * 448 <= 448 (cuDNN's "Amax S" bound).
SCALE_S = E4M3_MAX
#: Headroom on the output scale: e4m3-rounded P can weigh V by up to 1 + 2**-4 in total.
OUTPUT_MARGIN = 1.0 + E4M3_UNIT_ROUNDOFF
#: cuDNN's FP8 head_dim limits on sm90 (frontend sdpa_support_surface.h: "d <= 256", "multiple of 16").
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 16
#: The name of the profiler range around each kernel launch: the evidence that it ran.
PROFILER_RANGE = "cudnn_frontend::sdpa_fp8"
#: The smallest amax whose scale 448 / amax is still finite in float32 (1 / finfo.tiny ~ 8.5e37).
AMAX_FLOOR = torch.finfo(torch.float32).tiny * E4M3_MAX


# --- quantisation

def amax(x: torch.Tensor) -> torch.Tensor:
    """max|x| as a float32 [1, 1, 1, 1] tensor on x's device, floored at ``AMAX_FLOOR``: one
    reduction (``linalg.vector_norm``, ord=inf), no copy, no host sync; exact for bf16/fp16."""
    top = torch.linalg.vector_norm(x.detach(), float("inf")).float()
    return top.clamp(min=AMAX_FLOOR).reshape(1, 1, 1, 1)


def quantize(x: torch.Tensor, x_amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` (any shape and strides) to e4m3 with one scale: ``(x8, descale)``, x8 with
    x's shape and strides, ``descale`` = amax / 448 (float32 [1, 1, 1, 1]); x ~= x8 * descale
    within 2**-4 relative in e4m3's normal range (|x| >= 2**-6 * descale); max|x| -> 448.
    """
    top = amax(x) if x_amax is None else x_amax.float().reshape(1, 1, 1, 1)
    scale = E4M3_MAX / top
    x8 = torch.empty_like(x, dtype=E4M3)  # keeps x's strides (x is dense)
    scaled = x.detach().to(torch.float32, copy=True)  # a copy with x's strides, even when x is float32
    scaled.mul_(scale.reshape(())).clamp_(-E4M3_MAX, E4M3_MAX)
    x8.copy_(scaled)  # round to nearest even; in range, so never NaN
    return x8, top / E4M3_MAX


def dequantize(x8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x8 * descale in float32, then cast to ``dtype``; keeps x8's shape and strides."""
    return (x8.float() * descale.float().reshape(())).to(dtype)


def output_scale(descale_v: torch.Tensor) -> torch.Tensor:
    """``scale_o`` = 448 / (OUTPUT_MARGIN * amax(V)) from V's descale (= amax(V) / 448)."""
    return 1.0 / (descale_v * OUTPUT_MARGIN)


# --- what it takes

def shape_problems(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why cuDNN's sm90 FP8 path cannot take these [B, S, H, D] tensors (empty when it can)."""
    problems = []
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return [f"expects 4-D [B, S, H, D] tensors, got {q.dim()}-D, {k.dim()}-D and {v.dim()}-D"]
    if q.dtype not in (torch.bfloat16, torch.float16):
        problems.append(f"takes bf16 or fp16 inputs, got {str(q.dtype).replace('torch.', '')}")
    for name, d in (("head_dim", q.shape[-1]), ("value head_dim", v.shape[-1])):
        if d > MAX_HEAD_DIM or d % HEAD_DIM_MULTIPLE:
            problems.append(f"{name} {d}: cuDNN's FP8 attention on sm90 needs a multiple of {HEAD_DIM_MULTIPLE} "
                            f"up to {MAX_HEAD_DIM}")
    if k.shape[-1] != q.shape[-1]:
        problems.append(f"query and key head_dim differ ({q.shape[-1]} vs {k.shape[-1]})")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        problems.append(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        problems.append("the last dimension must be contiguous")
    return problems


# --- cuDNN graphs

_cudnn_module: Any = None


def _cudnn() -> Any:
    """The ``cudnn`` module of nvidia-cudnn-frontend, imported after torch (see the module
    docstring); raises ImportError when it is not installed."""
    global _cudnn_module
    if _cudnn_module is None:
        import cudnn  # noqa: PLC0415 - optional, and only after torch

        _cudnn_module = cudnn
    return _cudnn_module


def backend_version() -> int | None:
    """The cuDNN library version the frontend drives (e.g. 91900), or None when it cannot say."""
    try:
        return int(_cudnn().backend_version())
    except Exception:  # not installed, or no libcudnn / no GPU
        return None


_HANDLES: dict[int, list[Any]] = {}  # device index -> [handle, bound stream]


def _handle(device: torch.device) -> Any:
    """One cuDNN handle per device, bound to torch's current stream (an int in frontend 1.17,
    a ``cudnn.Handle`` in 1.27+)."""
    cudnn = _cudnn()
    index = device.index if device.index is not None else torch.cuda.current_device()
    entry = _HANDLES.get(index)
    if entry is None:
        with torch.cuda.device(index):  # cudnnCreate binds the handle to the current device
            entry = [cudnn.create_handle(), None]
        _HANDLES[index] = entry
    stream = torch.cuda.current_stream(index).cuda_stream
    if entry[1] != stream:
        cudnn.set_stream(handle=entry[0], stream=stream)
        entry[1] = stream
    return entry[0]


@dataclass
class _Graph:
    """A built ``sdpa_fp8`` graph, its tensors (the variant-pack keys) and its workspace."""

    graph: Any
    tensors: dict[str, Any]
    out_bshd: bool  # the output buffer is [B, S, H, D] in memory (q was a BSHD view)
    workspace: torch.Tensor
    build_s: float


_GRAPHS: dict[tuple, _Graph] = {}


def graph_builds() -> list[dict[str, Any]]:
    """Every graph built in this process: q's [B, H, S, D] shape, causal, build time (s)."""
    return [{"q_shape": list(key[1]), "k_shape": list(key[2]), "causal": key[7], "build_s": g.build_s}
            for key, g in _GRAPHS.items()]


def _build(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, causal: bool, scale: float, handle: Any) -> _Graph:
    """Build the FP8 graph for [B, H, S, D] views with these strides; raises cudnn's errors."""
    cudnn = _cudnn()
    f8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    b, h, s_q, _ = q8.shape
    d_v = v8.shape[3]
    out_bshd = q8.stride(1) < q8.stride(2)  # heads inside sequence: a [B, S, H, D] buffer
    o_stride = [s_q * h * d_v, d_v, h * d_v, 1] if out_bshd else [h * s_q * d_v, s_q * d_v, d_v, 1]
    start = time.perf_counter()
    g = cudnn.pygraph(io_data_type=f8, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    t = {n: g.tensor(name=n, dim=list(x.shape), stride=list(x.stride()), data_type=f8)
         for n, x in (("q", q8), ("k", k8), ("v", v8))}
    for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        t[n] = g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
    mask = dict(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, right_bound=0) if causal else {}
    o, _stats, amax_s, amax_o = g.sdpa_fp8(
        q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"], descale_v=t["descale_v"],
        descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
        generate_stats=False,  # inference: no softmax statistics for a backward
        attn_scale=float(scale), name="sdpa_fp8", **mask)
    o.set_output(True).set_dim([b, h, s_q, d_v]).set_stride(o_stride).set_data_type(f8)  # sm90: e4m3 out only
    # frontend 1.17 requires Amax_S as an output ("Tensor '::Amax_S' dims not set" otherwise)
    for a in (amax_s, amax_o):
        a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    t.update(o=o, amax_s=amax_s, amax_o=amax_o)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    workspace = torch.empty(max(int(g.get_workspace_size()), 1), dtype=torch.uint8, device=q8.device)
    return _Graph(g, t, out_bshd, workspace, time.perf_counter() - start)


_CONSTANTS: dict[int, dict[str, torch.Tensor]] = {}


def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CONSTANTS:
        def full(value: float) -> torch.Tensor:
            return torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)
        _CONSTANTS[index] = {"scale_s": full(SCALE_S), "descale_s": full(1.0 / SCALE_S),
                             "amax_s": full(0.0), "amax_o": full(0.0)}
    return _CONSTANTS[index]


def sdpa_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
             descale_v: torch.Tensor, scale_o: torch.Tensor, *, causal: bool = False,
             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cuDNN FP8 kernel on e4m3 CUDA [B, H, S, D] tensors (last dimension contiguous; k, v
    may have fewer heads). ``descale_*``, ``scale_o``: float32 [1, 1, 1, 1]; ``scale``:
    softmax scale (1/sqrt(D)); ``causal``: top-left. Returns ``(o8, amax_o)``: e4m3
    [B, H, S_q, D_v] (a view of a [B, S, H, D] buffer when q is one) and max|O| before
    ``scale_o`` (overwritten by the next call on this device).
    """
    scale = 1.0 / math.sqrt(q8.shape[-1]) if scale is None else float(scale)
    device = q8.device
    handle = _handle(device)
    key = (device.index, tuple(q8.shape), tuple(k8.shape), tuple(v8.shape), tuple(q8.stride()), tuple(k8.stride()),
           tuple(v8.stride()), bool(causal), scale)
    graph = _GRAPHS.get(key)
    if graph is None:
        graph = _GRAPHS[key] = _build(q8, k8, v8, causal, scale, handle)
    b, h, s_q, _ = q8.shape
    d_v = v8.shape[3]
    if graph.out_bshd:
        o8 = torch.empty((b, s_q, h, d_v), dtype=E4M3, device=device).transpose(1, 2)  # [B, H, S, D] view
    else:
        o8 = torch.empty((b, h, s_q, d_v), dtype=E4M3, device=device)
    c = _constants(device)
    c["amax_o"].zero_()  # whether the kernel overwrites or max-accumulates amax_o is not documented
    t = graph.tensors
    pack = {t["q"]: q8, t["k"]: k8, t["v"]: v8, t["descale_q"]: descale_q, t["descale_k"]: descale_k,
            t["descale_v"]: descale_v, t["descale_s"]: c["descale_s"], t["scale_s"]: c["scale_s"],
            t["scale_o"]: scale_o, t["o"]: o8, t["amax_s"]: c["amax_s"], t["amax_o"]: c["amax_o"]}
    with torch.profiler.record_function(PROFILER_RANGE):
        graph.graph.execute(pack, graph.workspace, handle=handle)
    return o8, c["amax_o"]


def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
         window: Any = None, softcap: float | None = None, **_: Any) -> torch.Tensor:
    """FP8 attention on bf16/fp16 q [B, S, H, D], k and v [B, S, H_kv, D] (CUDA, sm90 or
    sm100); out [B, S, H, D] in q's dtype. ``causal`` is top-left aligned (the same as
    bottom-right when S_q == S_k). Raises ``ValueError`` for what the kernel does not take
    (a window, softcap, head_dim, heads), naming it.
    """
    return _attend(sdpa_fp8, q, k, v, causal, scale, window, softcap)


def _attend(kernel: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
            window: Any, softcap: float | None) -> torch.Tensor:
    if window is not None and tuple(window) != (-1, -1):
        raise ValueError("fp8 (cuDNN sdpa_fp8) takes no sliding window here")
    if softcap:
        raise ValueError("fp8 (cuDNN sdpa_fp8) takes no softcap")
    problems = shape_problems(q, k, v)
    if problems:
        raise ValueError("fp8 (cuDNN sdpa_fp8): " + "; ".join(problems))
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views, no copy
    q8, descale_q = quantize(qh)
    k8, descale_k = quantize(kh)
    v8, descale_v = quantize(vh)
    o8, _ = kernel(q8, k8, v8, descale_q, descale_k, descale_v, output_scale(descale_v), causal=causal, scale=scale)
    return dequantize(o8, descale_v * OUTPUT_MARGIN, q.dtype).transpose(1, 2)  # [B, S, H, D]


# --- the same arithmetic, anywhere

def emulate(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
            descale_v: torch.Tensor, scale_o: torch.Tensor, *, causal: bool = False, scale: float | None = None,
            block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``sdpa_fp8``'s arithmetic in float32 PyTorch on any device (cudnn-frontend's
    ``test/python/sdpa/fp8_ref.py``): keys in blocks of ``block`` with an online softmax,
    causal top-left. The kernel's tiling and rounding order differ: it matches in
    distribution, not bit for bit.
    """
    b, h, s_q, d = q8.shape
    rep = h // k8.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qk_scale = float(descale_q) * float(descale_k) * scale
    pv_scale = float(descale_v) / SCALE_S
    q = q8.float()
    k = k8.float().repeat_interleave(rep, dim=1)  # [B, H, S_k, D]
    v = v8.float().repeat_interleave(rep, dim=1)
    s_k = k.shape[2]
    row_max = torch.full((b, h, s_q, 1), -math.inf, device=q.device)
    row_sum = torch.zeros((b, h, s_q, 1), device=q.device)
    acc = torch.zeros((b, h, s_q, v.shape[-1]), device=q.device)
    rows = torch.arange(s_q, device=q.device).view(-1, 1)
    for j in range(0, s_k, block):
        scores = (q @ k[:, :, j:j + block].transpose(-2, -1)) * qk_scale  # [B, H, S_q, block]
        if causal:
            cols = torch.arange(j, min(j + block, s_k), device=q.device).view(1, -1)
            scores = scores.masked_fill(cols > rows, -math.inf)
        new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True))
        correction = torch.exp(row_max - new_max).nan_to_num()
        p = torch.exp(scores - new_max).nan_to_num()  # in [0, 1]
        p8 = (p * SCALE_S).to(E4M3).float()
        acc = acc * correction + (p8 @ v[:, :, j:j + block]) * pv_scale
        row_sum = row_sum * correction + p.sum(-1, keepdim=True)
        row_max = new_max
    out = acc / row_sum.clamp(min=torch.finfo(torch.float32).tiny)
    top = out.abs().amax().reshape(1, 1, 1, 1)
    return (out * float(scale_o)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), top


def emulated_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  scale: float | None = None, window: Any = None, softcap: float | None = None,
                  **_: Any) -> torch.Tensor:
    """``call`` with ``emulate`` in place of the kernel, on any device: for tests and machines
    without the GPU."""
    return _attend(emulate, q, k, v, causal, scale, window, softcap)
