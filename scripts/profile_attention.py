#!/usr/bin/env python3
"""profile_attention: measure attention backends side by side, before vs after.

For each backend (default: eager, then the one `auto` picks) on the same inputs: median
forward latency (ms, torch.utils.benchmark after a warm-up), peak memory during one
forward pass (MB, weights excluded), TFLOP/s of useful work, and the attention kernels
torch.profiler saw run. Several --seq-len values make a sweep and a plot of latency and
memory against sequence length. With --against SPEC it compares two models instead (for
example a checkpoint and its switched copy), each with the backend it loads with.

With --train it measures forward + backward in training mode instead (the training time and
peak memory per backend, gradients included).

The step passes when, at the longest sequence, the last run shows its fused kernel, is
faster than the first and uses no more peak memory.

examples:
  python scripts/profile_attention.py
  python scripts/profile_attention.py --backends eager,sdpa --seq-len 512 --seq-len 1024 --seq-len 2048
  python scripts/profile_attention.py --model ./ckpt --against ./ckpt-sdpa --json
  python scripts/profile_attention.py --model demo:llama-1b --device cuda --backends eager,sdpa --sdpa-kernel flash
  python scripts/profile_attention.py --model demo:llama-2-7b --device cuda --batch-size 4 --seq-len 2048 --train \
      --backends eager,sdpa,flash_attention_2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnkit import cli  # noqa: E402
from attnkit.steps.profile_attention import ProfileOptions, profile_attention  # noqa: E402


def build_parser():
    doc = __doc__.split("\n\n")
    p = cli.parser("profile_attention.py", doc[0], "\n\n".join(doc[1:]))
    cli.add_model_args(p, sweep=True)
    p.add_argument("--against", metavar="SPEC", type=cli.text,
                   help="a second model spec to compare with --model, same inputs")
    p.add_argument("--backends", action="append", metavar="LIST", type=cli.backend_list(extra=("auto",)),
                   help="comma-separated backends in order, first = before, last = after (auto allowed; "
                        "repeatable); default: eager,auto, or each model as loaded with --against")
    p.add_argument("--train", action="store_true",
                   help="measure forward + backward in training mode (loss sum(output * G), G fixed): training time "
                        "and peak memory per backend; a backend out of memory is reported, the others still run")
    cli.add_measure_args(p)
    cli.add_output_args(p, "profile_attention")
    return p


def run(args, reporter):
    backends = [b for item in (args.backends or []) for b in item] or None
    return profile_attention(cli.options(ProfileOptions, args, backends=backends, seq_lens=args.seq_len or [1024]),
                             reporter)


def main(argv=None):
    return cli.run("profile_attention", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
