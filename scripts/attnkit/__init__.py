"""attnkit: switch a model's attention to a fused backend and prove it.

The library behind the optimizing-attention-flash skill's step scripts, in layers (top to
bottom; a module imports only from layers below it):

* ``cli``       argument groups and the exit-code contract shared by the scripts
* ``steps``     one module per checklist step; the only place lower layers are composed
* ``measure``   kernels seen by torch.profiler, latency, peak memory, FLOPs, accuracy
* ``swap``      applying a backend: transformers' switch, hand-written attention swaps
* ``models``    model specs, loading, example inputs
* ``backends``  the backend registry (``BACKENDS``), availability, the ``auto`` choice
* ``env``       machine facts; ``report`` result objects and their rendering

ARCHITECTURE.md at the repository root maps them. Scripts import the package from beside
them (``scripts/attnkit``), so a plain copy of the skill folder works without installing
anything of ours.
"""

__version__ = "0.1.0"
