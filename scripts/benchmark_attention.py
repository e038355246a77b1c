#!/usr/bin/env python3
"""benchmark_attention: every attention backend on the seed's operator grid, measured on this machine.

For each dtype, shape [B, H, D] (default: the seed's B8 H32 D64 and B2 H16 D128), causal
and not, forward and forward + backward, and S, the autotuner's candidates (eager, SDPA's
kernels one by one, flex_attention, FlashAttention-2/3/4 where usable) run on the same
q, k, v [B, S, H, D]:

  latency    median and IQR over interleaved timing rounds (ms)
  TFLOP/s    4 * B * H * D * S^2 (half for causal, x3.5 with backward) over the median
  % peak     of a square matmul in the same dtype, timed in this run
  memory     peak memory of one call above the inputs (MB)
  accuracy   a slice of the output against float64, within 2 x eager's error + eps(dtype)
  autotune   a quick pass picks a candidate; the full pass says how close it is to the fastest

With --max-seq-len-search (CUDA), the largest S each backend runs at before it runs out of
memory (under --memory-limit GB when given). Writes data.grid, data.autotune_by_config, report.png
(TFLOP/s against S, a line per backend) and memory.png into the run folder.

examples:
  python scripts/benchmark_attention.py --device cpu --seq-len 512 --seq-len 1024 --json
  python scripts/benchmark_attention.py --device cuda --dtype bfloat16 --direction fwd
  python scripts/benchmark_attention.py --shape 2,16,128 --seq-len 8192 --causal both --direction both
  python scripts/benchmark_attention.py --device cuda --max-seq-len-search --memory-limit 40
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnkit import cli  # noqa: E402
from attnkit.steps.benchmark_attention import BenchmarkOptions, benchmark_attention  # noqa: E402


def build_parser():
    doc = __doc__.split("\n\n")
    p = cli.parser("benchmark_attention.py", doc[0], "\n\n".join(doc[1:]))
    g = p.add_argument_group("grid")
    g.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible), cpu, cuda or cuda:N")
    g.add_argument("--dtype", dest="dtypes", action="append", metavar="DTYPE",
                   help="repeatable; default: bfloat16 and float16 on a GPU, float32 on a CPU")
    g.add_argument("--shape", dest="shapes", action="append", metavar="B,H,D", type=cli.shape,
                   help="batch, heads, head_dim (or B,H,H_KV,D for GQA); repeatable; default: 8,32,64 and 2,16,128")
    g.add_argument("--seq-len", dest="seq_lens", type=cli.integer(1, cli.MAX_SEQ_LEN), action="append", metavar="S",
                   help="repeatable; default: 512 to 16384 on a GPU, 512 and 1024 on a CPU")
    g.add_argument("--causal", default="both", choices=("causal", "non-causal", "both"), help="(default: both)")
    g.add_argument("--direction", choices=("fwd", "fwd+bwd", "both"),
                   help="forward, forward + backward, or both (default: both on a GPU, fwd on a CPU)")
    g.add_argument("--backends", type=cli.backend_list(labels=True), metavar="LIST",
                   help="only these candidates, by backend or label (e.g. sdpa,flash_attention_4 or sdpa[cudnn]); "
                        "eager is always timed as the baseline")
    g.add_argument("--min-run-time", type=cli.seconds, default=0.2, metavar="SEC",
                   help="timing per candidate and configuration, split over interleaved rounds (default: 0.2)")
    g.add_argument("--tune-time", type=cli.seconds, default=0.05, metavar="SEC",
                   help="timing per candidate in the autotuner's quick pass (default: 0.05)")
    g.add_argument("--tune-compiled", action=argparse.BooleanOptionalAction, default=None,
                   help="time torch.compile candidates (flex_attention); default: on CUDA only")
    g.add_argument("--max-seq-len-search", action="store_true",
                   help="also find the largest S each backend runs at (CUDA; causal forward on the last --shape)")
    g.add_argument("--search-cap", type=cli.integer(1, cli.MAX_SEQ_LEN), default=262144, metavar="S",
                   help="stop the search there (default: 262144)")
    g.add_argument("--memory-limit", type=cli.gigabytes, metavar="GB",
                   help="cap this process's CUDA memory (torch.cuda.set_per_process_memory_fraction)")
    cli.add_output_args(p, "benchmark_attention")
    return p


def run(args, reporter):
    return benchmark_attention(cli.options(BenchmarkOptions, args), reporter)


def main(argv=None):
    return cli.run("benchmark_attention", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
