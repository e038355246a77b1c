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
    """``env.probe_package`` for the module of a registered backend, with its distributions
    and install hint (any other module is probed plainly)."""
    from .catalogue import BACKENDS

    for b in BACKENDS.values():
        if b.module == module:
            return probe_package(module, b.distributions, b.install)
    return probe_package(module)
