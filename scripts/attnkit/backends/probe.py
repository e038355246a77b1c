"""Is a backend's library installed, and does it import? Asked by distribution first.

``installed(backend)`` reads ``importlib.metadata`` (what pip installed), ``imports(backend)``
imports the module and looks for the entry point. Both answers are kept per process: an
import of FlashAttention-4 loads the CuTe DSL, which takes seconds.
"""

from __future__ import annotations

import functools
import importlib
import warnings

from ..env import PackageProbe, distribution_version, probe_package
from .record import Backend


def installed(backend: Backend) -> tuple[str, str] | None:
    """(distribution, version) of the first of ``backend.distributions`` that pip installed;
    None when none is (or the backend ships with torch: no distributions)."""
    for dist in backend.distributions:
        version = distribution_version(dist)
        if version is not None:
            return dist, version
    return None


@functools.lru_cache(maxsize=None)
def _import(module: str, entry: str | None, distributions: tuple[str, ...], install: str) -> PackageProbe:
    probe = probe_package(module, distributions, install)
    if probe.importable and entry:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(module)
        if not callable(getattr(mod, entry, None)):
            probe.importable = False
            probe.error = f"AttributeError: module {module!r} has no {entry!r}"
            where = getattr(mod, "__path__", None)
            probe.meaning = (f"{module} imports but has no {entry}: it is not the package this backend needs"
                             + (f" (a namespace package at {list(where)[0]}, left by another distribution)"
                                if where is not None and getattr(mod, "__file__", None) is None else ""))
    return probe


def imports(backend: Backend) -> PackageProbe | None:
    """Import ``backend.module`` and check ``backend.entry`` is there (None for a backend
    without a module). Never raises."""
    if backend.module is None:
        return None
    return _import(backend.module, backend.entry, backend.distributions, backend.install)


def package_probe(module: str) -> PackageProbe:
    """The import probe of the module of a registered backend: not importable, with the
    install hint, when none of its pip distributions is installed (an import that succeeds
    proves nothing: FA4's wheel makes ``flash_attn`` an empty namespace package), else the
    import and its entry point (``imports``). Any other module is probed plainly."""
    from .catalogue import BACKENDS

    for b in BACKENDS.values():
        if b.module == module:
            if b.distributions and installed(b) is None:
                return PackageProbe(module, False, None, None,
                                    f"PackageNotFoundError: no pip distribution {' or '.join(b.distributions)}",
                                    f"not installed: {b.install}")
            return imports(b)
    return probe_package(module)


def torch_fa4_bridge() -> dict:
    """Can torch's own FA4 bridge (``torch.nn.attention.activate_flash_attention_impl("FA4")``,
    torch 2.11+) run with the installed flash-attn-4? Read from torch's source, without
    activating anything: torch 2.11 and 2.13 unpack ``out, lse = _flash_attn_fwd(...)``,
    while flash-attn-4 4.0.0b19 and later return more values, so every SDPA flash call then
    fails with "too many values to unpack (expected 2)" (pytorch issue 190212; torch 2.14
    unpacks ``out, lse, *_``). The bridge would also replace only SDPA's flash kernel, while
    on Hopper SDPA prefers cuDNN: this skill calls flash_attn.cute directly instead.

    Returns ``{"present", "compatible", "reason"}`` (``compatible`` None when FA4 is not
    installed or torch has no bridge).
    """
    import inspect

    try:
        import torch.nn.attention as attention

        present = hasattr(attention, "activate_flash_attention_impl")
        source = inspect.getsource(importlib.import_module("torch.nn.attention._fa4")) if present else ""
    except (ImportError, OSError, TypeError):
        present, source = False, ""
    fa4 = distribution_version("flash-attn-4")
    if not present:
        return {"present": False, "compatible": None, "reason": "this torch has no activate_flash_attention_impl"}
    if fa4 is None:
        return {"present": True, "compatible": None, "reason": "flash-attn-4 is not installed"}
    strict = "out, lse = module._flash_attn_fwd(" in source
    if strict:
        return {"present": True, "compatible": False,
                "reason": f"torch's bridge unpacks exactly (out, lse) from _flash_attn_fwd, which flash-attn-4 {fa4} "
                          "extends: activate_flash_attention_impl('FA4') then fails every SDPA flash call with 'too "
                          "many values to unpack' (pytorch issue 190212, fixed in torch 2.14); this skill calls "
                          "flash_attn.cute directly and does not use the bridge"}
    return {"present": True, "compatible": True,
            "reason": "torch's bridge takes any number of return values; it replaces only SDPA's flash kernel "
                      "(on Hopper SDPA prefers cuDNN), so this skill still calls flash_attn.cute directly"}
