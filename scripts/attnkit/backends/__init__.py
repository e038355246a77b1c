"""The backend registry: one record per attention backend, and the choice among them.

``from attnkit.backends import BACKENDS`` gives the mapping name -> ``Backend`` record
(``record.py`` says what a record holds, ``catalogue.py`` holds the records: adding a
backend means adding one record there). ``availability`` and ``choose`` decide what can
run here and what ``auto`` takes; ``probe`` asks pip and the import system; ``calls`` is
how each backend is called on [B, S, H, D] tensors; ``fp8_cudnn`` is the FP8 kernel (cuDNN's
``sdpa_fp8``) behind the ``fp8`` record; ``FP8_PATHS`` lists every FP8 attention library and
``fp8_availability`` says which can run here.
"""

from .catalogue import BACKENDS, FP8_PATHS, SDPA
from .choice import (AUTO_ORDER, FLASH_ATTENTION_BACKENDS, Availability, Choice, Fp8Availability, availability, choose,
                     fp8_availability, head_dim_of, library_status)
from .record import FEATURES, Backend, Fp8Path, SdpaKernel, Support

__all__ = ["AUTO_ORDER", "BACKENDS", "FEATURES", "FLASH_ATTENTION_BACKENDS", "FP8_PATHS", "SDPA", "Availability",
           "Backend", "Choice", "Fp8Availability", "Fp8Path", "SdpaKernel", "Support", "availability", "choose",
           "fp8_availability", "head_dim_of", "library_status"]
