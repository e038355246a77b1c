#!/usr/bin/env python3
"""context_parallel: attention with the sequence sharded across N processes, proven against one device.

Runs attention, or a transformers causal LM (--model), with the sequence split across N
ranks by PyTorch's context parallel API (torch.distributed.tensor.experimental.
context_parallel: ring attention over SDPA's flash, efficient or cudnn kernel), gathers
the output (context_parallel_unshard) and proves it in the same run:

  kernels    the SDPA kernel torch.profiler saw on each rank
  accuracy   the gathered output against float64 (at --check-rows sampled query rows):
             err <= 2 x the 1-device run's own error + eps(dtype) x max|reference|
  memory     each rank's peak (inputs + what the call allocated, MB) against one device
  time       median forward latency (ms, the slowest rank), and the scaling efficiency
             T_1 / (N x T_N) against plain SDPA on one device over the whole sequence

By default the ring runs one head at a time (--heads-per-call 1; same output): a rank
holds its q/k/v/output shards and one head's ring buffers, about 1/N of one device's
memory (0.55 on 2 H200s, S 131072, H 32).

Launch with torchrun, one process per GPU (NCCL); rank 0 prints the result. Plain python
on a GPU runs world size 1 (the 1-GPU baseline). On CPU it spawns --nproc (default 2)
gloo processes and checks torch's ring (sharding, K/V rotation, merging, gathering) with
SDPA's CPU flash kernel, plus the public block with the math kernel (non-causal only).

The API's limits (references/context-parallel.md) are checked first; each is an error
with one line, exit 2.

examples:
  python scripts/context_parallel.py --json                        # CPU: 2 gloo processes
  torchrun --nproc-per-node=2 scripts/context_parallel.py --seq-len 131072 --rotate alltoall --json
  torchrun --nproc-per-node=2 scripts/context_parallel.py --max-seq-len-search 1048576 --reps 0 --json
  torchrun --nproc-per-node=2 scripts/context_parallel.py --model demo:llama-1b --seq-len 16384 --json
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnkit import cli  # noqa: E402
from attnkit.steps.context_parallel import FLASH_IMPLS, CPOptions, context_parallel  # noqa: E402


def build_parser():
    doc = __doc__.split("\n\n")
    p = cli.parser("context_parallel.py", doc[0], "\n\n".join(doc[1:]))
    g = p.add_argument_group("attention: q [B, H, S, D], k and v [B, H, S_kv, D]")
    g.add_argument("--seq-len", type=cli.integer(2, cli.MAX_SEQ_LEN), metavar="S",
                   help="sequence length, the one that is sharded (default: 131072 on GPUs, 512 on CPU)")
    g.add_argument("--kv-len", type=cli.integer(2, cli.MAX_SEQ_LEN), metavar="S_KV",
                   help="key/value length (default: S; non-causal only)")
    g.add_argument("--batch-size", type=cli.integer(1, cli.MAX_BATCH), default=1, metavar="B",
                   help="batch size (default: 1)")
    g.add_argument("--heads", type=cli.integer(1, cli.MAX_HEADS), default=32, metavar="H", help="heads (default: 32)")
    g.add_argument("--head-dim", type=cli.integer(1, cli.MAX_HEAD_DIM), default=128, metavar="D",
                   help="head_dim (default: 128)")
    g.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="causal attention (default: causal)")
    g.add_argument("--attn-mask", action="store_true",
                   help="ask for an explicit attn_mask: refused, torch's context parallel takes none (exit 2)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on sm80+ GPUs, fp32 on CPU), float32, bfloat16 or "
                                                   "float16 (default: auto)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    g.add_argument("--model", metavar="SPEC", type=cli.text,
                   help="run a transformers causal LM (demo:NAME, folder or hub id) instead of bare attention: token "
                        "and position ids sharded, every SDPA call a ring, the logits gathered (GPUs only)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a Hub model's own code to run")
    c = p.add_argument_group("context parallelism")
    c.add_argument("--load-balance", action=argparse.BooleanOptionalAction, default=None,
                   help="torch's head-tail load balancer (default: on for causal attention when S divides by "
                        "2 x world size, else off)")
    c.add_argument("--rotate", default="allgather", choices=("allgather", "alltoall"),
                   help="how K/V shards travel: allgather (torch's default: one all-gather, then every rank holds "
                        "all K/V) or alltoall (one shard passed on per step)")
    c.add_argument("--merge-dtype", default="float32", choices=("float32", "input"),
                   help="dtype the ring merges partial outputs in: float32 (torch's default, "
                        "_cp_options.convert_to_f32) or input (the input's: less memory, same accuracy check) "
                        "(default: float32)")
    c.add_argument("--heads-per-call", type=cli.integer(1, cli.MAX_HEADS), metavar="N",
                   help="run torch's ring on N heads at a time into one [B, H, S/N_ranks, D] output: the same "
                        "output, and what the ring allocates beyond the q/k/v/output shards (K/V send and receive "
                        "buffers, merge temporaries) falls to N/H of one call's; N >= H: one call, as torch does "
                        "(default: 1, the least memory; attention workload only)")
    cli.add_sdpa_kernel_arg(c)
    c.add_argument("--flash-impl", choices=FLASH_IMPLS,
                   help="put FlashAttention-3 or -4 behind SDPA's flash kernel (torch.nn.attention."
                        "activate_flash_attention_impl, a torch 2.13 prototype) for the 1-device run and the ring; "
                        "implies --sdpa-kernel flash; needs flash-attn-4 (FA4) or the FA3 build and a Hopper GPU")
    c.add_argument("--nproc", type=cli.integer(1, 1024), metavar="N",
                   help="processes to spawn when not under torchrun (default: 2 on CPU, 1 on a GPU)")
    m = p.add_argument_group("measurement")
    m.add_argument("--reps", type=cli.integer(0, cli.MAX_COUNT), default=5, metavar="N",
                   help="timed runs per path, the same count on every rank (default: 5; 0: no timing)")
    m.add_argument("--check-rows", type=cli.integer(1, cli.MAX_SEQ_LEN), default=1024, metavar="R",
                   help="query rows the float64 reference is computed at, plus the shard edges (default: 1024; all "
                        "rows when S is smaller)")
    m.add_argument("--max-seq-len-search", type=cli.integer(2, cli.MAX_SEQ_LEN), metavar="CAP",
                   help="also find the longest sequence up to CAP that runs, on one device and sharded: CAP, then "
                        "doubling from --seq-len, then bisecting to 1/64, one forward pass per probe")
    m.add_argument("--memory-limit", type=cli.gigabytes, metavar="GB",
                   help="during --max-seq-len-search, cap each rank's GPU memory at GB "
                        "(torch.cuda.set_per_process_memory_fraction) to end the search sooner; the longest "
                        "sequences then scale with the cap (the search gathers no output)")
    return p


def run(args, reporter):
    return context_parallel(cli.options(CPOptions, args), reporter)


def main(argv=None):
    return cli.run("context_parallel", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
