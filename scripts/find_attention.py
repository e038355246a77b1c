#!/usr/bin/env python3
"""find_attention: every attention site in source code or in a live model, and whether it can become SDPA.

--source PATH reads a .py file or package folder without importing it (a file that does
not parse is an error naming its line). --model SPEC runs the model once and finds the
attention-bearing submodules by what they execute (untraceable code too). Per site:
file:line (and qualified name), the score product's form (matmul, bmm, baddbmm, einsum),
the mask (causal buffer, causal, boolean, additive, none), scale, dropout, GQA, softmax
upcast, and whether it can become F.scaled_dot_product_attention, or why not. Calls
already on a fast path (F.scaled_dot_product_attention, flash_attn_func) are listed with
what keeps them off the flash kernel (an explicit attn_mask, fp32), and
nn.MultiheadAttention calls leaving need_weights=True (weights materialised). With
--model, each swap of a model without a transformers switch is verified on the module's
own inputs against float64.

--write-patch FILE writes the source change as a unified diff (git apply), its paths
relative to the working directory, or for files outside it to their git work tree (a note
says where to apply it). Nothing of yours is edited.

status: pass when every hand-written site can be swapped; fail when one cannot (the
reasons say why).

examples:
  python scripts/find_attention.py --source my_model.py
  python scripts/find_attention.py --source src/ --json
  python scripts/find_attention.py --model my_model.py:build --write-patch sdpa.patch
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnkit import cli  # noqa: E402
from attnkit.steps.find_attention import FindOptions, find_attention  # noqa: E402


def build_parser():
    doc = __doc__.split("\n\n")
    p = cli.parser("find_attention.py", doc[0], "\n\n".join(doc[1:]))
    p.add_argument("--source", metavar="PATH", type=cli.text,
                   help="a .py file or a folder of them, read without importing")
    cli.add_model_args(p, default_seq_len=32, default_batch_size=2, batch_why=", for the tracing pass",
                       model_help="a model to run and trace instead of --source (see enable_flash.py --help for "
                                  "SPEC); with neither, the embedded default demo:llama")
    p.add_argument("--write-patch", metavar="FILE", type=cli.text,
                   help="write the source change of the swappable sites, a unified diff, to FILE (a new file)")
    cli.add_output_args(p, "find_attention")
    return p


def run(args, reporter):
    return find_attention(cli.options(FindOptions, args), reporter)


def main(argv=None):
    return cli.run("find_attention", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
