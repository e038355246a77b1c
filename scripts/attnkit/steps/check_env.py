"""The check_env step: can this machine run fused attention, and which backend would it use?

Machine facts come from ``env``; every fact about a backend (installed, importable, the
GPUs it needs, why ``auto`` would not take it) from the backend registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ..backends import (BACKENDS, FLASH_ATTENTION_BACKENDS, Availability, Fp8Availability, choose, fp8_availability,
                        library_status)
from ..backends.probe import torch_fa4_bridge
from ..env import (MIN_TORCH_FOR_SDPA, Environment, architecture, environment, parse_dtype,
                   resolve_device)
from ..report import CannotRun, Check, Sections, StepData, StepResult, Table, register_view, rejected_part

#: ``--require`` names that ask for a FlashAttention library -> its backend (module names, as
#: earlier versions took them, and the backend names).
REQUIRED_BACKEND = {"flash_attn": "flash_attention_2", "flash_attn_interface": "flash_attention_3",
                    **{name: name for name in FLASH_ATTENTION_BACKENDS}}


#: What ``check_env --require`` accepts, and what each requirement means.
REQUIREMENTS = {
    "sdpa": "torch >= 2.2 with a fused SDPA kernel on the chosen device",
    "cuda": "a CUDA GPU visible to torch",
    "flash_attn": "the flash-attn package imports (FlashAttention-2) on an Ampere-or-newer GPU",
    "flash_attn_interface": "FlashAttention-3 (module flash_attn_interface) imports",
    "flash_attention_2": "FlashAttention-2 (pip distribution flash-attn) is installed and usable on GPU 0",
    "flash_attention_3": "FlashAttention-3 (flash-attn-3, module flash_attn_interface) is installed and usable on GPU 0",
    "flash_attention_4": "FlashAttention-4 (flash-attn-4, module flash_attn.cute) is installed and usable on GPU 0 "
                         "(sm90 or sm100)",
    "sm80": "GPU 0 is Ampere (sm80) or newer",
    "sm90": "GPU 0 is Hopper (sm90), which FlashAttention-3 and its FP8 path need",
    "fp8": "the fp8 backend can run: cuDNN's FP8 attention (nvidia-cudnn-frontend) on an sm90 or sm100 GPU",
}


def flash_attention(env: Environment) -> list[dict]:
    """One entry per FlashAttention version (``backends.library_status``): the pip
    distribution, installed, version, usable here, and the reason."""
    return [library_status(name, env) for name in FLASH_ATTENTION_BACKENDS]


# --- FP8 attention paths

def fp8_check(paths: list[Fp8Availability]) -> Check:
    """``--require fp8``: the path the ``fp8`` backend runs on (cuDNN) is usable; the evidence
    gives every path's state."""
    cudnn = next(p for p in paths if p.path == "cudnn")
    others = "; ".join(f"{p.path}: {_state(p)}" for p in paths if p is not cudnn)
    head = (f"cudnn (nvidia-cudnn-frontend {cudnn.version}) is usable" if cudnn.usable else
            f"cudnn: {cudnn.reason}")
    return Check("fp8", cudnn.usable, f"{head}; other FP8 paths: {others}")


def _state(p: Fp8Availability) -> str:
    if p.usable:
        return f"{p.distribution} {p.version}, usable"
    return "not installed" if not p.installed else f"{p.distribution} {p.version}: {p.reason.split(' [')[0]}"


def _requirement_check(name: str, env: Environment, device: str) -> Check:
    cap = env.capability
    if name == "fp8":
        return fp8_check(fp8_availability(env))
    if name == "sdpa":
        fused = [k.name for k in env.sdpa_kernels.get("cuda" if device.startswith("cuda") else "cpu", [])
                 if k.name != "math" and k.compiled and k.enabled and k.usable is not False]
        ok = env.torch_sdpa_ok and bool(fused)
        return Check("sdpa", ok, f"torch {env.torch_version}; fused SDPA kernels on {device}: "
                                 f"{', '.join(fused) or 'none'}" + ("" if env.torch_sdpa_ok else
                                 f"; torch < {'.'.join(map(str, MIN_TORCH_FOR_SDPA))} has no FlashAttention-2 kernel in SDPA"))
    if name == "cuda":
        return Check("cuda", env.cuda_available, f"torch.cuda.is_available() = {env.cuda_available} "
                                                 f"(torch CUDA build: {env.cuda_version or 'none, CPU-only'})")
    if name in ("sm80", "sm90"):
        need = (8, 0) if name == "sm80" else (9, 0)
        if cap is None:
            return Check(name, False, "no CUDA GPU visible")
        ok = cap >= need if name == "sm80" else cap[0] == 9
        return Check(name, ok, f"GPU 0 {env.gpus[0].name} is {architecture(cap)}")
    status = library_status(REQUIRED_BACKEND[name], env)
    version = f" {status['version']}" if status["version"] else ""
    return Check(name, status["usable"], f"{status['distribution']}{version}: {status['reason']}")


def facts(env: Environment) -> list[dict[str, str]]:
    """The environment as (name, value) rows for people."""
    rows = [("python", f"{env.python} on {env.platform}"),
            ("torch", f"{env.torch_version}" + ("" if env.torch_sdpa_ok else " (too old for SDPA's fused kernels: needs 2.2+)")),
            ("CUDA", f"available, CUDA {env.cuda_version}" if env.cuda_available else
             f"not available (torch CUDA build: {env.cuda_version or 'none, CPU-only'})"),
            ("CPU", f"{env.cpu_capability}, {env.cpu_threads} threads")]
    for g in env.gpus:
        rows.append((f"GPU {g.index}", f"{g.name}, compute capability {g.capability} = {g.architecture}, {g.memory_mb:.0f} MB"))
    for device, kernels in env.sdpa_kernels.items():
        parts = []
        for k in kernels:
            state = "compiled" if k.compiled else "not compiled"
            state += ", enabled" if k.enabled else ", disabled"
            if k.usable is not None:
                state += ", usable here" if k.usable else f", not usable here ({k.reason or 'unsupported'})"
            parts.append(f"{k.name}: {state}")
        rows.append((f"SDPA kernels ({device})", "; ".join(parts)))
    for status in flash_attention(env):
        module = BACKENDS[status["backend"]].module
        version = f" {status['version']}" if status["version"] else ""
        rows.append((module, f"{status['distribution']}{version}: {'usable' if status['usable'] else 'not usable'}; "
                             f"{status['reason']}"))
    bridge = torch_fa4_bridge()
    if bridge["present"]:
        rows.append(("torch FA4 bridge", ("usable: " if bridge["compatible"] else "not usable: " if
                                          bridge["compatible"] is False else "") + bridge["reason"]))
    found = env.transformers
    rows.append((found.module, f"{found.version} imports" if found.importable else f"{found.error} -> {found.meaning}"))
    return [{"name": n, "value": v} for n, v in rows]


@dataclass(kw_only=True)
class CheckEnvData(StepData, Environment):
    """``data`` of check_env: ``env.Environment``'s fields (GPU memory in MB), then
    ``flash_attn`` (``backends.library_status`` per version), ``torch_fa4_bridge``, the
    recommendation's ``device`` and ``dtype``, ``fp8`` (each FP8 library, usable or why not),
    ``facts`` ((name, value) rows), ``recommendation`` (``auto``'s pick, why, why not each
    other; also ``rejected``), ``required`` (each ``--require``). No ``notes``, ``report_dir``."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"notes", "report_dir"})

    notes: list[str] | None = None
    flash_attn: list[dict[str, Any]] = field(default_factory=list)
    torch_fa4_bridge: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    dtype: str = ""
    fp8: list[Fp8Availability] = field(default_factory=list)
    facts: list[dict[str, str]] = field(default_factory=list)
    recommendation: dict[str, Any] = field(default_factory=dict)
    rejected: list[Availability] = field(default_factory=list)
    required: dict[str, str] = field(default_factory=dict)


def check_env_step(require: list[str] | None = None, device: str = "auto", dtype: str = "auto") -> StepResult:
    """Facts, the recommended backend, and the checks ``require`` names (``REQUIREMENTS``;
    default ``["sdpa"]``), passing when each holds. Raises ``CannotRun`` for an unknown
    requirement, device or dtype."""
    require = list(require or ["sdpa"])
    unknown = [r for r in require if r not in REQUIREMENTS]
    if unknown:
        raise CannotRun(f"unknown requirement {', '.join(unknown)}; choose from {', '.join(REQUIREMENTS)}",
                        "run check_env.py --help for the list")
    env = environment()
    dev = resolve_device(device, env)
    dt = parse_dtype(dtype, env, dev)
    checks = [_requirement_check(r, env, dev) for r in require]
    choice = choose("auto", env=env, device=dev, dtype=dt, model=None)
    paths = fp8_availability(env)
    data = CheckEnvData(
        **{f.name: getattr(env, f.name) for f in fields(Environment)}, flash_attn=flash_attention(env),
        torch_fa4_bridge=torch_fa4_bridge(), device=dev, dtype=str(dt).replace("torch.", ""), fp8=paths,
        facts=facts(env) + [{"name": "FP8 attention", "value": "; ".join(f"{p.path}: {_state(p)}" for p in paths)}],
        recommendation={"backend": choice.backend, "why": choice.why,
                        "rejected": [r.to_dict() for r in choice.rejected]},
        rejected=list(choice.rejected), required={r: REQUIREMENTS[r] for r in require})
    ok = all(c.passed for c in checks)
    failed = [c for c in checks if not c.passed]
    summary = (f"{'ready' if ok else 'not ready'}: torch {env.torch_version}, {dev} {data.dtype}; "
               f"recommended backend: {choice.backend}")
    if failed:
        summary += "; missing: " + ", ".join(c.name for c in failed)
    hint = ("run enable_flash.py --model SPEC to switch and verify" if ok else
            " ".join(f"{c.name}: {c.evidence}." for c in failed))
    return StepResult("check_env", "pass" if ok else "fail", summary, checks, data, hint)


def _facts_table(d: dict[str, Any]) -> list[Table]:
    return [("environment", ["fact", "value"], [[f["name"], f["value"]] for f in d["facts"]])] if d.get("facts") else []


#: How a result of this step is drawn (report.View): the facts, and the backends auto would not start from.
VIEW = register_view("check_env", Sections((_facts_table, rejected_part)))
