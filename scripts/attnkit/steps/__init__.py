"""The checklist steps: one module per step script, and the only place lower layers are composed.

``check_env``, ``enable_flash``, ``profile_attention``, ``compare_accuracy``,
``find_attention``, ``check_features``, ``fp8_attention``, ``profile_generation``,
``context_parallel``, ``benchmark_attention``, ``run_checklist``; ``session`` is what the
model steps share (load a model, locate and swap its attention, build inputs).
``scripts/*.py`` import from here and from ``attnkit.cli``, nothing else.
"""

from ..backends import BACKENDS
from ..models import DEMOS

#: The backend names a step accepts (``--backend``), in the registry's order.
BACKEND_NAMES = tuple(BACKENDS)

#: The built-in models, ``--model demo:NAME``.
DEMO_NAMES = tuple(DEMOS)


def flag(option: str) -> str:
    """The command-line flag of a library option: ``max_memory`` -> ``--max-memory``."""
    return "--" + option.replace("_", "-")
