"""Which backends can run here, and which one ``auto`` picks, with a reason for each.

``availability()`` gives one backend's verdict for a model, device and dtype, reading only
its record (``catalogue.BACKENDS``) and the machine's facts (``env``); ``choose()``
applies the verdicts: ``auto`` takes the first available of ``AUTO_ORDER`` and records why
every other backend was not taken; a forced backend that cannot run raises ``CannotRun``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from ..env import Environment, architecture, distribution_version, dtype_name
from ..report import CannotRun, OptionError
from . import probe
from .catalogue import BACKENDS, FP8_PATHS

#: ``auto`` takes the first available of these (FlashAttention-3 only on Hopper).
AUTO_ORDER = ("flash_attention_3", "flash_attention_2", "sdpa")


def _after_order() -> tuple[str, ...]:
    """The backends ``auto`` tries when none of ``AUTO_ORDER`` can run the model (a class that
    takes no SDPA, as transformers' soft-capped Gemma-2 does): every other one that auto may
    pick, in the registry's order (FlashAttention-4, flex_attention)."""
    return tuple(n for n, r in BACKENDS.items() if r.auto and n not in AUTO_ORDER)


@dataclass
class Availability:
    """Whether ``backend`` can run for this model, device and dtype, and why not."""

    backend: str
    available: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "available": self.available, "reason": self.reason}


def _text_config(model: Any) -> Any:
    """A transformers model's text config (its config when it has no other), else None."""
    config = getattr(model, "config", None)
    try:
        return config.get_text_config() if config is not None else None
    except AttributeError:
        return config


def head_dim_of(model: Any) -> int | None:
    """head_dim from a transformers config (``head_dim`` or hidden_size / num_attention_heads)."""
    config = _text_config(model)
    head_dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    return head_dim


def softcap_of(model: Any) -> float | None:
    """The attention-logit soft-cap of a transformers model (``attn_logit_softcapping``), else None."""
    value = getattr(_text_config(model), "attn_logit_softcapping", None)
    return value if isinstance(value, (int, float)) and value else None


def availability(name: str, *, env: Environment, device: str, dtype: torch.dtype, model: Any = None,
                 train: bool = False) -> Availability:
    """Can ``name`` run here? Checks the model class, the dtype, the pip distribution, the
    device (with ``train``, that its backward runs there), the GPU capability, the import (only where the rest allows it to run) and
    head_dim; every failing one is a reason, in that order, joined by "; " (the first is
    the headline).

    Raises ``CannotRun`` for a name not in ``BACKENDS``.
    """
    if name not in BACKENDS:
        raise CannotRun(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}", "")
    info = BACKENDS[name]
    reasons = []
    if model is not None and info.class_flag and hasattr(model, info.class_flag) and not getattr(model, info.class_flag):
        reasons.append(f"{type(model).__name__} does not support {name} (transformers sets {info.class_flag} = False "
                       "for this class)")
    softcap = softcap_of(model)
    said_no = info.features.get("softcap")
    if softcap and said_no is not None and not said_no.supported:  # transformers 5.17 runs it and drops the cap
        reasons.append(f"the model soft-caps its attention logits (attn_logit_softcapping = {softcap}) and {name} "
                       f"cannot ({said_no.how}): it would compute other scores")
    if info.dtypes and dtype not in info.dtypes:
        reasons.append(f"{name} runs fp16 and bf16 only (its kernels have no {dtype_name(dtype)} path); "
                       "pass --dtype bfloat16 (or float16 on GPUs older than Ampere)")
    if name == "sdpa" and not env.torch_sdpa_ok:
        reasons.append(f"torch {env.torch_version} is older than 2.2: no fused SDPA kernels")
    installed = not info.distributions or probe.installed(info) is not None
    if not installed:
        reasons.append(f"{info.module}: not installed: {info.install} [no pip distribution "
                       f"{' or '.join(info.distributions)}]")
    kind = "cuda" if device.startswith("cuda") else device
    device_ok = True
    if kind not in info.devices:
        device_ok = False
        reasons.append(f"{name} needs a CUDA GPU; the device here is {device}")
    elif train and kind not in info.backward_devices:
        reasons.append(f"{name} has no backward pass on {kind} (--train): it runs forward only there")
    elif kind == "cuda" and env.capability is not None:
        cap = env.capability
        if info.min_capability and cap < info.min_capability:
            device_ok = False
            reasons.append(f"{name} needs compute capability {info.min_capability[0]}.{info.min_capability[1]}+; "
                           f"GPU 0 is {architecture(cap)}")
        elif info.capabilities and cap[0] not in info.capabilities:
            device_ok = False
            reasons.append(f"{name} runs on " + " and ".join(f"sm{m}0" for m in info.capabilities) +
                           f" GPUs only; GPU 0 is {architecture(cap)}")
    if installed and device_ok and info.module:  # imported only where it could run: FA4's import takes seconds
        found = probe.imports(info)
        if not found.importable:
            reasons.append(f"{info.module}: {found.meaning} [{found.error}]")
    head_dim = head_dim_of(model)
    if info.max_head_dim and head_dim and head_dim > info.max_head_dim:
        reasons.append(f"head_dim {head_dim} > {info.max_head_dim}, the largest {name} compiles")
    if info.head_dim_multiple and head_dim and head_dim % info.head_dim_multiple:
        reasons.append(f"head_dim {head_dim} is not a multiple of {info.head_dim_multiple}, as {name} needs")
    if info.extra_probe is not None:
        extra = info.extra_probe(env)
        if extra:
            reasons.append(extra)
    return Availability(name, not reasons, "; ".join(reasons) or "available")


@dataclass
class Choice:
    """The backend to switch to, why, and why each other one was not taken."""

    backend: str
    why: str
    rejected: list[Availability]


def choose(requested: str, *, env: Environment, device: str, dtype: torch.dtype, model: Any = None,
           train: bool = False) -> Choice:
    """Pick the backend: ``auto`` or a forced name.

    ``auto`` takes the first available of ``AUTO_ORDER`` (FlashAttention-3 only on Hopper,
    the GPU it is written for), then of the other backends auto may pick (``_after_order``).
    Raises ``CannotRun`` when a forced backend cannot run here,
    with what to install or pass, or when ``auto`` finds nothing better than eager.
    """
    verdicts = {name: availability(name, env=env, device=device, dtype=dtype, model=model, train=train)
                for name in BACKENDS}
    if requested != "auto":
        if requested not in BACKENDS:
            raise OptionError("backend", "unknown {backend} {value!r}; choose from auto, {names}", value=requested,
                              names=", ".join(BACKENDS))
        v = verdicts[requested]
        if not v.available:
            raise OptionError("backend", "{backend} {value} cannot run here: {reason}", _hint(requested, v.reason),
                              value=requested, reason=v.reason)
        chosen, why = requested, "forced with --backend"
    else:
        chosen, why = None, ""
        for name in AUTO_ORDER + _after_order():
            v = verdicts[name]
            if name == "flash_attention_3" and v.available and (env.capability or (0, 0))[0] != 9:
                verdicts[name] = Availability(name, True, "available, but auto takes FlashAttention-3 only on Hopper "
                                                          "(sm90), the GPU it is written for")
                continue
            if v.available:
                chosen, why = name, BACKENDS[name].why
                if name not in AUTO_ORDER:
                    why += (f" (none of {', '.join(AUTO_ORDER)} can run this model here: "
                            + "; ".join(f"{n}: {verdicts[n].reason}" for n in AUTO_ORDER) + ")")
                break
        if chosen is None:
            raise CannotRun("no fused attention backend can run here: " +
                            "; ".join(f"{n}: {verdicts[n].reason}" for n in AUTO_ORDER + _after_order()),
                            "see check_env.py")
    rejected = []
    for name in BACKENDS:
        if name == chosen:
            continue
        v = verdicts[name]
        if not BACKENDS[name].auto:
            reason = BACKENDS[name].not_auto if v.available else f"{v.reason}"
        elif v.available and v.reason == "available":
            reason = f"available, but {chosen} was preferred" + (" (forced)" if requested != "auto" else "")
        else:
            reason = v.reason
        rejected.append(Availability(name, v.available, reason))
    return Choice(chosen, why, rejected)


def _hint(name: str, reason: str) -> str:
    """What to do, for the reason that no option of this run can fix first: the device. An
    ``OptionError`` advice template: ``{backend}`` and ``{dtype}`` name those options."""
    if "needs a CUDA GPU" in reason or " GPUs only" in reason:
        where = BACKENDS[name].capabilities
        gpus = " or ".join(f"sm{m}0" for m in where) + " " if where else ""
        return f"run on a machine with an NVIDIA {gpus}GPU, or use {{backend}} sdpa on this one"
    if "fp16 and bf16" in reason:
        return "pass {dtype} bfloat16 (or {backend} sdpa, which runs fp32 too)"
    if "not installed" in reason:
        return "install it, or use {backend} sdpa, which ships with torch"
    return "use {backend} auto to take the best backend that runs here"


def library_status(name: str, env: Environment) -> dict[str, Any]:
    """Is the library behind backend ``name`` installed, and usable on this machine's GPU?

    Returns ``{"backend", "distribution", "installed", "version", "usable", "reason"}``.
    ``installed`` is read from pip's records (``importlib.metadata``), never from an import
    that happens to succeed; the module is imported only when a GPU it runs on is here.
    ``reason`` names the cause: not installed (and how to install), no CUDA GPU, the wrong
    GPU generation, or the import error and what it means.
    """
    info = BACKENDS[name]
    found = probe.installed(info)
    entry: dict[str, Any] = {"backend": name, "distribution": found[0] if found else info.distributions[0],
                             "installed": found is not None, "version": found[1] if found else None,
                             "usable": False, "reason": ""}
    label = f"{name} ({info.module})"
    if found is None:
        entry["reason"] = f"not installed: {info.install}"
    elif not env.cuda_available:
        entry["reason"] = f"installed, but this machine has no CUDA GPU: {label} runs on NVIDIA GPUs only"
    elif info.capabilities and env.capability[0] not in info.capabilities:
        need = " or ".join(f"sm{m}0" for m in info.capabilities)
        entry["reason"] = (f"installed, but GPU 0 is {architecture(env.capability)}: {name} needs {need}")
    elif info.min_capability and env.capability < info.min_capability:
        need = f"sm{info.min_capability[0]}{info.min_capability[1]}"
        entry["reason"] = f"installed, but GPU 0 is {architecture(env.capability)}: {name} needs {need} or newer"
    else:
        imported = probe.imports(info)
        if imported.importable:
            entry["usable"], entry["reason"] = True, f"{info.module}.{info.entry} imports; GPU 0 is " \
                                                     f"{architecture(env.capability)}"
        else:
            entry["reason"] = f"installed, but {imported.meaning} [{imported.error}]"
    return entry


#: The FlashAttention libraries check_env reports, one entry each.
FLASH_ATTENTION_BACKENDS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
@dataclass
class Fp8Availability:
    """Whether one FP8 attention library (``catalogue.FP8_PATHS``) can run its FP8 forward here."""

    path: str
    description: str
    distribution: str | None  # the pip distribution found installed, or the first it is published as
    installed: bool
    version: str | None
    usable: bool
    reason: str  # why not, or what it runs on
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "description": self.description, "distribution": self.distribution,
                "installed": self.installed, "version": self.version, "usable": self.usable, "reason": self.reason,
                "source": self.source}


def nvcc() -> str | None:
    """The CUDA compiler a JIT library would call: ``nvcc`` on PATH, else under $CUDA_HOME."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = os.path.join(home, "bin", "nvcc") if home else ""
    return candidate if candidate and os.access(candidate, os.X_OK) else None


def fp8_availability(env: Environment) -> list[Fp8Availability]:
    """Each FP8 attention library: installed (by pip distribution), and usable here (GPU
    capability, import, cuDNN version, nvcc for a JIT library), with the first reason it
    is not. Imports a package only when everything before the import holds."""
    out = []
    cap = env.capability
    for path in FP8_PATHS:
        dists, module, install = path.package()
        found = None
        for dist in dists:
            version = distribution_version(dist)
            if version is not None:
                found = (dist, version)
                break
        where = " and ".join(f"sm{m}0" for m in path.capabilities)
        reason = ""
        if found is None:
            reason = f"not installed: {install} [no pip distribution {' or '.join(dists)}]"
        elif not env.cuda_available or cap is None:
            reason = f"no CUDA GPU is visible; its FP8 forward runs on {where} GPUs"
        elif cap[0] not in path.capabilities:
            reason = f"its FP8 forward runs on {where} GPUs only; GPU 0 is {architecture(cap)}"
        elif path.needs_nvcc and nvcc() is None:
            reason = "it compiles its kernels on first use and no nvcc was found (PATH, $CUDA_HOME/bin): install " \
                     "the CUDA toolkit"
        elif path.record is not None:
            if path.record.extra_probe is not None:
                reason = path.record.extra_probe(env)
            probed = probe.imports(path.record)
            if not reason and probed is not None and not probed.importable:
                reason = f"{module}: {probed.meaning} [{probed.error}]"
        elif module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
            reason = f"{module} is not importable although {found[0]} is installed"
        out.append(Fp8Availability(path.name, path.description, found[0] if found else dists[0], found is not None,
                                   found[1] if found else None, not reason,
                                   reason or f"usable: GPU 0 is {architecture(cap)}", path.source))
    return out
