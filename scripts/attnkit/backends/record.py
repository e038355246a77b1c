"""What a backend record holds: one ``Backend`` per attention implementation.

A record is data plus two small functions: everything the rest of the library needs to
know about a backend (can it run here and why not, what it supports, what the profiler
shows when it ran, how to call it on tensors) is read from its record, never from a
table kept elsewhere. ``catalogue.py`` holds the records themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

#: The model features a backend may or may not provide (``check_features`` asks about each).
FEATURES = {
    "gqa": "grouped-query attention: fewer key/value heads than query heads",
    "mqa": "multi-query attention: one key/value head",
    "sliding_window": "sliding-window (local) attention",
    "padding": "padded batches",
    "softcap": "attention logit soft-capping",
    "alibi": "ALiBi position bias",
    "dropout": "attention dropout (training only)",
}


class Support(NamedTuple):
    """Whether a backend provides a feature, how, and the source of that statement."""

    supported: bool
    how: str
    source: str


@dataclass(frozen=True)
class SdpaKernel:
    """One of SDPA's kernels: its ``--sdpa-kernel`` name, the ``torch.nn.attention.SDPBackend``
    member that allows it, the profiler op that proves it ran, and where it exists."""

    name: str  # flash | efficient | cudnn | math
    sdp_backend: str  # SDPBackend member name
    ops: tuple[str, ...]  # torch.profiler op names
    devices: tuple[str, ...]
    fused: bool = True


#: The signature of ``Backend.call``: q [B, S, H, D], k and v [B, S, H_kv, D] (contiguous,
#: the layout transformers and flash-attn store) -> out [B, S, H, D]. ``sdpa_kernel`` picks
#: one of SDPA's kernels (None: torch's own choice); ``window`` is (left, right) tokens, -1
#: for unbounded.
Call = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """One attention backend. ``name`` is transformers' ``attn_implementation`` value (or
    torch's name for what transformers does not name), so a choice is passed on unchanged.

    Availability is probed in this order, each failing one a reason (``choice.availability``):
    the model class flag, dtype, distribution installed (``distributions``, by
    ``importlib.metadata``), module import and entry point (``module``, ``entry``), device,
    GPU capability (``capabilities``: the compute-capability majors it runs on, e.g. (9, 10)
    for sm90 and sm100, or ``min_capability``), head_dim, and ``extra_probe``.
    """

    name: str
    description: str
    layout: str  # the layout its kernels take: "[B, H, S, D]" or "[B, S, H, D]"
    distributions: tuple[str, ...] = ()  # pip distributions that provide it; () for torch itself
    module: str | None = None  # the module that must import
    entry: str | None = None  # the function the module must export
    install: str = ""  # what to run when it is not installed
    devices: tuple[str, ...] = ("cpu", "cuda")
    min_capability: tuple[int, int] | None = None
    capabilities: tuple[int, ...] | None = None  # allowed compute-capability majors; None: any >= min
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any floating dtype
    max_head_dim: int | None = None
    head_dim_multiple: int | None = None
    class_flag: str | None = None  # transformers' PreTrainedModel flag that says the class supports it
    kernel_markers: tuple[str, ...] = ()  # substrings of profiler names that prove it ran
    features: dict[str, Support] = field(default_factory=dict)
    causal_alignment: str = ""  # where the causal diagonal sits when S_q != S_k
    varlen: bool = False  # a variable-length (packed, padding-free) entry point
    backward: bool = True
    backward_devices: tuple[str, ...] = ("cpu", "cuda")  # where its backward runs (--train)
    kv_cache: bool = False  # a decode entry point that reads a KV cache in place
    auto: bool = True  # considered by --backend auto
    why: str = ""  # why one would pick it (shown when auto takes it)
    not_auto: str = ""  # why auto never takes it (when ``auto`` is False)
    kernels: tuple[SdpaKernel, ...] = ()  # SDPA only
    call: Call | None = None  # see ``Call``
    extra_probe: Callable[[Any], str] | None = None  # env -> '' or a reason it cannot run here
    hf: bool = True  # transformers accepts ``name`` as attn_implementation
    compiles: str = ""  # how its first call compiles (JIT, torch.compile); '' when it does not
    # How rewritten source calls it (hand-written attention swapped to this backend): the name
    # the generated call uses, the import a patch adds for it, whether the call returns a
    # tuple (output first), and whether the written call falls back to SDPA where the
    # library is missing or the tensors are not on a GPU.
    source_name: str = ""
    source_import: tuple[str, ...] = ()
    returns_tuple: bool = False
    falls_back_to_sdpa: bool = False
    hf: bool = True  # transformers accepts ``name`` as attn_implementation (else swap.registered adds it)
    precision: str = ""  # "" computes in the inputs' dtype; "fp8_e4m3": quantises q, k, v to e4m3 (FP8 accuracy rule)

    def kernel(self, name: str) -> SdpaKernel:
        """The SDPA kernel ``name``; KeyError for another."""
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(name)

    def supports(self, feature: str) -> Support:
        return self.features.get(feature, Support(False, "not documented", ""))


@dataclass(frozen=True)
class Fp8Path:
    """One library that runs FP8 (e4m3) attention, and what its FP8 forward needs.

    ``record`` is the registry backend the package belongs to (its distributions, module
    and install hint are read from there); a library without one names its own.
    ``capabilities`` are the compute-capability majors its FP8 forward runs on.
    """

    name: str
    description: str
    capabilities: tuple[int, ...]
    source: str  # where the statement of support comes from
    record: Backend | None = None
    distributions: tuple[str, ...] = ()
    module: str | None = None
    install: str = ""
    needs_nvcc: bool = False  # compiles its kernels on first use (JIT) with the CUDA toolkit's nvcc

    def package(self) -> tuple[tuple[str, ...], str | None, str]:
        """(distributions, module, install) from the record, or the path's own."""
        if self.record is not None:
            return self.record.distributions, self.record.module, self.record.install
        return self.distributions, self.module, self.install
