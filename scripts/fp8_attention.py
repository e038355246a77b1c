#!/usr/bin/env python3
"""fp8_attention: is FP8 attention faster than bf16 on this GPU, and what does it cost in accuracy?

FP8 attention here is cuDNN's sdpa_fp8 graph via nvidia-cudnn-frontend (pip install
nvidia-cudnn-frontend==1.17.0), forward only, on sm90 (Hopper) and sm100 GPUs
(FlashAttention-2 never takes FP8, FlashAttention-4 only on sm100, FlashAttention-3 is not
on PyPI; check_env.py lists every FP8 path).

For each shape of the grid (default: the seed's, B8 H32, head_dim 64 and 128, S 1024 to
16384, causal and not; shape options narrow it) on random bf16 [B, S, H, D], it quantises
q, k, v to float8_e4m3fn (one scale per tensor, amax / 448), runs the kernel and reports:

  speed      median latency and TFLOP/s of the FP8 kernel, of FP8 with the quantisation
             included, and of bf16 attention (SDPA's cuDNN kernel, FlashAttention-4 where
             it imports); the speedup over the best bf16 kernel
  accuracy   against a float64 reference on the same inputs (batch 0, first --ref-heads
             heads): max abs error, relative RMS error, cosine similarity, for FP8 and bf16
  kernels    the GPU kernels torch.profiler saw during one FP8 call, by name

status: skip (exit 0) with the reason where there is no sm90/sm100 GPU or no
nvidia-cudnn-frontend; pass when FP8 ran on every shape, the profiler saw its kernel, and
every shape meets rel_rms_err(fp8) <= 2 x rel_rms_err(bf16) + eps(e4m3), eps(e4m3) = 0.125
(errors against float64, relative RMS: ||o - ref|| / ||ref||); fail otherwise. The run
folder holds report.json, report.md (the table) and report.png (TFLOP/s against S).

examples:
  python scripts/fp8_attention.py --json                                   # the seed's grid, 20 shapes
  python scripts/fp8_attention.py --head-dim 128 --seq-len 8192 --causal no --json
  python scripts/fp8_attention.py --batch-size 1 --heads 32 --kv-heads 8 --seq-len 4096 --seq-len 8192
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnkit import cli  # noqa: E402
from attnkit.steps.fp8_attention import Fp8Options, fp8_attention  # noqa: E402


def build_parser():
    doc = __doc__.split("\n\n")
    p = cli.parser("fp8_attention.py", doc[0], "\n\n".join(doc[1:]))
    g = p.add_argument_group("shapes: q [B, S, H, D], k and v [B, S, H_kv, D]; the default is the seed's grid")
    g.add_argument("--batch-size", type=cli.integer(1, cli.MAX_BATCH), default=8, metavar="B",
                   help="batch size (default: 8)")
    g.add_argument("--heads", type=cli.integer(1, cli.MAX_HEADS), default=32, metavar="H",
                   help="query heads (default: 32)")
    g.add_argument("--kv-heads", type=cli.integer(1, cli.MAX_HEADS), default=None, metavar="H_KV",
                   help="key/value heads, fewer than H for GQA (default: as many as --heads)")
    g.add_argument("--head-dim", type=cli.integer(1, cli.MAX_HEAD_DIM), action="append", dest="head_dims", metavar="D",
                   help="head_dim, a multiple of 16 up to 256; repeatable (default: 64 and 128)")
    g.add_argument("--seq-len", type=cli.integer(2, cli.MAX_SEQ_LEN), action="append", dest="seq_lens", metavar="S",
                   help="sequence length; repeatable (default: 1024 2048 4096 8192 16384)")
    g.add_argument("--causal", choices=("both", "yes", "no"), default="both",
                   help="causal (top-left) attention, full attention, or both (default: both)")
    m = p.add_argument_group("measurement")
    m.add_argument("--min-run-time", type=cli.seconds, default=0.25, metavar="SEC",
                   help="seconds of timed runs per kernel and shape (default: 0.25)")
    m.add_argument("--ref-heads", type=cli.integer(1, cli.MAX_HEADS), default=4, metavar="N",
                   help="query heads of batch 0 the float64 reference covers (default: 4)")
    cli.add_output_args(p, "fp8_attention")
    return p


def run(args, reporter):
    return fp8_attention(cli.options(Fp8Options, args), reporter)


def main(argv=None):
    return cli.run("fp8_attention", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
