#!/usr/bin/env python3
"""check_env: can this machine run fused attention, and which backend would it use?

Reports torch (SDPA's fused kernels and torch.nn.attention.sdpa_kernel need 2.2+), CUDA,
each GPU's name and compute capability, which SDPA kernels (flash, efficient, cudnn, math)
are compiled in, enabled and usable, whether FlashAttention-2/3/4 import (version, or the
exact import error and its meaning), transformers' version, the backend `auto` would pick
on this device and dtype with the reason against each other one, and every FP8 attention
library (data.fp8: cuDNN via nvidia-cudnn-frontend, FlashAttention-3, FlashAttention-4,
flashinfer): installed, usable here, and why not.

The step passes when every --require holds (default: sdpa).

examples:
  python scripts/check_env.py
  python scripts/check_env.py --json
  python scripts/check_env.py --require flash_attn --require sm80 --json
  python scripts/check_env.py --require fp8 --json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnkit import cli  # noqa: E402
from attnkit.steps.check_env import REQUIREMENTS, check_env_step  # noqa: E402


def build_parser():
    p = cli.parser("check_env.py", __doc__.split("\n\n")[0], "\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--require", action="append", choices=sorted(REQUIREMENTS), metavar="NAME",
                   help="a requirement the step checks (repeatable): " +
                        "; ".join(f"{k}: {v}" for k, v in REQUIREMENTS.items()) + " (default: sdpa)")
    p.add_argument("--device", default="auto", help="device the recommendation is for: auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="dtype the recommendation is for: auto, float32, bfloat16, float16")
    return p


def main(argv=None):
    return cli.run("check_env", build_parser(),
                   lambda a, reporter: check_env_step(a.require, a.device, a.dtype), argv)


if __name__ == "__main__":
    sys.exit(main())
