"""What every step script shares: argument groups, and ``run``, which keeps the contract.

``run(step, parser, fn)`` parses the arguments, calls ``fn(args, reporter)`` (one library
function returning a ``StepResult``) and prints the result: exactly one JSON object on
stdout with ``--json``, a rich rendering without it. Whatever goes wrong becomes a
result too, never a traceback: a bad argument or ``CannotRun`` -> status ``error``, one
line, exit 2; Ctrl-C before anything was measured -> ``error``, exit 2; an unexpected
exception -> ``error`` with its type and message (``--debug`` re-raises it to show the
traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Sequence

# torch's profiler (kineto) prints a line per start/stop at its default log level; 6
# silences it unless the user chose a level. kineto reads it from the C environment when
# torch loads, so this runs before any torch import.
if os.environ.get("KINETO_LOG_LEVEL") is None:
    os.putenv("KINETO_LOG_LEVEL", "6")

from .report import CannotRun, Reporter, StepResult  # noqa: E402

EXIT_CODES_HELP = "exit codes: 0 pass (or skip), 1 a check failed, 2 the step could not run"


class Parser(argparse.ArgumentParser):
    """argparse that raises ``CannotRun`` (exit 2, one line) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CannotRun(f"{self.prog}: {message}", f"see {self.prog} --help")


def parser(prog: str, description: str, epilog: str = "") -> Parser:
    p = Parser(prog=prog, description=description, epilog=(epilog + "\n\n" + EXIT_CODES_HELP).strip(),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout (progress goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    return p


def add_model_args(p: argparse.ArgumentParser, *, default_seq_len: int = 1024, model_required: bool = False,
                   sweep: bool = False, default_batch_size: int = 1, batch_why: str = "",
                   default_pad_fraction: float | None = None, model_help: str = "",
                   shape: bool = True) -> argparse._ArgumentGroup:
    """--model and the input shape, dtype and device options, shared by the model steps.

    ``sweep`` makes --seq-len repeatable (a list, None when not given). A step with other
    defaults passes them (``batch_why`` says why in --help); ``model_help`` replaces the
    --model help. ``shape=False`` leaves out --batch-size, --seq-len and --pad-fraction for a
    step that adds its own. Returns the group, for a step to add its own options to.
    """
    from .steps import DEMO_NAMES

    g = p.add_argument_group("model and inputs")
    g.add_argument("--model", metavar="SPEC", required=model_required,
                   help=model_help or "a Hugging Face id or local folder, path/to/file.py:factory, package.module:"
                        f"factory, or a built-in demo:NAME ({', '.join(DEMO_NAMES)}); "
                        "default: demo:llama, a small Llama-architecture causal LM with random weights")
    if shape:
        _add_shape_args(g, default_seq_len, sweep, default_batch_size, batch_why, default_pad_fraction)
    g.add_argument("--dtype", default="auto", help="auto (bf16 on sm80+ GPUs, fp16 on older GPUs, fp32 on CPU), "
                                                   "float32, bfloat16 or float16 (default: auto)")
    g.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible), cpu, cuda or cuda:N "
                                                    "(default: auto)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a Hub model's own modelling code to run (off by default: read it first)")
    return g


def _add_shape_args(g: argparse._ArgumentGroup, default_seq_len: int, sweep: bool, default_batch_size: int,
                    batch_why: str, default_pad_fraction: float | None) -> None:
    g.add_argument("--batch-size", type=int, default=default_batch_size, metavar="B",
                   help=f"batch size B (default: {default_batch_size}{batch_why})")
    if sweep:
        g.add_argument("--seq-len", type=int, action="append", metavar="S",
                       help=f"sequence length S in tokens, capped to the model's maximum; repeat it for a sweep "
                            f"(default: {default_seq_len})")
    else:
        g.add_argument("--seq-len", type=int, default=default_seq_len, metavar="S",
                       help=f"sequence length S in tokens, capped to the model's maximum (default: {default_seq_len})")
    g.add_argument("--pad-fraction", type=float, default=default_pad_fraction, metavar="F",
                   help="right-pad rows 1..B-1 by up to F*S tokens, row 0 is full (default: " +
                        (f"{default_pad_fraction}" if default_pad_fraction is not None else
                         "0 for causal LMs, 0.5 for encoders") +
                        "); padding positions are left out of accuracy and reported apart")


def add_device_map_args(p: argparse.ArgumentParser) -> None:
    """--device-map and --max-memory: a model too large for one device, spread by accelerate."""
    g = p.add_argument_group("a model over several devices")
    g.add_argument("--device-map", metavar="MAP", choices=("auto", "balanced", "balanced_low_0", "sequential"),
                   help="spread the model over the visible GPUs (then the CPU) with accelerate, as from_pretrained("
                        "device_map=MAP) does: auto, balanced, balanced_low_0 or sequential; needs accelerate")
    g.add_argument("--max-memory", metavar="DEV=SIZE,...",
                   help="what each device may hold, e.g. 0=10GiB,1=10GiB,cpu=50GiB (devices left out get nothing); "
                        "with --device-map")


def add_measure_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--min-run-time", type=float, default=1.0, metavar="SEC",
                   help="seconds of timed runs per backend for torch.utils.benchmark's blocked_autorange, after a "
                        "warm-up pass (default: 1.0)")
    add_sdpa_kernel_arg(g)


def add_sdpa_kernel_arg(g: argparse._ActionsContainer) -> None:
    g.add_argument("--sdpa-kernel", action="append", dest="sdpa_kernels", metavar="NAME",
                   choices=["flash", "efficient", "cudnn", "math"],
                   help="allow only this SDPA kernel (repeatable: flash, efficient, cudnn, math), through "
                        "torch.nn.attention.sdpa_kernel; default: torch's own choice")


def options(cls: type, args: argparse.Namespace, **overrides: object) -> object:
    """The step's options dataclass ``cls`` filled from ``args`` by field name;
    ``write_report`` from --no-report; ``overrides`` win."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    if hasattr(args, "no_report"):
        values["write_report"] = not args.no_report
    values.update(overrides)
    return cls(**values)


def add_output_args(p: argparse.ArgumentParser, step: str, save: bool = False) -> None:
    """--report-dir and --no-report (and --save for the main job)."""
    g = p.add_argument_group("output")
    g.add_argument("--report-dir", metavar="DIR",
                   help=f"run folder for report.json / report.md / report.png "
                        f"(default: ./attention-reports/{step}-<time>-<model>)")
    g.add_argument("--no-report", action="store_true", help="write no run folder")
    if save:
        g.add_argument("--save", metavar="DIR",
                       help="save the switched model (save_pretrained, attn_implementation recorded in config.json) "
                            "into DIR, a new or empty folder, only when every check passed")


def _sigterm_as_interrupt() -> None:
    """SIGTERM (``timeout``, a batch scheduler, ``kill``) ends a step as Ctrl-C does: what was
    measured is kept and reported, instead of the process dying with nothing written."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a step called from a library): leave it as it is
        pass


@contextlib.contextmanager
def stdout_to_stderr(active: bool):
    """Inside the block, whatever the model (or a library) prints goes to stderr, at the Python
    level (sys.stdout) and at the file-descriptor level (C extensions, subprocesses), so that
    with --json stdout holds exactly the one JSON object ``run`` prints afterwards."""
    if not active:
        yield
        return
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedding host): the Python level is enough
        saved = None
    try:
        if saved is not None:
            os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def run(step: str, p: argparse.ArgumentParser, fn: Callable[[argparse.Namespace, Reporter], StepResult],
        argv: Sequence[str] | None = None) -> int:
    """Parse, call ``fn``, print the result, return the exit code (see the module docstring).

    In a process that a launcher such as torchrun started as rank 1 or higher (``RANK`` in
    the environment), nothing is printed: rank 0 prints the one result.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    silent = os.environ.get("RANK", "0") not in ("", "0")
    reporter = Reporter(json_mode="--json" in argv, quiet="--quiet" in argv or silent)
    _sigterm_as_interrupt()
    debug = "--debug" in argv
    try:
        args = p.parse_args(argv)
        with stdout_to_stderr(reporter.json_mode):
            result = fn(args, reporter)
    except CannotRun as exc:
        result = StepResult.error(step, exc)
    except KeyboardInterrupt:
        result = StepResult(step, "error", "interrupted (Ctrl-C) before anything was measured", [], {}, "rerun it")
    except Exception as exc:  # a bug, or a library failing in a way we did not foresee
        if debug:
            raise
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        result = StepResult(step, "error", f"unexpected error: {message}", [], {},
                            "rerun with --debug for the traceback, and report it")
    if silent:
        return result.exit_code
    if result.status == "error" and not reporter.json_mode:
        from rich.markup import escape

        line = f"[bold red]error:[/] {escape(result.summary)}"
        if result.next:
            line += f" [dim](next: {escape(result.next)})[/]"
        reporter.err.print(line, soft_wrap=True)
        return result.exit_code
    return reporter.emit(result)
