#!/usr/bin/env python3
"""compare_accuracy: do the outputs still match after the switch?

Runs the same inputs through a baseline and a candidate (two backends of one model, or two
model specs with --against, e.g. a checkpoint and its switched copy) and through a float64
eager run of the model, the reference. The candidate passes when its max error against
the reference stays within 2 x the baseline's own error + eps(dtype) x max|reference|
(the rule of flash-attn's tests; eps is torch.finfo(dtype).eps). Logits are compared for
language models (with top-1 token agreement), the last hidden state otherwise; padding
positions are left out and reported apart. No timing: see profile_attention.py.

examples:
  python scripts/compare_accuracy.py
  python scripts/compare_accuracy.py --model demo:minilm --batch-size 8 --seq-len 128 --json
  python scripts/compare_accuracy.py --model ./ckpt --against ./ckpt-sdpa
  python scripts/compare_accuracy.py --model demo:llama-1b --device cuda --dtype bfloat16 --candidate sdpa
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnkit import cli  # noqa: E402
from attnkit.steps import BACKEND_NAMES  # noqa: E402
from attnkit.steps.compare_accuracy import AccuracyOptions, compare_accuracy  # noqa: E402


def build_parser():
    doc = __doc__.split("\n\n")
    p = cli.parser("compare_accuracy.py", doc[0], "\n\n".join(doc[1:]))
    cli.add_model_args(p)
    p.add_argument("--against", metavar="SPEC", type=cli.text,
                   help="a second model spec whose outputs are compared with --model's")
    g = p.add_argument_group("backends")
    g.add_argument("--baseline", choices=BACKEND_NAMES, help="backend of the baseline (default: eager; with --against, "
                                                        "the first model as loaded)")
    g.add_argument("--candidate", choices=("auto",) + BACKEND_NAMES,
                   help="backend of the candidate (default: auto; with --against, the second model as loaded)")
    cli.add_sdpa_kernel_arg(g)
    cli.add_output_args(p, "compare_accuracy")
    return p


def run(args, reporter):
    return compare_accuracy(cli.options(AccuracyOptions, args), reporter)


def main(argv=None):
    return cli.run("compare_accuracy", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
