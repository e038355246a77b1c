#!/usr/bin/env python3
"""fp8_attention: FP8 attention with FlashAttention-3 on a Hopper GPU, against bf16.

FP8 attention is FlashAttention-3's separate Hopper build (module flash_attn_interface),
forward only, with per-head descale factors. flash_attn.flash_attn_func (FlashAttention-2)
has no FP8 path. This step quantises random bf16 inputs [B, S, H, D] to float8_e4m3fn
(one scale per batch and key/value head: amax / 448), runs FP8 and bf16 FlashAttention-3,
and reports latency (ms), TFLOP/s and each one's max error against a float32 reference.

status: skip (exit 0) with the reason where there is no Hopper GPU or no
flash_attn_interface; else pass when FP8 runs (and, with --compare-bf16, when its error
is at most 2 x bf16's error + eps(e4m3) x max|reference|, eps(e4m3) = 0.125).

examples:
  python scripts/fp8_attention.py --json
  python scripts/fp8_attention.py --compare-bf16 --seq-len 8192 --json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnkit import cli  # noqa: E402
from attnkit.steps.fp8_attention import Fp8Options, fp8_attention  # noqa: E402


def build_parser():
    doc = __doc__.split("\n\n")
    p = cli.parser("fp8_attention.py", doc[0], "\n\n".join(doc[1:]))
    g = p.add_argument_group("shape: q [B, S, H, D], k and v [B, S, H_kv, D]")
    g.add_argument("--batch-size", type=int, default=2, metavar="B", help="batch size (default: 2)")
    g.add_argument("--seq-len", type=int, default=4096, metavar="S", help="sequence length (default: 4096)")
    g.add_argument("--heads", type=int, default=16, metavar="H", help="query heads (default: 16)")
    g.add_argument("--kv-heads", type=int, default=16, metavar="H_KV",
                   help="key/value heads, H_kv < H for GQA (default: 16)")
    g.add_argument("--head-dim", type=int, default=128, metavar="D", help="head_dim, a multiple of 16 (default: 128)")
    g.add_argument("--no-causal", action="store_true", help="full attention instead of causal")
    p.add_argument("--compare-bf16", action="store_true", help="judge FP8's error against bf16's (the accuracy step)")
    p.add_argument("--min-run-time", type=float, default=1.0, metavar="SEC",
                   help="seconds of timed runs per variant (default: 1.0)")
    return p


def run(args, reporter):
    return fp8_attention(cli.options(Fp8Options, args, causal=not args.no_causal), reporter)


def main(argv=None):
    return cli.run("fp8_attention", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
