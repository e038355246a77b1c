"""A model loaded on a device with its inputs: what every model step starts from.

``open_session`` resolves device and dtype, loads the spec, finds its attention with one
small profiled forward pass (``locate_attention``), swaps and verifies hand-written
attention, caps the sequence length to the model's maximum and builds the example inputs. ``enable_flash``, ``profile_attention`` and ``compare_accuracy`` all
start here, so they measure the same thing the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .. import models
from ..env import Environment, dtype_name, resolve
from ..measure.kernels import attention_kernels, profiled
from ..measure.timing import forward_fn
from ..measure.verify import verify_sites
from ..report import CannotRun, Reporter, StepData, one_line
from ..swap import switch
from ..swap.live import Swapper, swapper_of


@dataclass
class Session:
    env: Environment
    device: str
    dtype: torch.dtype
    loaded: models.LoadedModel
    inputs: models.Inputs
    attention_ops: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def swapper(self):
        """The hand-written attention swapper of a model without a transformers switch (or None)."""
        return swapper_of(self.loaded.model)

    def fields(self) -> dict[str, Any]:
        """The ``SessionData`` fields of this session, as keyword arguments for a step's data
        class (``EnableFlashData(**session.fields(), ...)``); ``notes`` is this session's list."""
        placed = self.loaded.device_map
        return {"device_map": placed or None, "devices": self.loaded.devices if placed else None,
                "model": self.loaded.spec, "model_class": type(self.loaded.model).__name__,
                "family": self.loaded.family, "device": self.device, "dtype": dtype_name(self.dtype),
                "shape": {"batch_size": self.inputs.batch_size, "seq_len": self.inputs.seq_len},
                "inputs": self.inputs.description, "original_backend": self.loaded.original_backend,
                "dtype_policy": self.loaded.dtype_policy, "attention": self.loaded.attention_shape(),
                "versions": {"torch": torch.__version__, "transformers": self.env.transformers.version,
                             "python": self.env.python},
                "notes": self.notes}


@dataclass(kw_only=True)
class SessionData(StepData):
    """The fields every model step reports (ARCHITECTURE.md, "The step contract"): the model,
    where and how it ran, its inputs' shape and its attention; ``device_map`` and ``devices``
    only when accelerate spread the model over devices."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"device_map", "devices"})

    device_map: dict[str, Any] | None = None
    devices: list[str] | None = None
    model: str = ""
    model_class: str = ""
    family: str = ""
    device: str = ""
    dtype: str = ""
    shape: dict[str, Any] = field(default_factory=dict)
    inputs: str = ""
    original_backend: str | None = None
    dtype_policy: str | None = None
    attention: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)


def check_shape(batch_size: int, seq_len: int, pad_fraction: float | None) -> None:
    """Raise ``CannotRun`` for a batch, sequence length or padding fraction out of range."""
    if batch_size < 1:
        raise CannotRun(f"--batch-size must be at least 1, not {batch_size}", "")
    if seq_len < 2:
        raise CannotRun(f"--seq-len must be at least 2, not {seq_len}", "")
    if pad_fraction is not None and not 0.0 <= pad_fraction < 1.0:
        raise CannotRun(f"--pad-fraction must be in [0, 1), not {pad_fraction}", "")


def open_session(spec: str | None, *, device: str = "auto", dtype: str = "auto", batch_size: int = 1,
                 seq_len: int = 1024, pad_fraction: float | None = None, trust_remote_code: bool = False,
                 baseline: str = "eager", reporter: Reporter | None = None,
                 env: Environment | None = None, train: bool = False, device_map: str | None = None,
                 max_memory: str | None = None, target: str = "sdpa", alternative: str | None = None) -> Session:
    """Load ``spec`` and prepare inputs [B, S] (see the module docstring); ``train`` puts the
    model in training mode before its attention is found; ``device_map`` and ``max_memory``
    (the --device-map and --max-memory texts) spread it over devices with accelerate;
    ``target`` is what hand-written attention is swapped to and verified for first (sdpa, or
    flex_attention, which the graph path alone rewrites to); ``alternative`` (flex_attention
    for --backend auto where compiled candidates are timed) replaces it when it swaps more
    sites: a soft-capped hand-written model is then switched to flex instead of refused.

    Raises ``CannotRun`` for bad sizes, a device or dtype that does not exist here, any
    load failure (see ``models.load``), a model with no attention, or attention with no
    transformers switch.
    """
    reporter = reporter or Reporter(quiet=True)
    check_shape(batch_size, seq_len, pad_fraction)
    env, dev, dt = resolve(device, dtype, env)
    spec = spec or models.DEFAULT_MODEL
    models.classify(spec)  # a path that does not exist fails before anything loads
    placement = {}
    if device_map is not None or max_memory is not None:
        if device_map is None:
            raise CannotRun("--max-memory needs --device-map", "add --device-map auto")
        if train:
            raise CannotRun("--train with --device-map: the float64 reference of a spread model is made module by "
                            "module, which leaves no gradients to compare", "drop --train")
        placement = {"device_map": device_map, "max_memory": models.parse_max_memory(max_memory)}
    where = f"--device-map {device_map}" + (f" --max-memory {max_memory}" if max_memory else "") if placement else dev
    with reporter.stage(f"loading {spec} on {where} in {dtype_name(dt)}"):
        loaded = models.load(spec, device=dev, dtype=dt, trust_remote_code=trust_remote_code, **placement)
    dev = loaded.device
    if train:
        loaded.model.train()
    with reporter.stage("finding the attention"):
        ops = locate_attention(loaded, baseline)
    notes = list(loaded.notes)
    swapper = swapper_of(loaded.model)
    if swapper is not None:
        with reporter.stage(f"swapping hand-written attention for {target} and verifying each site"):
            verify_sites(swapper, loaded, loaded.probe(), dt, target)
        kept = [x for x in swapper.sites.values() if x.status == "kept" and x.graph is not None
                and alternative in x.graph.targets]
        if alternative and kept:
            swapped = sum(x.status == "swapped" for x in swapper.sites.values())
            with reporter.stage(f"{len(kept)} site(s) {target} cannot take: swapping for {alternative} instead"):
                verify_sites(swapper, loaded, loaded.probe(), dt, alternative)
            if sum(x.status == "swapped" for x in swapper.sites.values()) <= swapped:
                verify_sites(swapper, loaded, loaded.probe(), dt, target)  # no better: back to the first
        swapper.require_swapped()
    limit = loaded.max_seq_len()
    if limit and seq_len > limit:
        notes.append(f"--seq-len {seq_len} capped to the model's maximum, {limit} positions")
        seq_len = limit
    for note in notes:
        reporter.note(note)
    return Session(env, dev, dt, loaded, loaded.inputs(batch_size, seq_len, pad_fraction), ops, notes)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def is_dtype_mismatch(exc: BaseException) -> bool:
    """The error of a model cast to a low-precision dtype whose forward builds float32 tensors."""
    text = str(exc)
    return isinstance(exc, (RuntimeError, TypeError)) and any(t in text for t in (
        "must have the same dtype", "expected scalar type", "Expected scalar type", "mixed dtype", "Input type",
        "should be the same", "same dtype", "expected both", "but found"))


def autocast_fallback(loaded: Any, exc: BaseException) -> bool:
    """When a plain cast of the model to bf16/fp16 fails because forward builds float32 tensors,
    switch the model to torch.autocast (float32 weights) and say so; True when switched."""
    if loaded.dtype not in LOW_PRECISION or loaded.autocast is not None or not is_dtype_mismatch(exc):
        return False
    loaded.use_autocast()
    loaded.notes.append(f"a plain cast of the model to {dtype_name(loaded.dtype)} does not run "
                        f"({one_line(exc, 160)}): it runs under torch.autocast({dtype_name(loaded.dtype)}) "
                        "with float32 weights, as its users run it (data.dtype_policy = autocast)")
    return True


def locate_attention(loaded: Any, baseline: str = "eager") -> dict[str, int]:
    """One forward pass of ``loaded`` (a ``models.LoadedModel``) at a small shape under the
    profiler, with ``baseline`` attention; returns the attention ops it ran.

    A model without a transformers switch is run under ``swap.live.Swapper.discover``
    instead, which records its attention sites for the swap.

    Raises ``CannotRun`` when the pass fails or when no attention runs.
    """
    probe = loaded.probe()
    try:
        if not loaded.is_transformers:
            sites = Swapper(loaded.model).discover(forward_fn(loaded, probe))
            counts = {f"{s.kind} site at {s.file}:{s.line}": s.calls for s in sites}
        else:
            with switch.using(loaded.model, baseline), torch.no_grad(), profiled() as prof:
                loaded.forward(probe)
            counts = dict(attention_kernels(prof.events()))
    except CannotRun:
        raise
    except Exception as exc:
        if autocast_fallback(loaded, exc):
            return locate_attention(loaded, baseline)
        raise CannotRun(f"a forward pass of {loaded.spec} on {probe.description} raised {type(exc).__name__}: "
                        f"{one_line(exc, 200)}", "check that the model runs on its own; a factory "
                        "may define example_inputs(batch_size, seq_len)") from None
    if not counts:
        raise CannotRun(f"no attention in {loaded.spec}: a forward pass ran no softmax, SDPA or flash-attn op",
                        "this job speeds up attention; the model has none to switch")
    return counts
