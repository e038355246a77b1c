"""What ran: attention evidence in a ``torch.profiler`` trace.

One forward pass under the profiler; the op and GPU kernel names it records are the
evidence of what ran (``aten::_scaled_dot_product_flash_attention_for_cpu`` for SDPA's
fused CPU kernel, ``aten::_softmax`` + ``aten::bmm`` for hand-written attention,
``pytorch_flash::flash_fwd_kernel`` on a GPU). Which names prove which backend is read
from the backend records (``Backend.kernel_markers``, ``SdpaKernel.ops``).
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections import Counter
from typing import Any, Iterator

import torch

from ..backends import BACKENDS, SDPA
from ..backends.calls import CALL_RANGE

#: Fused attention ops -> the SDPA kernel they prove ran (names as torch.profiler shows them).
SDPA_OPS = {op: (k.name + " (cpu)" if op.endswith("_for_cpu") else k.name) for k in SDPA.kernels for op in k.ops}
SDPA_OPS["aten::_scaled_dot_product_fused_attention_overrideable"] = "overrideable"

#: What hand-written attention leaves in a trace: the softmax kernel and batched matmuls.
UNFUSED_OPS = ("aten::_softmax", "aten::bmm")

#: Substrings of the attention libraries' op names (flash_attn::_flash_attn_forward,
#: flash_attn_3::fwd, flex_attention), from the records of every backend outside SDPA.
LIBRARY_MARKERS = tuple(sorted({m for b in BACKENDS.values() if b.name not in ("eager", "sdpa")
                                for m in b.kernel_markers}))

#: GPU kernels worth naming as attention evidence.
DEVICE_KERNEL = re.compile(r"flash|fmha|attention|sdpa|softmax", re.IGNORECASE)


def fused(kernels: list[str]) -> list[str]:
    """The fused attention ops among ``kernels`` (SDPA's non-math kernels, the libraries')."""
    return [k for k in kernels if (k in SDPA_OPS and SDPA_OPS[k] != "math") or any(m in k for m in LIBRARY_MARKERS)]


def _short(name: str) -> str:
    """A GPU kernel name without its return type, anonymous namespaces, template and call
    arguments: 'void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>(...)'
    -> 'at::native::cunn_SoftMaxForward'."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    return name.split("<", 1)[0].split("(", 1)[0]


def library_kernels(events: Any) -> set[str]:
    """GPU kernels launched directly inside an attention library's op or profiler range
    (``FunctionEvent.kernels``: torch links each kernel to the innermost CPU event active
    at its launch). A library that names no kernel after attention (cuDNN's FP8 engine is
    compiled at run time) is still proved by what ran inside its range."""
    names = set()
    for e in events:
        if (not str(getattr(e, "device_type", "")).endswith("CUDA") and not e.name.startswith(CALL_RANGE)
                and any(m in e.name for m in LIBRARY_MARKERS)):
            names.update(k.name for k in getattr(e, "kernels", ()) or ())
    return names


def attention_kernels(events: Any) -> Counter:
    """Count the attention evidence in a profiler's events: fused ops, unfused ops,
    library ops and ranges, GPU kernels whose names say attention or softmax, GPU kernels
    launched inside a library's range (``library_kernels``), and compiled graphs that ran
    inside a call range (``compiled_calls``). GPU-side copies of profiler ranges (user
    annotations) are not kernels and are left out; a call range alone proves a call, not a
    kernel, and is not counted."""
    counts: Counter = Counter()
    events = list(events)
    launched = library_kernels(events)
    for e in events:
        name = e.name
        on_device = str(getattr(e, "device_type", "")).endswith("CUDA")
        if on_device:
            if getattr(e, "is_user_annotation", False):
                continue
            if DEVICE_KERNEL.search(name) or name in launched:
                counts["gpu:" + _short(name)] += 1
        elif name.startswith(CALL_RANGE):
            continue
        elif name in SDPA_OPS or name in UNFUSED_OPS or any(m in name for m in LIBRARY_MARKERS):
            counts[name] += 1
    counts.update(compiled_calls(events))
    return counts


#: ``CALL_RANGE``, the profiler range ``call_range`` opens around each call of a backend's
#: attention function, is defined beside the backends' calls (the graph path's flex call opens it too).
#: How torch.compile's compiled code shows in a CPU trace (dynamo's range around each graph).
COMPILED_REGION = "Torch-Compiled Region"


def compiled_calls(events: Any) -> Counter:
    """'<backend> (compiled)' for each compiled graph (``COMPILED_REGION``) that ran inside a
    ``call_range`` of that backend: the evidence for a backend that torch.compile builds
    per shape (flex_attention), whose kernels carry no name of their own (inductor's C++
    on CPU, generated Triton on CUDA). Uncompiled, flex_attention runs a reference that
    forms the whole score matrix, and counts nothing here."""
    counts: Counter = Counter()
    for e in events:
        if str(getattr(e, "device_type", "")).endswith("CUDA") or not e.name.startswith(COMPILED_REGION):
            continue
        parent = getattr(e, "cpu_parent", None)
        while parent is not None and not parent.name.startswith(CALL_RANGE):
            parent = getattr(parent, "cpu_parent", None)
        if parent is not None:
            counts[parent.name.removeprefix(CALL_RANGE) + " (compiled)"] += 1
    return counts


@contextlib.contextmanager
def call_range(backend: str) -> Iterator[None]:
    """Inside the block, each call that transformers makes to ``backend``'s attention function
    (``ALL_ATTENTION_FUNCTIONS``) runs inside a profiler range ``CALL_RANGE + backend``; the
    mapping is put back on exit. Nothing changes where transformers has no such function."""
    import sys

    utils = sys.modules.get("transformers.modeling_utils")
    functions = getattr(utils, "ALL_ATTENTION_FUNCTIONS", None)
    if functions is None or backend not in functions:
        yield
        return
    local = functions._local_mapping
    had, before = backend in local, local.get(backend)
    inner = functions[backend]

    @functools.wraps(inner)
    def traced(*args, **kwargs):
        with torch.profiler.record_function(CALL_RANGE + backend):
            return inner(*args, **kwargs)

    functions[backend] = traced
    try:
        yield
    finally:
        if had:
            local[backend] = before
        else:
            local.pop(backend, None)


@contextlib.contextmanager
def profiled(device: str = "cpu", memory: bool = False):
    """``torch.profiler.profile`` over CPU (and CUDA on a GPU), without torch 2.11's
    once-per-profile "Profiler clears events" warning."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Profiler clears events")
        with profile(activities=activities, profile_memory=memory) as prof:
            yield prof
