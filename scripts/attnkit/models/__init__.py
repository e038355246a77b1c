"""Models: what ``--model`` names, loaded on a device, with example inputs.

``load(spec, device=, dtype=)`` returns a ``LoadedModel`` (``loading.py``): a demo
(``demos.py``), a local folder or hub id, or a factory. ``Inputs`` (``inputs.py``) are one
forward pass's tensors; ``features.needed`` names the attention features a model uses.
"""

from .demos import DEFAULT_MODEL, DEMOS, minilm_path
from .inputs import Inputs, cast_floating, row_lengths
from .loading import DEVICE_MAPS, LoadedModel, classify, load, parse_max_memory, select_output

__all__ = ["DEFAULT_MODEL", "DEMOS", "DEVICE_MAPS", "Inputs", "LoadedModel", "cast_floating", "classify", "load",
           "minilm_path", "parse_max_memory", "row_lengths", "select_output"]
