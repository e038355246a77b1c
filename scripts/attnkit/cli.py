"""What every step script shares: argument groups, and ``run``, which keeps the contract.

``run(step, parser, fn)`` parses the arguments, calls ``fn(args, reporter)`` (returning a
``StepResult``) and prints it: one JSON object on stdout with ``--json``, else rich. Every
failure becomes a result, never a traceback: a bad argument, ``CannotRun``, Ctrl-C before
anything was measured, or the model's ``sys.exit`` -> ``error``, one line, exit 2; an
unexpected exception -> ``error`` with its type and message (``--debug`` re-raises). A full
disk when writing the result (``> /dev/full``) is one line on stderr, exit 2; a broken
pipe (``| head``) keeps the step's exit code: the verdict stands.

Every value (of repeated options too) is checked while parsing by the types below, bounds
in the message; output targets right after (``report.check_outputs``), before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import re
import sys
from typing import Any, Callable, Sequence

# kineto (torch's profiler) logs every start/stop unless level 6; it reads the C environment
# when torch loads, so this runs before any torch import.
if os.environ.get("KINETO_LOG_LEVEL") is None:
    os.putenv("KINETO_LOG_LEVEL", "6")

from .report import (CannotRun, NeedsTrust, NoKernel, NoMemoryBound, NotSwitched, OptionError, OutOfMemory,  # noqa: E402
                     Reporter, StepResult, check_outputs, said)
from .steps import flag  # noqa: E402

EXIT_CODES_HELP = "exit codes: 0 pass (or skip), 1 a check failed, 2 the step could not run"

#: Upper bounds of the counting options: far above any run that fits, low enough that a typo
#: (99999999999999999999) is refused at once instead of hanging while the inputs are built.
MAX_BATCH = 2**16
MAX_SEQ_LEN = 2**24
MAX_HEADS = 2**12
MAX_HEAD_DIM = 2**12
MAX_COUNT = 2**20  # repetitions, rows, tokens, processes
#: The longest timing window a step takes per measurement (seconds): an hour.
MAX_SECONDS = 3600.0


class Parser(argparse.ArgumentParser):
    """argparse that raises ``CannotRun`` (exit 2, one line) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # "argument --seq-len: must be at least 2, not -1" -> "--seq-len must be at least 2, not -1";
        # "argument --backends: unknown backend x; ..." -> "--backends: unknown backend x; ..."
        message = re.sub(r"^argument (\S+): (must|is) ", r"\1 \2 ", message)
        message = re.sub(r"^argument (\S+): ", r"\1: ", message)
        raise CannotRun(f"{self.prog}: {message}", f"see {self.prog} --help")


def parser(prog: str, description: str, epilog: str = "") -> Parser:
    """A step's parser: --json, --quiet, --debug; no abbreviations (``--jso`` is refused)."""
    p = Parser(prog=prog, description=description, epilog=(epilog + "\n\n" + EXIT_CODES_HELP).strip(),
               formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout (progress goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    return p


# --- argument types
# For ``add_argument(type=...)``: argparse calls them on every value; ArgumentTypeError -> one line.

def integer(low: int = 1, high: int = MAX_COUNT) -> Callable[[str], int]:
    """An int in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, not {value}")
        return value
    parse.__name__ = "int"
    return parse


def positive_float(high: float | None = None, unit: str = "") -> Callable[[str], float]:
    """A finite float above 0 (nan and inf refused), at most ``high`` when given."""
    def parse(text: str) -> float:
        value = _float(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive finite number{unit}, not {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}{unit}, not {text}")
        return value
    parse.__name__ = "float"
    return parse


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None


def fraction(text: str) -> float:
    """A float in [0, 1)."""
    value = _float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {text}")
    return value


def text(value: str) -> str:
    """A string that is not empty (``--model ""`` would otherwise mean the default)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def backend_list(extra: Sequence[str] = (), labels: bool = False) -> Callable[[str], list[str]]:
    """Comma-separated ``BACKENDS`` names (or ``extra``, e.g. auto), at least one; with
    ``labels`` also SDPA kernels, sdpa[cudnn]."""
    def parse(value: str) -> list[str]:
        from .backends import BACKENDS, SDPA

        names = [x.strip() for x in value.split(",") if x.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"must name at least one backend: {', '.join((*extra, *BACKENDS))}")
        kernels = [k.name for k in SDPA.kernels]
        for name in names:
            base, _, kernel = name.partition("[")
            ok = name in extra or name in BACKENDS or (
                labels and base == SDPA.name and kernel.endswith("]") and kernel[:-1] in kernels)
            if not ok:
                valid = ", ".join((*extra, *BACKENDS)) + (
                    ", or " + ", ".join(f"sdpa[{k}]" for k in kernels) if labels else "")
                raise argparse.ArgumentTypeError(f"unknown backend {name}; choose from {valid}")
        return names
    parse.__name__ = "backend list"
    return parse


def shape(value: str) -> str:
    """B,H,D or B,H,H_KV,D (H a multiple of H_KV; ``benchmark_attention.parse_shape``) within
    ``MAX_BATCH``, ``MAX_HEADS``, ``MAX_HEAD_DIM``; returned as given."""
    from .steps.benchmark_attention import parse_shape  # torch: imported by the script already

    try:
        parts = parse_shape(value)
    except CannotRun:
        raise argparse.ArgumentTypeError(
            f"give B,H,D or B,H,H_KV,D (positive, H a multiple of H_KV), not {value!r}") from None
    for name, n, high in zip(("B", "H", "H_KV", "D"), parts, (MAX_BATCH, MAX_HEADS, MAX_HEADS, MAX_HEAD_DIM)):
        if n > high:
            raise argparse.ArgumentTypeError(f"{name} must be at most {high}, not {n}")
    return value


#: --min-run-time, --tune-time: a positive, finite timing window of at most an hour.
seconds = positive_float(MAX_SECONDS, " of seconds")
#: --memory-limit: a positive, finite number of GB.
gigabytes = positive_float(unit=" of GB")


def add_model_args(p: argparse.ArgumentParser, *, default_seq_len: int = 1024, model_required: bool = False,
                   sweep: bool = False, default_batch_size: int = 1, batch_why: str = "",
                   default_pad_fraction: float | None = None, model_help: str = "",
                   shape: bool = True) -> argparse._ArgumentGroup:
    """--model, input shape, dtype and device options of the model steps; returns the group.
    ``sweep``: --seq-len repeatable (None when not given); ``batch_why`` explains a default
    in --help; ``model_help`` replaces --model's help; ``shape=False`` leaves out
    --batch-size, --seq-len and --pad-fraction."""
    from .steps import DEMO_NAMES

    g = p.add_argument_group("model and inputs")
    g.add_argument("--model", metavar="SPEC", required=model_required, type=text,
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
    g.add_argument("--batch-size", type=integer(1, MAX_BATCH), default=default_batch_size, metavar="B",
                   help=f"batch size B (default: {default_batch_size}{batch_why})")
    if sweep:
        g.add_argument("--seq-len", type=integer(2, MAX_SEQ_LEN), action="append", metavar="S",
                       help=f"sequence length S in tokens, capped to the model's maximum; repeat it for a sweep "
                            f"(default: {default_seq_len})")
    else:
        g.add_argument("--seq-len", type=integer(2, MAX_SEQ_LEN), default=default_seq_len, metavar="S",
                       help=f"sequence length S in tokens, capped to the model's maximum (default: {default_seq_len})")
    g.add_argument("--pad-fraction", type=fraction, default=default_pad_fraction, metavar="F",
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
    g.add_argument("--max-memory", metavar="DEV=SIZE,...", type=text,
                   help="what each device may hold, e.g. 0=10GiB,1=10GiB,cpu=50GiB (devices left out get nothing); "
                        "with --device-map")


def add_measure_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--min-run-time", type=seconds, default=1.0, metavar="SEC",
                   help="seconds of timed runs per backend for torch.utils.benchmark's blocked_autorange, after a "
                        "warm-up pass (default: 1.0)")
    add_sdpa_kernel_arg(g)


def add_sdpa_kernel_arg(g: argparse._ActionsContainer) -> None:
    g.add_argument("--sdpa-kernel", action="append", dest="sdpa_kernels", metavar="NAME",
                   choices=["flash", "efficient", "cudnn", "math"],
                   help="allow only this SDPA kernel (repeatable: flash, efficient, cudnn, math), through "
                        "torch.nn.attention.sdpa_kernel; default: torch's own choice")


def options(cls: type, args: argparse.Namespace, **overrides: object) -> object:
    """``cls`` filled from ``args`` by field name, ``write_report`` from --no-report; ``overrides`` win."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    if hasattr(args, "no_report"):
        values["write_report"] = not args.no_report
    values.update(overrides)
    return cls(**values)


SAVE_MODEL = ("save the switched model (save_pretrained, attn_implementation recorded in config.json) into DIR, a "
              "new or empty folder, only when every check passed")


def add_output_args(p: argparse.ArgumentParser, step: str, save: bool | str = False) -> None:
    """--report-dir, --no-report; --save with ``save`` (True: ``SAVE_MODEL``; a string: its help)."""
    g = p.add_argument_group("output")
    g.add_argument("--report-dir", metavar="DIR", type=text,
                   help=f"run folder for report.json / report.md / report.png "
                        f"(default: ./attention-reports/{step}-<time>-<model>, a new folder); DIR must be new "
                        f"or empty: a folder holding anything is refused before the run starts")
    g.add_argument("--no-report", action="store_true", help="write no run folder")
    if save:
        g.add_argument("--save", metavar="DIR", type=text, help=SAVE_MODEL if save is True else save)


def _sigterm_as_interrupt() -> None:
    """SIGTERM (``timeout``, a scheduler) ends a step as Ctrl-C does, reporting what was measured."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a step called from a library): leave it as it is
        pass


class _KeepOpen:
    """A stream the model's ``sys.stdout.close()`` cannot close: the step still needs it."""

    def __init__(self, stream):
        self._stream = stream

    def close(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def stdout_to_stderr(active: bool):
    """Inside the block, prints go to stderr (sys.stdout and file descriptor 1: C extensions,
    subprocesses), so with --json stdout holds only ``run``'s JSON object."""
    if not active:  # stdout stays the terminal's; the model's code still cannot close it
        with contextlib.redirect_stdout(_KeepOpen(sys.stdout)):
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
        with contextlib.redirect_stdout(_KeepOpen(sys.stderr)):
            yield
    finally:
        sys.stdout.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _not_switched(exc: NotSwitched) -> str:
    return {
        "no_switch": "run find_attention.py --model SPEC to see its attention sites",
        "refused": "use --backend auto",
        "already_fused": "profile it with profile_attention.py --backends eager,eager to see its kernels",
        "no_site": "find_attention.py --model SPEC lists each site; the reasons say what to change"
                   if exc.backend in ("", "sdpa") else "use --backend sdpa",
    }.get(exc.reason, "")


#: The command line's advice for a library error without one (the library never names flags):
#: exception type -> text, or a function of the error. ``OptionError`` carries its own.
ADVICE: dict[type[CannotRun], str | Callable[[Any], str]] = {
    OutOfMemory: "lower --batch-size or --seq-len",
    NotSwitched: _not_switched,
    NoKernel: "allow more kernels (drop --sdpa-kernel) or change the inputs",
    NeedsTrust: "read that code first; rerun with --trust-remote-code if you trust it",
    NoMemoryBound: "pass --memory-limit GB",
}


def with_advice(exc: CannotRun) -> CannotRun:
    """``exc``, its options named as flags (``OptionError``), its ``hint`` set from ``ADVICE``
    when the library gave none."""
    if isinstance(exc, OptionError):
        exc.render(flag)
    if not exc.hint:
        advice = next((text for kind, text in ADVICE.items() if isinstance(exc, kind)), "")
        exc.hint = advice(exc) if callable(advice) else advice
    return exc


def run(step: str, p: argparse.ArgumentParser, fn: Callable[[argparse.Namespace, Reporter], StepResult],
        argv: Sequence[str] | None = None) -> int:
    """Parse, check the output targets, call ``fn``, print the result, return the exit code.
    Ranks >= 1 of a launcher (``RANK`` in the environment) print nothing."""
    argv = list(sys.argv[1:] if argv is None else argv)
    silent = os.environ.get("RANK", "0") not in ("", "0")
    reporter = Reporter(json_mode="--json" in argv, quiet="--quiet" in argv or silent)
    _sigterm_as_interrupt()
    try:
        args = p.parse_args(argv)  # --help prints and raises SystemExit(0), as argparse does
    except CannotRun as exc:
        result = StepResult.error(step, exc)
    else:
        result = _call(step, fn, args, reporter, debug="--debug" in argv)
    if silent:
        return result.exit_code
    return _print(result, reporter)


def _call(step: str, fn: Callable[[argparse.Namespace, Reporter], StepResult], args: argparse.Namespace,
          reporter: Reporter, debug: bool) -> StepResult:
    """``fn``'s result, or what stopped it as a result: the one boundary every failure meets."""
    try:
        check_outputs(args)
        with stdout_to_stderr(reporter.json_mode):
            return fn(args, reporter)
    except CannotRun as exc:
        return StepResult.error(step, with_advice(exc))
    except KeyboardInterrupt:
        return StepResult(step, "error", "interrupted (Ctrl-C) before anything was measured", [], None, "rerun it")
    except SystemExit as exc:  # the model's code (or a library it runs) called sys.exit or exit()
        return StepResult(step, "error", f"the step was stopped by sys.exit({exc.code!r}), called by the model's "
                                         "code or a library it runs", [], None,
                          "keep sys.exit out of the code a model spec imports and calls (put it under "
                          "if __name__ == '__main__':); rerun with --debug for the traceback")
    except Exception as exc:  # a bug, or a library failing in a way we did not foresee
        if debug:
            raise
        oom = _out_of_memory(exc)
        if oom is not None:  # a stage that must finish ran out of memory: known, with its advice
            return StepResult.error(step, with_advice(oom))
        message = said(exc, 400)
        return StepResult(step, "error", f"unexpected error: {message}", [], None,
                          "rerun with --debug for the traceback, and report it")


def _out_of_memory(exc: Exception) -> OutOfMemory | None:
    """``exc`` as ``OutOfMemory`` if it is an allocation failure no step caught, else None."""
    if "torch" not in sys.modules:
        return None
    from .measure.timing import is_oom, oom_message

    return OutOfMemory("the step", oom_message(exc)) if is_oom(exc) else None


def _print(result: StepResult, reporter: Reporter) -> int:
    """Print ``result``, return the exit code; without --json an error without checks is one
    line on stderr. A failure to write is ``_output_failed``'s."""
    try:
        if result.status == "error" and not reporter.json_mode and not result.checks:
            from rich.markup import escape

            line = f"[bold red]error:[/] {escape(result.summary)}"
            if result.next:
                line += f" [dim](next: {escape(result.next)})[/]"
            reporter.err.print(line, soft_wrap=True)
            sys.stderr.flush()
            return result.exit_code
        code = reporter.emit(result)
        sys.stdout.flush()
        return code
    except OSError as exc:
        return _output_failed(exc, result)
    except SystemExit:  # rich's Console.on_broken_pipe: the reader of its output went away
        return _output_failed(BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)), result)


def _output_failed(exc: OSError, result: StepResult) -> int:
    """Writing the result failed: a broken pipe keeps the exit code, anything else (``ENOSPC``)
    is one line on stderr, exit 2. stdout then points at /dev/null, so the interpreter's last
    flush cannot fail with a traceback."""
    for stream in (sys.stdout, sys.stderr) if exc.errno == errno.EPIPE else (sys.stdout,):
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):  # no file descriptor (an embedding host)
            pass
    if exc.errno == errno.EPIPE:
        return result.exit_code
    try:
        sys.stderr.write(f"error: could not write the {result.step} result ({result.status}) to stdout: "
                         f"{exc.strerror or exc} (next: write it where there is room, e.g. > result.json on "
                         f"another disk)\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return 2
