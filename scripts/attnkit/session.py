"""A model loaded on a device with its inputs: what every model step starts from.

``open_session`` resolves device and dtype, loads the spec, finds its attention with one
small profiled forward pass, caps the sequence length to the model's maximum and builds
the example inputs. ``enable_flash``, ``profile_attention`` and ``compare_accuracy`` all
start here, so they measure the same thing the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import models
from .backends import dtype_name, parse_dtype, resolve_device
from .env import Environment, environment
from .profile import find_attention
from .report import CannotRun, Reporter


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
        from .rewrite import swapper_of

        return swapper_of(self.loaded.model)

    def data(self) -> dict[str, Any]:
        """The fields every model step reports (DESIGN.md names)."""
        return {
            "model": self.loaded.spec, "model_class": type(self.loaded.model).__name__, "family": self.loaded.family,
            "device": self.device, "dtype": dtype_name(self.dtype),
            "shape": {"batch_size": self.inputs.batch_size, "seq_len": self.inputs.seq_len},
            "inputs": self.inputs.description, "original_backend": self.loaded.original_backend,
            "attention": self.loaded.attention_shape(),
            "versions": {"torch": torch.__version__, "transformers": self.env.transformers.version,
                         "python": self.env.python},
            "notes": self.notes,
        }


def check_shape(batch_size: int, seq_len: int, pad_fraction: float | None) -> None:
    """Raise ``CannotRun`` for a batch, sequence length or padding fraction out of range."""
    if batch_size < 1:
        raise CannotRun(f"--batch-size must be at least 1, not {batch_size}", "")
    if seq_len < 2:
        raise CannotRun(f"--seq-len must be at least 2, not {seq_len}", "")
    if pad_fraction is not None and not 0.0 <= pad_fraction < 1.0:
        raise CannotRun(f"--pad-fraction must be in [0, 1), not {pad_fraction}", "")


def resolve(device: str, dtype: str, env: Environment | None = None) -> tuple[Environment, str, torch.dtype]:
    env = env or environment()
    dev = resolve_device(device, env)
    return env, dev, parse_dtype(dtype, env, dev)


def open_session(spec: str | None, *, device: str = "auto", dtype: str = "auto", batch_size: int = 1,
                 seq_len: int = 1024, pad_fraction: float | None = None, trust_remote_code: bool = False,
                 baseline: str = "eager", reporter: Reporter | None = None,
                 env: Environment | None = None, train: bool = False) -> Session:
    """Load ``spec`` and prepare inputs [B, S] (see the module docstring); ``train`` puts the
    model in training mode before its attention is found.

    Raises ``CannotRun`` for bad sizes, a device or dtype that does not exist here, any
    load failure (see ``models.load``), a model with no attention, or attention with no
    transformers switch.
    """
    reporter = reporter or Reporter(quiet=True)
    check_shape(batch_size, seq_len, pad_fraction)
    env, dev, dt = resolve(device, dtype, env)
    spec = spec or models.DEFAULT_MODEL
    models.classify(spec)  # a path that does not exist fails before anything loads
    with reporter.stage(f"loading {spec} on {dev} in {dtype_name(dt)}"):
        loaded = models.load(spec, device=dev, dtype=dt, trust_remote_code=trust_remote_code)
    notes = list(loaded.notes)
    if train:
        loaded.model.train()
    with reporter.stage("finding the attention"):
        ops = find_attention(loaded, baseline)
    from .rewrite import swapper_of

    swapper = swapper_of(loaded.model)
    if swapper is not None:
        with reporter.stage("swapping hand-written attention for SDPA and verifying each site"):
            swapper.prepare(loaded, loaded.probe(), dt, "sdpa")
        swapper.require_swapped()
    limit = loaded.max_seq_len()
    if limit and seq_len > limit:
        notes.append(f"--seq-len {seq_len} capped to the model's maximum, {limit} positions")
        seq_len = limit
    for note in notes:
        reporter.note(note)
    return Session(env, dev, dt, loaded, loaded.inputs(batch_size, seq_len, pad_fraction), ops, notes)
