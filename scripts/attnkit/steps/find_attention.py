"""The find_attention step; ``scripts/find_attention.py``'s docstring says what it reports.

``--source``: ``swap.scan.analyze_path``; ``--model``: ``swap.live.Swapper``, the same facts
per attention-bearing submodule. Nothing of the user's is edited."""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .. import models
from ..env import resolve
from ..measure.timing import forward_fn
from ..measure.verify import verify_sites
from ..report import (CannotRun, Check, StepData, StepResult, default_run_folder, refuse_to_overwrite, said,
                      write_patch, write_run_folder)
from ..swap import switch
from ..swap.live import Swapper
from ..swap.patch import patch_of, patch_root, patched_files, unified_diff
from ..swap.scan import analyze_path, python_files
from .session import autocast_fallback, check_shape

STEP = "find_attention"


@dataclass
class FindOptions:
    """What ``find_attention.py`` takes (see its --help)."""

    source: str | None = None
    model: str | None = None
    batch_size: int = 2
    seq_len: int = 32
    pad_fraction: float | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    write_patch: str | None = None
    report_dir: str | None = None
    write_report: bool = True


@dataclass(kw_only=True)
class FindAttentionData(StepData):
    """``data`` of find_attention: ``sites`` (``swap.scan.site.Site`` / ``swap.live.LiveSite``
    ``to_dict``: where, form, mask, scale, status, why), ``patch`` (unified diff, '' when
    none), ``verified`` (each swap run and checked on the module's own inputs) and
    ``patch_file`` (always present; None until --write-patch writes it)."""

    _BASE_OPTIONAL: ClassVar[frozenset[str]] = StepData._BASE_OPTIONAL - {"patch_file"}

    mode: str = ""
    sites: list[dict[str, Any]] = field(default_factory=list)
    patch: str = ""
    verified: bool = False


@dataclass(kw_only=True)
class FindSourceData(FindAttentionData):
    """``--source PATH``: the resolved ``source`` path and the files that did not parse
    (``unparsed``: 'file: error' lines)."""

    mode: str = "source (not imported)"
    source: str = ""
    unparsed: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class FindModelData(FindAttentionData):
    """``--model SPEC``: the model traced by running it, where and how (``shape``: the
    batch_size and seq_len of the traced inputs)."""

    mode: str = "live model (traced by running)"
    model: str = ""
    model_class: str = ""
    device: str = ""
    dtype: str = ""
    dtype_policy: str | None = None
    shape: dict[str, int] = field(default_factory=dict)


def _summarise(found: list[dict], where: str) -> tuple[str, list[Check], str]:
    hand = [s for s in found if s["kind"] in ("manual", "mha")]
    fast = [s for s in found if s["kind"] in ("sdpa", "flash_attn") or s.get("status") == "fast"]
    ok = [s for s in hand if s.get("status", "swapped" if s.get("swappable") else "kept") == "swapped"]
    kept = [s for s in hand if s not in ok]
    blocked = [s for s in fast if s.get("blockers")]
    parts = [f"{len(hand)} hand-written attention site(s)", f"{len(ok)} swappable", f"{len(fast)} already fused"]
    summary = f"{where}: " + ", ".join(parts)
    checks = [Check("swappable", not kept, "; ".join(f"{s['where']} ({s.get('module_name') or s['function']}): "
                                                     f"{s['reason']}" for s in kept) or
                    f"every hand-written site can be swapped ({len(ok)})")]
    if blocked:
        summary += f"; {len(blocked)} fused call(s) kept off the flash kernel"
    hint = ("run enable_flash.py --model SPEC to swap and measure; --write-patch FILE writes the source change"
            if not kept else "the reasons say what keeps each site from SDPA; the rest can still be swapped")
    return summary, checks, hint


def find_attention(o: FindOptions, reporter: Any) -> StepResult:
    """Run the step. Raises ``CannotRun`` for a missing path, a model that does not load, or
    both --source and --model (neither: the default model)."""
    if o.source and o.model:
        raise CannotRun("pass --source PATH or --model SPEC, not both", "see find_attention.py --help")
    if not o.source and not o.model:
        o.model = models.DEFAULT_MODEL
    refuse_to_overwrite(o.write_patch, "--write-patch")
    if o.source:
        result, patch, name, files = _from_source(o, reporter)
    else:
        result, patch, name, files = _from_model(o, reporter)
    transformers = isinstance(result.data, FindModelData) and not result.data.verified  # traced, not swapped
    write_patch(result, patch, o.write_patch,
                "a transformers model is switched through attn_implementation (enable_flash.py), not by editing its "
                "source" if transformers else "no hand-written attention site can be swapped", patch_root(files))
    if o.write_report:
        write_run_folder(result, Path(o.report_dir) if o.report_dir else default_run_folder(STEP, name),
                         {"swap.patch": patch})
    return result


def _from_source(o: FindOptions, reporter: Any) -> tuple[StepResult, str, str, list[str]]:
    path = Path(o.source).expanduser()
    if not path.exists():
        raise CannotRun(f"source path {o.source} does not exist", "pass a .py file or a folder of them")
    if not path.is_dir() and not (path.is_file() and path.suffix == ".py"):
        raise CannotRun(f"source path {o.source} is not a .py file or a folder", "pass a .py file or a folder of them")
    with reporter.stage(f"reading {o.source}"):
        sites, unparsed = analyze_path(path)
    _refuse_unread(o.source, path, unparsed)
    found = [s.to_dict() for s in sites]
    by_file: dict[str, list] = {}
    for s in sites:
        if s.swappable:
            by_file.setdefault(s.file, []).extend(s.edits)
    patch = unified_diff(by_file)
    summary, checks, hint = _summarise(found, str(o.source))
    data = FindSourceData(source=str(path.resolve()), sites=found, unparsed=unparsed, patch=patch)
    if any("causal_buffer" in s["needs"] for s in found):
        data.notes.append("a causal buffer (self.bias[..., :T, :T] == 0) is assumed lower-triangular here; "
                          "--model checks it on the live module")
    if unparsed:
        summary += f"; {len(unparsed)} file(s) did not parse"
    status = "pass" if all(c.passed for c in checks) else "fail"
    return StepResult(STEP, status, summary, checks, data, hint), patch, path.stem, list(by_file)


def _refuse_unread(shown: str, path: Path, unparsed: list[str]) -> None:
    """Raise ``CannotRun`` when nothing under ``path`` read as Python (a syntax error's line, no
    .py files, all failing), rather than pass "0 sites" for unread source."""
    if path.is_file() and unparsed:
        raise CannotRun(f"source file {shown} cannot be read as Python: {unparsed[0].removeprefix(str(path) + ': ')}",
                        "pass a .py file that Python can read (python -m py_compile FILE says why)")
    if path.is_dir() and not unparsed and not python_files(path):
        raise CannotRun(f"source folder {shown} holds no .py file", "pass a .py file or a folder of them")
    if path.is_dir() and len(unparsed) == len(python_files(path)):
        raise CannotRun(f"none of the {len(unparsed)} .py file(s) under {shown} parses; the first: {unparsed[0]}",
                        "pass a .py file or a folder of them that Python can read")


def _from_model(o: FindOptions, reporter: Any) -> tuple[StepResult, str, str, list[str]]:
    check_shape(o.batch_size, o.seq_len, o.pad_fraction)
    env, device, dtype = resolve(o.device, o.dtype)
    models.classify(o.model)
    with reporter.stage(f"loading {o.model} on {device}"):
        loaded = models.load(o.model, device=device, dtype=dtype, trust_remote_code=o.trust_remote_code)
    inputs = loaded.inputs(o.batch_size, min(o.seq_len, loaded.max_seq_len() or o.seq_len), o.pad_fraction)
    swapper = Swapper(loaded.model, register=not loaded.is_transformers)
    # a transformers model is traced on its own hand-written path (eager), which the switch replaces
    eager = switch.using(loaded.model, "eager") if loaded.is_transformers else contextlib.nullcontext()
    with reporter.stage("running the model and tracing its attention"), eager:
        try:
            try:
                swapper.discover(forward_fn(loaded, inputs))
            except Exception as exc:
                if not autocast_fallback(loaded, exc):  # bf16/fp16 that a plain cast cannot run
                    raise
                inputs = loaded.inputs(inputs.batch_size, inputs.seq_len, o.pad_fraction)
                swapper = Swapper(loaded.model, register=not loaded.is_transformers)
                swapper.discover(forward_fn(loaded, inputs))
        except CannotRun:
            raise
        except Exception as exc:
            raise CannotRun(f"a forward pass of {o.model} raised {said(exc, 200)}",
                            "check that the model runs on its own") from None
    if not swapper.sites:
        raise CannotRun(f"no attention in {o.model}: a forward pass ran no softmax, SDPA or flash-attn op",
                        "there is nothing to swap")
    patch, files = "", []
    if not loaded.is_transformers:
        with reporter.stage("swapping each site and verifying it on the module's own inputs"):
            verify_sites(swapper, loaded, inputs, dtype, "sdpa")
        patch, files = patch_of(swapper), patched_files(swapper)
    found = [s.to_dict() for s in swapper.sites.values()]
    for s in found:
        if loaded.is_transformers and s["status"] == "kept" and not s["reason"]:
            s["status"], s["reason"] = "switch", "a transformers model: enable_flash.py switches it with " \
                                                 "attn_implementation"
    summary, checks, hint = _summarise(
        [{**s, "status": "swapped" if s["status"] == "switch" else s["status"]} for s in found], o.model)
    data = FindModelData(model=o.model, model_class=type(loaded.model).__name__, device=device,
                         dtype=str(dtype).replace("torch.", ""), dtype_policy=loaded.dtype_policy,
                         notes=list(loaded.notes), shape={"batch_size": inputs.batch_size, "seq_len": inputs.seq_len},
                         sites=found, patch=patch, verified=not loaded.is_transformers)
    if loaded.is_transformers:
        hint = "a transformers model: run enable_flash.py --model SPEC to switch it through attn_implementation"
    status = "pass" if all(c.passed for c in checks) else "fail"
    return StepResult(STEP, status, summary, checks, data, hint), patch, loaded.name, files
