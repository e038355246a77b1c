#!/usr/bin/env python3
"""profile_generation: generation with a KV cache, per attention backend, the way users run it.

For a Hugging Face causal LM (default: demo:llama) and each backend (default: eager, then
every backend auto may pick that can run here: sdpa, and FlashAttention 2/3/4 where
installed and usable; flex_attention only when named, since it compiles per shape), with
greedy model.generate:

  prefill     generate(max_new_tokens=1) on a prompt [B, P] (ms)
  decode      (generate(N tokens) - prefill) / (N - 1): one decode step reading the KV cache
              (ms per token), and B x 1000 / that (tokens/s), with a dynamic (DynamicCache)
              and a static (StaticCache) cache; medians of torch.utils.benchmark
  memory      peak memory during one generate of N tokens above the weights (MB), and the
              KV cache: 2 x layers x kv_heads x head_dim x tokens x batch x bytes, checked
              against the tensors of the cache object
  floor       the memory floor of one decode step: (weight bytes read + KV-cache bytes at
              P + N/2 tokens x B) / the copy bandwidth measured in the same run (ms), and the
              % of that floor each run reaches
  teacher-forced  every backend and cache fed eager's greedy tokens on a left-padded batch of
              4 prompts; at each decode step its logits must be as close to a float64 eager
              forward (no cache) as eager's own: within 2 x eager's error + eps(dtype) x
              max|ref|, every step, every dtype
  greedy      greedy tokens on the same batch against eager's (prompt padding is never
              compared). float32: every token must agree. bf16/fp16: a row may go apart only at
              a near-tie: at its first divergent step the backend's logits must be as close to
              a float64 reference as eager's own; each divergence is reported
  chosen      among configurations that pass teacher-forced agreement, the lowest
              prefill + (N - 1) x decode at the first prompt length and batch size: written as
              code (data.chosen.code) and generation_config fields; --save DIR writes
              generation_config.json and use_chosen.py
  --max-context  the longest prompt that fits (prefill + 4 decode steps, batch = the first
              --batch-size), searched by doubling then bisecting to 1/64, never past the model's
              max_position_embeddings (reported as the cap). Limit: --memory-limit GB, or the
              device's memory. CUDA: torch.cuda.set_per_process_memory_fraction (weights
              included). CPU: a child process under resource.RLIMIT_AS = its address space after
              loading + the limit (default: MemAvailable), so allocations past it really fail

transformers compiles a static cache's decode step on CUDA by default; this step does not
(every backend timed as eager PyTorch) unless --compile is given.

The step passes when teacher-forced and greedy agreement hold, each backend's own attention kernel ran
during generation, and every run finished; a run out of memory is a measured limit,
reported, not a failure. Writes report.json, report.md and report.png (prefill and
decode per backend) into a run folder.

examples:
  python scripts/profile_generation.py
  python scripts/profile_generation.py --json --batch-size 1 --cache dynamic
  python scripts/profile_generation.py --model demo:gpt2 --max-context --memory-limit 0.5
  python scripts/profile_generation.py --model demo:llama-1b --device cuda --prompt-len 8192 --prompt-len 32768 --max-context
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnkit import cli  # noqa: E402
from attnkit.steps import BACKEND_NAMES  # noqa: E402
from attnkit.steps.profile_generation import GenerationOptions, profile_generation  # noqa: E402


def build_parser():
    doc = __doc__.split("\n\n")
    p = cli.parser("profile_generation.py", doc[0], "\n\n".join(doc[1:]))
    g = cli.add_model_args(p, shape=False)
    g.add_argument("--prompt-len", type=cli.integer(1, cli.MAX_SEQ_LEN), action="append", metavar="P",
                   help="prompt length P in tokens, capped to the model's maximum minus --new-tokens; repeatable "
                        "(default: 512)")
    g.add_argument("--new-tokens", type=cli.integer(2, cli.MAX_COUNT), default=32, metavar="N",
                   help="tokens generated per run, every one of them (min_new_tokens = N); also the length of the "
                        "agreement run (default: 32)")
    g.add_argument("--batch-size", type=cli.integer(1, cli.MAX_BATCH), action="append", metavar="B",
                   help="batch size B, repeatable (default: 1 and 8)")
    g.add_argument("--cache", action="append", choices=("dynamic", "static"), dest="caches",
                   help="KV cache: dynamic (DynamicCache) or static (StaticCache), repeatable (default: both)")
    b = p.add_argument_group("backends")
    b.add_argument("--backends", action="append", metavar="LIST", type=cli.backend_list(),
                   help="comma-separated backends (repeatable; " + ", ".join(BACKEND_NAMES) + "); eager is always "
                        "added as the reference; default: eager and every backend auto may pick that can run here")
    m = p.add_argument_group("measurement")
    m.add_argument("--min-run-time", type=cli.seconds, default=1.0, metavar="SEC",
                   help="seconds of timed runs per generate call for torch.utils.benchmark's blocked_autorange "
                        "(default: 1.0)")
    m.add_argument("--compile", action="store_true",
                   help="let transformers compile the static cache's decode step on CUDA, as it does by default "
                        "(first call untimed); off by default here")
    m.add_argument("--max-context", action="store_true",
                   help="also search the longest prompt that fits per backend (see above)")
    m.add_argument("--memory-limit", type=cli.gigabytes, metavar="GB",
                   help="the memory --max-context may use (GB, 2**30 bytes): on CUDA the whole process's share of "
                        "the GPU, weights included; on CPU what the search may add beyond the loaded process "
                        "(default: the GPU's memory, or MemAvailable on CPU)")
    cli.add_output_args(p, "profile_generation", save=(
        "write the chosen configuration into DIR, a new or empty folder, only when every check passed: "
        "generation_config.json (the model's own, with the chosen cache and compile settings; "
        "GenerationConfig.from_pretrained(DIR) reads it) and use_chosen.py (the lines that apply it)"))
    return p


def run(args, reporter):
    backends = [b for item in (args.backends or []) for b in item] or None
    return profile_generation(cli.options(GenerationOptions, args, backends=backends,
                                          prompt_lens=args.prompt_len or [512],
                                          batch_sizes=args.batch_size or [1, 8],
                                          caches=args.caches or ["dynamic", "static"],
                                          save=args.save), reporter)


def main(argv=None):
    return cli.run("profile_generation", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
