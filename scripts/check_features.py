#!/usr/bin/env python3
"""check_features: does the backend provide the advanced attention features the model uses?

Reads from the model's config and the batch which features it needs: grouped-query (GQA)
or multi-query (MQA) attention, a sliding window, padding, logit soft-capping, ALiBi,
attention dropout. For the backend (--backend, default auto) it says whether and how each
is provided, citing the source (flash-attn's changelog and docstrings, torch's SDPA docs,
transformers' integration). Where the backend can run here, it proves it: the outputs of
a padded batch longer than the sliding window, against eager and a float64 reference.

status: fail when the backend lacks a needed feature; skip when the backend cannot run
here (the documented answer is still given, with the reason it was not verified); else
pass or fail on the outputs.

examples:
  python scripts/check_features.py
  python scripts/check_features.py --model demo:mistral --backend sdpa --json
  python scripts/check_features.py --model ./my-checkpoint --backend flash_attention_2 --dtype bfloat16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnkit import cli  # noqa: E402
from attnkit.steps import BACKEND_NAMES  # noqa: E402
from attnkit.steps.check_features import FeatureOptions, check_features  # noqa: E402


def build_parser():
    doc = __doc__.split("\n\n")
    p = cli.parser("check_features.py", doc[0], "\n\n".join(doc[1:]))
    cli.add_model_args(p, default_seq_len=256, default_batch_size=2, batch_why=", so that padding is exercised",
                       default_pad_fraction=0.25)
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKEND_NAMES,
                   help="backend to check (default: auto, the one enable_flash.py would pick)")
    cli.add_output_args(p, "check_features")
    return p


def run(args, reporter):
    return check_features(cli.options(FeatureOptions, args), reporter)


def main(argv=None):
    return cli.run("check_features", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
