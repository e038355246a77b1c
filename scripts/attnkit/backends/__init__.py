"""The backend registry: one record per attention backend, and the choice among them.

``from attnkit.backends import BACKENDS`` gives the mapping name -> ``Backend`` record
(``record.py`` says what a record holds, ``catalogue.py`` holds the records: adding a
backend means adding one record there). ``availability`` and ``choose`` decide what can
run here and what ``auto`` takes; ``probe`` asks pip and the import system; ``calls`` is
how each backend is called on [B, S, H, D] tensors.
"""

from .catalogue import BACKENDS, SDPA
from .choice import (AUTO_ORDER, FLASH_ATTENTION_BACKENDS, Availability, Choice, availability, choose,
                     head_dim_of, library_status)
from .record import FEATURES, Backend, SdpaKernel, Support

__all__ = ["AUTO_ORDER", "BACKENDS", "FEATURES", "FLASH_ATTENTION_BACKENDS", "SDPA", "Availability", "Backend", "Choice",
           "SdpaKernel", "Support", "availability", "choose", "head_dim_of", "library_status"]
