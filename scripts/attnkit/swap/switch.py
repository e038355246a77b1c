"""Apply an attention backend to a model, through its owner's API, with a way back.

transformers models switch with ``PreTrainedModel.set_attn_implementation(name)``; this
module never edits library code. A registry backend transformers does not ship
(``Backend.hf`` False, e.g. ``fp8``) is first registered with its ``AttentionInterface``
(``registered.py``), through the same public API any user has. ``apply`` checks afterwards that the config really says
the new name: transformers only logs a warning, and leaves the model as it was, for a
class that cannot switch at run time (one that does not use its ``AttentionInterface``).

Every measurement switches inside a scope, ``with using(model, backend):``, which puts the
previous implementation back on exit, exceptions included (as ``torch.nn.attention.sdpa_kernel``
restores torch's kernel choice): a failure inside one measurement cannot leave the model on
another backend for the next one. ``apply`` without a way back is for ``--save`` alone, which
keeps the switched model on purpose.

``sdpa_kernels`` restricts which SDPA kernels may run, with
``torch.nn.attention.sdpa_kernel`` (never the deprecated ``torch.backends.cuda.sdp_kernel``).
Allowing only FLASH_ATTENTION makes SDPA raise when flash cannot take the inputs, instead
of quietly falling back to another kernel.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ..backends import BACKENDS, SDPA
from ..report import CannotRun, NotSwitched, OptionError, one_line
from . import registered
from .live import swapper_of

#: ``--sdpa-kernel`` names -> ``torch.nn.attention.SDPBackend`` member names (the registry's SDPA kernels).
SDPA_KERNELS = {k.name: k.sdp_backend for k in SDPA.kernels}


def has_switch(model: nn.Module) -> bool:
    """A transformers model, or a model whose hand-written attention ``live`` swapped."""
    from transformers import PreTrainedModel  # here, not at import: it loads all of modeling_utils (seconds)

    return isinstance(model, PreTrainedModel) or swapper_of(model) is not None


def current(model: nn.Module) -> str | None:
    """The model's attention implementation: ``config._attn_implementation`` for transformers,
    what ``live`` has installed for a swapped model, else None."""
    swapper = swapper_of(model)
    if swapper is not None:
        return swapper.backend
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def apply(model: nn.Module, backend: str) -> str | None:
    """Switch ``model`` to ``backend`` in place; return the previous implementation.

    A transformers model switches with ``set_attn_implementation``; a model whose
    hand-written attention ``live`` swapped installs (or, for ``eager``, removes) the
    verified swaps. Raises ``CannotRun`` when the model has no switch, when transformers
    refuses the backend (its message kept), or when the switch did not take.
    """
    from transformers import PreTrainedModel

    swapper = swapper_of(model)
    if swapper is not None:
        previous = swapper.backend
        swapper.apply(backend)
        return previous
    if not isinstance(model, PreTrainedModel):
        raise NotSwitched(f"{type(model).__name__} is not a transformers model and its attention was not swapped",
                          "no_switch", backend)
    previous = current(model)
    if previous == backend:
        return previous
    record = BACKENDS.get(backend)
    if record is not None and not record.hf:
        registered.register(record)  # a name transformers does not ship: add it to its AttentionInterface
    try:
        model.set_attn_implementation(backend)
    except (ValueError, ImportError) as exc:
        raise NotSwitched(f"transformers refused attn_implementation={backend!r} for {type(model).__name__}: "
                          f"{one_line(exc, 300)}", "refused", backend) from None
    if current(model) != backend:
        raise CannotRun(f"{type(model).__name__} did not switch to {backend} (still {current(model)}): the class "
                        "cannot change its attention at run time", f"load it with attn_implementation={backend!r}")
    return previous


@contextlib.contextmanager
def using(model: nn.Module, backend: str) -> Iterator[str | None]:
    """Run the block with ``model`` switched to ``backend``; on exit, exceptions included, put
    back the implementation it had before. Yields that previous implementation.

    A model with no switch (``has_switch`` False: not a transformers model and no swapped
    hand-written attention) runs as it is, for any ``backend``: it has one attention path,
    its own. Raises ``CannotRun`` as ``apply`` does when the switch is refused; the model is
    then unchanged.
    """
    if not has_switch(model):
        yield None
        return
    previous = apply(model, backend)
    try:
        yield previous
    finally:
        if previous is not None and current(model) != previous:
            apply(model, previous)


@contextlib.contextmanager
def sdpa_kernels(names: list[str] | None) -> Iterator[None]:
    """Allow only the SDPA kernels ``names`` (``SDPA_KERNELS`` keys) inside the block.

    ``None`` or an empty list leaves torch's own choice. Raises ``OptionError`` for an
    unknown name.
    """
    if not names:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    unknown = [n for n in names if n not in SDPA_KERNELS]
    if unknown:
        raise OptionError("sdpa_kernel", "unknown {sdpa_kernel} {value}; choose from {names}", value=", ".join(unknown),
                          names=", ".join(SDPA_KERNELS))
    with sdpa_kernel([getattr(SDPBackend, SDPA_KERNELS[n]) for n in names]):
        yield
