"""attnkit: switch a model's attention to a fused backend and prove it.

The library behind the optimizing-attention-flash skill's step scripts. A module per
concern:

* ``env``       torch / CUDA / GPU / SDPA kernels / flash-attn facts, the check_env step
* ``models``    model specs (hub id, folder, factory, demo), example inputs, outputs
* ``backends``  the backend catalogue, availability with reasons, the ``auto`` choice
* ``switch``    applying a backend through transformers' API; SDPA kernel restriction
* ``profile``   kernels seen by torch.profiler, peak memory, latency, FLOPs
* ``accuracy``  the float64 reference and the tolerance rule
* ``enable``    the main job that composes them
* ``report``    result objects; JSON, rich, markdown, plots (the only module that prints)
* ``cli``       argument groups and the exit-code contract shared by the scripts

Scripts import it from beside them (``scripts/attnkit``), so a plain copy of the skill
folder works without installing anything of ours.
"""

__version__ = "0.1.0"
