#!/usr/bin/env python3
"""enable_flash: switch a model's attention to the fastest backend that runs here, and prove it.

Loads --model, finds its attention, chooses a backend (--backend auto measures every
candidate that can run here on the model's own inputs: SDPA's kernels one by one (cudnn,
flash, efficient, math), FlashAttention-2/3/4 where installed and usable, flex_attention;
each must pass the accuracy gate, and the fastest that passes is chosen; compile and
warm-up time are reported apart), switches a transformers model through its own
attn_implementation API and a model with hand-written attention by swapping each verified
site for F.scaled_dot_product_attention at run time (find_attention.py lists them), and
verifies in this run, on the same inputs, before (the eager baseline) and after:

  kernels    the attention ops and GPU kernels torch.profiler saw run
  latency    median forward time, torch.utils.benchmark, after a warm-up (ms)
  memory     peak memory allocated during one forward pass, weights excluded (MB)
  accuracy   outputs against a float64 run: the candidate's max error must stay within
             2 x the baseline's own error + eps(dtype) x max|reference|; top-1 token
             agreement for language models; padding positions left out, reported apart

It prints a table (or one JSON object with --json), writes report.json, report.md and
report.png into a run folder, and with --save DIR writes the switched model, only when
every check passed. Nothing else of yours is written.

examples:
  python scripts/enable_flash.py                                  # the embedded default model
  python scripts/enable_flash.py --seq-len 2048 --json
  python scripts/enable_flash.py --model demo:minilm --batch-size 8 --seq-len 128
  python scripts/enable_flash.py --model ./my-checkpoint --save ./my-checkpoint-sdpa
  python scripts/enable_flash.py --model my_model.py:build --write-patch sdpa.patch
  python scripts/enable_flash.py --model my_model.py:build --train --seq-len 1024
  python scripts/enable_flash.py --model demo:llama-1b --device cuda --dtype bfloat16 --seq-len 4096
  python scripts/enable_flash.py --model demo:llama --backend flash_attention_4 --device cuda
  python scripts/enable_flash.py --model demo:llama-1b --device-map auto --max-memory 0=1GiB,cpu=50GiB
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnkit import cli  # noqa: E402
from attnkit.steps import BACKEND_NAMES  # noqa: E402
from attnkit.steps.enable_flash import EnableOptions, enable_flash  # noqa: E402


def build_parser():
    doc = __doc__.split("\n\n")
    p = cli.parser("enable_flash.py", doc[0], "\n\n".join(doc[1:]))
    cli.add_model_args(p)
    g = p.add_argument_group("backends")
    g.add_argument("--backend", default="auto", choices=("auto",) + BACKEND_NAMES,
                   help="backend to switch to: auto (default) times every candidate that runs here and takes the "
                        "fastest that passes the accuracy gate (data.autotune has the ranking); a name forces it and "
                        "the step fails with the reason when it cannot run here")
    g.add_argument("--tune-compiled", action=argparse.BooleanOptionalAction, default=None,
                   help="with --backend auto, also time candidates that compile per shape with torch.compile "
                        "(flex_attention); default: on CUDA yes, on CPU no (inductor's C++ build takes tens of "
                        "seconds there)")
    g.add_argument("--baseline", default="eager", choices=BACKEND_NAMES,
                   help="backend measured as 'before' (default: eager)")
    g.add_argument("--train", action="store_true",
                   help="measure forward + backward in training mode, and check the gradients of the parameters and "
                        "floating inputs as well as the outputs (dropout set to 0 for the comparison)")
    g.add_argument("--write-patch", metavar="FILE", type=cli.text,
                   help="for hand-written attention: write the source change of the swapped sites, a unified diff, to "
                        "FILE (a new file); it is always written to swap.patch in the run folder")
    cli.add_device_map_args(p)
    cli.add_measure_args(p)
    cli.add_output_args(p, "enable_flash", save=True)
    return p


def run(args, reporter):
    return enable_flash(cli.options(EnableOptions, args), reporter)


def main(argv=None):
    return cli.run("enable_flash", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
