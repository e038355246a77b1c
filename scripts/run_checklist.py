#!/usr/bin/env python3
"""run_checklist: run one of SKILL.md's workflows step by step, as an agent would.

Each step of the workflow (skill.yaml) runs as its own command, as written in SKILL.md
with ${HERMES_SKILL_DIR} set to this skill's folder; its JSON is judged by the step's pass
rule, and the checklist is printed with each line checked [x], failed [!], skipped [-] or
not run [ ] and its one-line result. It stops at the first failure unless --keep-going.
The model options (--model, --batch-size, --seq-len, --pad-fraction, --dtype, --device,
--trust-remote-code) go to the steps that take them.

The run folder (--report-dir, default ./attention-reports/run_checklist-<time>-<workflow>)
holds the checklist's report.json and report.md and every file a step writes (a relative
--write-patch FILE lands there, never in the working directory); with --no-report it is
created only for such a file.

The step passes when every step passed or was skipped; it is an error (exit 2) when a step
could not run.

examples:
  python scripts/run_checklist.py --list
  python scripts/run_checklist.py enable
  python scripts/run_checklist.py enable --model ./my-checkpoint --seq-len 2048 --json
  python scripts/run_checklist.py flash-attn --keep-going
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnkit import cli  # noqa: E402
from attnkit.steps.run_checklist import CannotRun, listing, run_workflow  # noqa: E402

SKILL_DIR = Path(__file__).resolve().parents[1]


def build_parser():
    doc = __doc__.split("\n\n")
    p = cli.parser("run_checklist.py", doc[0], "\n\n".join(doc[1:]))
    p.add_argument("workflow", nargs="?", help="workflow id or number (see --list)")
    p.add_argument("--list", action="store_true", help="list the workflows and their steps")
    p.add_argument("--keep-going", action="store_true", help="run every step even after a failure")
    g = p.add_argument_group("passed on to the steps that take them")
    g.add_argument("--model", metavar="SPEC", type=cli.text, help="model spec (see enable_flash.py --help)")
    g.add_argument("--batch-size", type=cli.integer(1, cli.MAX_BATCH), metavar="B",
                   help="batch size B (default: each step's own)")
    g.add_argument("--seq-len", type=cli.integer(2, cli.MAX_SEQ_LEN), metavar="S",
                   help="sequence length S in tokens (default: each step's own)")
    g.add_argument("--pad-fraction", type=cli.fraction, metavar="F",
                   help="right-pad rows 1..B-1 by up to F*S tokens, F in [0, 1) (default: each step's own)")
    g.add_argument("--dtype", type=cli.text, help="auto, float32, bfloat16 or float16 (default: auto)")
    g.add_argument("--device", type=cli.text, help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a Hub model's own modelling code to run (off by default: read it first)")
    cli.add_output_args(p, "run_checklist")
    return p


def run(args, reporter):
    if args.list:
        return listing(SKILL_DIR)
    if not args.workflow:
        raise CannotRun("name a workflow to run, or pass --list", "run_checklist.py --list")
    options = {k: getattr(args, k) for k in ("model", "batch_size", "seq_len", "pad_fraction", "dtype", "device",
                                             "trust_remote_code")}
    return run_workflow(SKILL_DIR, args.workflow, options, args.keep_going, reporter, report_dir=args.report_dir,
                        write_report=not args.no_report)


def main(argv=None):
    return cli.run("run_checklist", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
