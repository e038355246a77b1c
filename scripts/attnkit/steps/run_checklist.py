"""The manifest (skill.yaml), SKILL.md's checklist lines, and running a workflow's steps.

skill.yaml holds the workflows an agent follows::

    workflows:
      - id: enable
        title: "Workflow 1: ..."
        steps:
          - id: check_env
            title: Check the environment            # the exact SKILL.md checklist text
            run: python ${HERMES_SKILL_DIR}/scripts/check_env.py --json
            takes: [model, shape, dtype, device]    # run_checklist options passed through
            pass: {status: pass, data.speedup: "> 1"}
            on_fail: what to do when the rule fails

A SKILL.md checklist line is ``- [ ] TITLE: `COMMAND``` with exactly one command.

A ``pass`` rule maps a dotted path in the step's JSON to a value (equal), a list (one of)
or ``"OP NUMBER"`` (OP in ``> >= < <= == !=``). ``run_workflow`` runs each command as its
own process, as an agent's terminal would, judges its JSON by the rule, and stops at the
first failure unless asked to keep going. Files a step writes (``OUTPUT_FLAGS``) go into
the checklist's run folder, never the working directory, where a second run would refuse.
"""

from __future__ import annotations

import json
import operator
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..report import (CannotRun, Check, Reporter, Sections, StepData, StepResult, Table, default_run_folder,
                      register_view, write_run_folder)

#: ``- [ ] TITLE: `python ${HERMES_SKILL_DIR}/scripts/STEP.py ...``` (one command per line)
CHECKLIST_LINE = re.compile(r"^- \[ \] (?P<title>.+?): `(?P<run>python \$\{HERMES_SKILL_DIR\}/scripts/[\w.-]+\.py[^`]*)`\s*$")

#: run_checklist options a step may take, by the name used in its ``takes`` list.
PASS_THROUGH = {
    "model": ("model", "trust_remote_code"),
    "shape": ("batch_size", "seq_len", "pad_fraction"),
    "dtype": ("dtype",),
    "device": ("device",),
}

#: Options of a step's command that name a file the step writes: a relative path is taken
#: inside the checklist's run folder.
OUTPUT_FLAGS = ("--write-patch",)

OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}


@dataclass
class Step:
    id: str
    title: str
    run: str
    rule: dict[str, Any]
    on_fail: str = ""
    takes: list[str] = field(default_factory=list)

    @property
    def script(self) -> str:
        match = re.search(r"scripts/([\w.-]+\.py)", self.run)
        return match.group(1) if match else ""


@dataclass
class Workflow:
    id: str
    title: str
    steps: list[Step]


@dataclass
class Manifest:
    meta: dict[str, Any]
    workflows: list[Workflow]

    def workflow(self, wanted: str) -> Workflow:
        """By id, or by its 1-based number. Raises ``CannotRun`` for an unknown one."""
        for i, w in enumerate(self.workflows, 1):
            if wanted in (w.id, str(i)):
                return w
        raise CannotRun(f"unknown workflow {wanted!r}; choose from " +
                        ", ".join(f"{w.id} ({i})" for i, w in enumerate(self.workflows, 1)),
                        "run_checklist.py --list shows them")


def load_manifest(root: Path) -> Manifest:
    """Read ``root/skill.yaml``. Raises ``CannotRun`` when it is missing or malformed."""
    path = root / "skill.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
        workflows = [Workflow(w["id"], w["title"], [
            Step(s["id"], s["title"], s["run"], dict(s.get("pass") or {"status": "pass"}), s.get("on_fail", ""),
                 list(s.get("takes") or [])) for s in w["steps"]]) for w in raw["workflows"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise CannotRun(f"cannot read {path}: {type(exc).__name__}: {exc}", "") from None
    meta = {k: v for k, v in raw.items() if k != "workflows"}
    return Manifest(meta, workflows)


def checklist_lines(skill_md: str) -> list[tuple[int, str, str]]:
    """(line number, title, command) of every ``- [ ]`` line of SKILL.md; one not of the
    checklist form has an empty command, for a validator to report."""
    out = []
    for n, line in enumerate(skill_md.splitlines(), 1):
        if line.startswith("- [ ]"):
            m = CHECKLIST_LINE.match(line)
            out.append((n, m["title"], m["run"]) if m else (n, line[6:].strip(), ""))
    return out


def lookup(result: dict, path: str) -> Any:
    """The value at a dotted ``path`` of a step's JSON object (KeyError when absent)."""
    value: Any = result
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


def evaluate(rule: dict[str, Any], result: dict) -> tuple[bool, str]:
    """Judge a step's JSON ``result`` by its ``pass`` ``rule``; returns (passed, evidence)."""
    parts, ok = [], True
    for path, want in rule.items():
        try:
            got = lookup(result, path)
        except KeyError:
            parts.append(f"{path} missing")
            ok = False
            continue
        if isinstance(want, str) and (m := re.fullmatch(r"\s*(>=|<=|==|!=|>|<)\s*(-?[\d.eE+-]+)\s*", want)):
            good = isinstance(got, (int, float)) and not isinstance(got, bool) and OPS[m[1]](got, float(m[2]))
            shown = f"{got:.3g}" if isinstance(got, float) else repr(got)
            parts.append(f"{path} {shown} {m[1]} {m[2]}" if good else f"{path} {shown} not {m[1]} {m[2]}")
        elif isinstance(want, list):
            good = got in want
            parts.append(f"{path} {got!r}" + ("" if good else f" not in {want}"))
        else:
            good = got == want
            parts.append(f"{path} {got!r}" + ("" if good else f" != {want!r}"))
        ok &= good
    return ok, "; ".join(parts)


def command(step: Step, skill_dir: Path, options: dict[str, Any], folder: Path | None = None) -> list[str]:
    """The step's argv: ${HERMES_SKILL_DIR} replaced, ``python`` this interpreter, a relative
    ``OUTPUT_FLAGS`` file put in ``folder`` when given, the ``takes`` options (dest -> value)
    appended."""
    text = step.run.replace("${HERMES_SKILL_DIR}", str(skill_dir))
    argv = shlex.split(text)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    if folder is not None:
        for i, arg in enumerate(argv[:-1]):
            if arg in OUTPUT_FLAGS and not Path(argv[i + 1]).expanduser().is_absolute():
                argv[i + 1] = str(folder / argv[i + 1])
    for group in step.takes:
        for dest in PASS_THROUGH.get(group, ()):
            value = options.get(dest)
            if value is None or value is False:
                continue
            flag = "--" + dest.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
    return argv


@dataclass
class StepRun:
    """What one step did: its exit code, JSON object, verdict and one-line evidence."""

    id: str
    title: str
    command: list[str]
    mark: str  # "x" passed, "!" failed, "-" skipped, " " not run
    rc: int | None = None
    status: str | None = None
    summary: str = ""
    evidence: str = ""
    hint: str = ""
    seconds: float | None = None
    result: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "command": " ".join(shlex.quote(a) for a in self.command)}


@dataclass(kw_only=True)
class ChecklistData(StepData):
    """``data`` of a workflow's run: ``workflow`` (id), ``title``, ``skill_dir``, the ``options``
    set, and ``steps`` (``StepRun.to_dict``: mark, exit code, the step's JSON as ``result``,
    the rule's evidence, ``seconds`` of wall time). ``report_dir``: None when nothing written."""

    workflow: str = ""
    title: str = ""
    skill_dir: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)


@dataclass(kw_only=True)
class WorkflowListData(StepData):
    """``data`` of ``run_checklist.py --list``: ``workflows``, one dict per workflow (id as
    ``workflow``, ``number``, ``title``, and its ``steps``: id, title, command, ``takes``)."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"report_dir"})  # no run folder is written

    workflows: list[dict[str, Any]] = field(default_factory=list)


def run_step(step: Step, argv: list[str], quiet: bool = False) -> StepRun:
    """Run one step's command, read its JSON object and judge it."""
    run = StepRun(step.id, step.title, argv, "!")
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None, text=True)
    run.seconds = round(time.perf_counter() - t0, 1)
    run.rc = proc.returncode
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        run.summary = f"exit {proc.returncode}, and no JSON object on stdout"
        run.hint = step.on_fail
        return run
    run.result, run.status, run.summary = result, result.get("status"), result.get("summary", "")
    if run.status == "skip":
        run.mark, run.evidence = "-", "status 'skip'"
        return run
    ok, run.evidence = evaluate(step.rule, result)
    run.mark = "x" if ok else "!"
    if not ok:
        run.hint = result.get("next") or step.on_fail
    return run


def writes_files(step: Step) -> bool:
    """Whether the step's command names a file it writes (``OUTPUT_FLAGS``)."""
    return any(flag in shlex.split(step.run) for flag in OUTPUT_FLAGS)


def run_workflow(root: Path, workflow_id: str, options: dict[str, Any], keep_going: bool,
                 reporter: Reporter, report_dir: str | None = None, write_report: bool = True) -> StepResult:
    """Run a workflow's steps in order; the run_checklist result. The run folder
    (``report_dir``, or a new ./attention-reports/run_checklist-...), created only when
    written, holds the report (unless ``write_report`` is off) and the steps' files.
    Status ``error`` when a step could not run (exit 2), as a bad --model makes every model
    step do."""
    manifest = load_manifest(root)
    workflow = manifest.workflow(workflow_id)
    if options.get("model"):
        from ..models.loading import classify

        classify(options["model"])  # a path that does not exist: refused before any step runs
    folder: Path | None = None
    if write_report or any(writes_files(s) for s in workflow.steps):
        folder = Path(report_dir).expanduser() if report_dir else default_run_folder("run_checklist", workflow.id)
        folder.mkdir(parents=True, exist_ok=True)
    runs: list[StepRun] = []
    stopped = ""
    for i, step in enumerate(workflow.steps, 1):
        argv = command(step, root, options, folder)
        if stopped:
            runs.append(StepRun(step.id, step.title, argv, " ", summary=f"not run: {stopped}"))
            continue
        try:
            with reporter.stage(f"step {i}/{len(workflow.steps)}: {step.title}"):
                run = run_step(step, argv, quiet=reporter.quiet)
        except KeyboardInterrupt:
            runs.append(StepRun(step.id, step.title, argv, "!", summary="interrupted (Ctrl-C)"))
            stopped = "interrupted (Ctrl-C)"
            continue
        runs.append(run)
        if run.mark == "!" and not keep_going:
            stopped = f"stopped at the first failure, step {i}"
    failed = [r for r in runs if r.mark == "!"]
    passed = [r for r in runs if r.mark == "x"]
    skipped = [r for r in runs if r.mark == "-"]
    could_not_run = [r for r in failed if r.status == "error" or r.result is None and r.rc not in (0, 1)]
    checks = [Check(r.id, r.mark in ("x", "-"), r.evidence or r.summary) for r in runs if r.mark != " "]
    status = "error" if stopped.startswith("interrupted") or could_not_run else "fail" if failed else "pass"
    summary = (f"{workflow.title}: {len(passed)} passed, {len(failed)} failed"
               + (f" ({len(could_not_run)} could not run)" if could_not_run else "") + f", {len(skipped)} skipped"
               + (f", {sum(r.mark == ' ' for r in runs)} not run" if stopped else ""))
    nxt = (f"{failed[0].title}: {failed[0].hint}" if failed else
           "every step passed" + (" or was skipped (see why)" if skipped else ""))
    data = ChecklistData(workflow=workflow.id, title=workflow.title, skill_dir=str(root),
                         options={k: v for k, v in options.items() if v not in (None, False)},
                         steps=[r.to_dict() for r in runs], report_dir=str(folder.resolve()) if folder else None)
    result = StepResult("run_checklist", status, summary, checks, data, nxt)
    if write_report and folder is not None:
        write_run_folder(result, folder)
    return result


def listing(root: Path) -> StepResult:
    """Every workflow with its steps and commands (``run_checklist.py --list``)."""
    manifest = load_manifest(root)
    rows = [{"workflow": w.id, "number": i, "title": w.title,
             "steps": [{"id": s.id, "title": s.title, "run": s.run, "takes": s.takes} for s in w.steps]}
            for i, w in enumerate(manifest.workflows, 1)]
    return StepResult("run_checklist", "pass", f"{len(rows)} workflows: " + ", ".join(
        f"{r['number']} {r['workflow']}" for r in rows), [], WorkflowListData(workflows=rows),
        "run_checklist.py WORKFLOW runs one, e.g. run_checklist.py enable")


def _steps_table(d: dict[str, Any]) -> list[Table]:
    """A run of one workflow: each step's mark, title and result."""
    if not d.get("steps"):
        return []
    return [(d.get("title", "checklist"), ["", "step", "result"],
             [[f"[{r['mark']}]", r["title"], r["summary"] + (f" (rule: {r['evidence']})" if r["mark"] == "!"
                                                             and r["evidence"] else "")] for r in d["steps"]])]


def _workflows_table(d: dict[str, Any]) -> list[Table]:
    """The list of workflows (no workflow named): each step's command."""
    if not d.get("workflows"):
        return []
    return [("workflows", ["workflow", "step", "command"],
             [[f"{w['number']} {w['workflow']}" if i == 0 else "", s["title"], s["run"]]
              for w in d["workflows"] for i, s in enumerate(w["steps"])])]


#: How a result of this step is drawn (report.View): the checklist run, or the list of workflows.
VIEW = register_view("run_checklist", Sections((_steps_table, _workflows_table)))
