"""What this machine can run: torch, CUDA, GPUs, SDPA kernels, flash-attn, transformers.

``environment()`` gathers the facts once; ``check_env_step()`` turns them into the
``check_env`` step's result. Optional packages are probed by importing them and keeping
the exact exception (flash-attn's ``benchmark_flash_attention.py`` habit): a missing or
broken ``flash_attn`` is a fact with a reason, never a crash.

Whether an SDPA kernel can run on this GPU is asked of torch itself
(``torch.backends.cuda.can_use_flash_attention`` and friends, on a small bf16 probe), not
decided from a table of compute capabilities that would go stale.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .report import CannotRun, Check, StepResult

#: SDPA's FlashAttention-2 kernel arrived in PyTorch 2.2 ("scaled_dot_product_attention
#: (SDPA) now supports FlashAttention-2", PyTorch 2.2 release notes, Jan 2024). The
#: ``torch.nn.attention.sdpa_kernel`` context manager that replaced the deprecated
#: ``torch.backends.cuda.sdp_kernel`` came with pytorch/pytorch PR #114689 (merged
#: 2024-01-24, after the 2.2 branch cut), so it is in 2.3 and later.
MIN_TORCH_FOR_SDPA = (2, 2)

#: Marketing names of NVIDIA compute capabilities (CUDA C Programming Guide, "Compute
#: Capabilities"), used only to explain a capability in words.
ARCHITECTURES = {7: "Volta/Turing", 8: "Ampere/Ada", 9: "Hopper", 10: "Blackwell", 12: "Blackwell"}


def architecture(capability: tuple[int, int]) -> str:
    """A readable name for a compute capability, e.g. (9, 0) -> 'Hopper (sm90)'."""
    major, minor = capability
    name = {(7, 0): "Volta", (7, 5): "Turing", (8, 9): "Ada"}.get((major, minor), ARCHITECTURES.get(major, "unknown"))
    return f"{name} (sm{major}{minor})"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@dataclass
class PackageProbe:
    """The result of importing an optional package, e.g. ``flash_attn``."""

    module: str
    importable: bool
    version: str | None = None
    distribution: str | None = None  # the pip distribution found, even when the import fails
    error: str | None = None  # the exact exception, "Type: message"
    meaning: str | None = None  # what the error means and what to do

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: pip distribution names that provide each module (flash-attn 2 and FlashAttention-3's
#: separate Hopper build, which installs the top-level module ``flash_attn_interface``).
DISTRIBUTIONS = {"flash_attn": ("flash-attn", "flash_attn"), "flash_attn_interface": ("flash-attn-3", "flash_attn_3")}

INSTALL_HINTS = {
    "flash_attn": "pip install flash-attn --no-build-isolation (builds from source: needs the CUDA toolkit, "
                  "a CUDA build of torch and an Ampere-or-newer GPU; or pip install '.[flash]')",
    "flash_attn_interface": "build FlashAttention-3 from the flash-attention repository's hopper/ folder "
                            "(cd hopper && python setup.py install); it needs an sm90 (Hopper) GPU and CUDA 12.3+",
}


def explain_import_error(module: str, exc: BaseException) -> str:
    """What an import failure of ``module`` means, from its exception (one sentence)."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == module:
        return f"not installed: {INSTALL_HINTS.get(module, 'pip install ' + module)}"
    if "undefined symbol" in text:
        return (f"installed but built against another torch or CUDA than this one (torch {torch.__version__}); "
                f"the compiled extension does not match: rebuild it for this torch "
                f"(pip install --force-reinstall --no-build-isolation --no-cache-dir {DISTRIBUTIONS.get(module, (module,))[0]})")
    if "cannot open shared object file" in text or "libcudart" in text or "libc10_cuda" in text:
        return (f"installed but its CUDA libraries cannot be loaded; this torch is {torch.__version__} "
                f"(CUDA {torch.version.cuda or 'none: a CPU-only build'}); it needs a CUDA build of torch and a GPU")
    if "no kernel image" in text or "sm_" in text or "Ampere" in text:
        return "installed but not built for this GPU: FlashAttention-2 needs Ampere (sm80) or newer"
    return f"installed but its import fails ({text}); reinstall it for this torch and CUDA"


def probe_package(module: str) -> PackageProbe:
    """Import ``module`` and report version or the exact error and its meaning. Never raises."""
    distribution = None
    for dist in DISTRIBUTIONS.get(module, (module,)):
        try:
            distribution = f"{dist} {importlib.metadata.version(dist)}"
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, OSError from a missing .so, RuntimeError from CUDA init
        return PackageProbe(module, False, None, distribution, f"{type(exc).__name__}: {exc}",
                            explain_import_error(module, exc))
    version = getattr(mod, "__version__", None) or (distribution.split(" ", 1)[1] if distribution else None)
    return PackageProbe(module, True, version, distribution)


@dataclass
class Kernel:
    """One SDPA kernel: compiled into this torch, enabled by the global flags, usable here."""

    name: str
    compiled: bool
    enabled: bool
    usable: bool | None  # None: not asked (no GPU); else torch's own can_use_* answer
    reason: str = ""


@dataclass
class Gpu:
    index: int
    name: str
    capability: str  # "9.0"
    architecture: str  # "Hopper (sm90)"
    memory_mb: float


@dataclass
class Environment:
    """Every fact ``check_env`` reports; ``to_dict`` is the step's ``data``."""

    python: str
    platform: str
    torch_version: str
    torch_sdpa_ok: bool
    cuda_available: bool
    cuda_version: str | None
    cpu_capability: str
    cpu_threads: int
    gpus: list[Gpu] = field(default_factory=list)
    sdpa_kernels: dict[str, list[Kernel]] = field(default_factory=dict)  # device -> kernels
    flash_attn: PackageProbe | None = None
    flash_attn_interface: PackageProbe | None = None
    transformers: PackageProbe | None = None

    @property
    def capability(self) -> tuple[int, int] | None:
        """Compute capability of GPU 0, or None without a GPU."""
        if not self.gpus:
            return None
        major, minor = self.gpus[0].capability.split(".")
        return int(major), int(minor)

    def default_device(self) -> str:
        return "cuda" if self.cuda_available else "cpu"

    def default_dtype(self, device: str) -> torch.dtype:
        """bf16 on GPUs that have it (sm80+), fp16 on older GPUs, fp32 on CPU."""
        if device.startswith("cuda"):
            cap = self.capability or (0, 0)
            return torch.bfloat16 if cap >= (8, 0) else torch.float16
        return torch.float32

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("flash_attn", "flash_attn_interface", "transformers"):
            d[key] = getattr(self, key).to_dict() if getattr(self, key) else None
        return d


def _cuda_kernels() -> list[Kernel]:
    """SDPA's CUDA kernels, each asked of torch on a [1, 8, 128, 64] bf16 causal probe."""
    bc = torch.backends.cuda
    compiled = {
        "flash": bool(getattr(bc, "is_flash_attention_available", lambda: torch.version.cuda is not None)()),
        "efficient": torch.version.cuda is not None or torch.version.hip is not None,
        "cudnn": torch.backends.cudnn.is_available() and torch.version.cuda is not None,
        "math": True,
    }
    enabled = {"flash": bc.flash_sdp_enabled(), "efficient": bc.mem_efficient_sdp_enabled(),
               "cudnn": bc.cudnn_sdp_enabled(), "math": bc.math_sdp_enabled()}
    askers = {"flash": getattr(bc, "can_use_flash_attention", None),
              "efficient": getattr(bc, "can_use_efficient_attention", None),
              "cudnn": getattr(bc, "can_use_cudnn_attention", None)}
    kernels = []
    usable: dict[str, bool | None] = {k: None for k in compiled}
    reasons: dict[str, str] = {k: "" for k in compiled}
    if torch.cuda.is_available():
        q = torch.randn(1, 8, 128, 64, device="cuda", dtype=torch.bfloat16)  # [B, H, S, D]
        params = bc.SDPAParams(q, q, q, None, 0.0, True, False)
        for name, ask in askers.items():
            if ask is None:
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    usable[name] = bool(ask(params, True))
                except Exception as exc:  # an old torch without this kernel's checker
                    usable[name], reasons[name] = False, f"{type(exc).__name__}: {exc}"
            if not usable[name] and caught:
                reasons[name] = "; ".join(" ".join(str(w.message).split()) for w in caught)[:400]
        usable["math"] = True
    for name in ("flash", "efficient", "cudnn", "math"):
        kernels.append(Kernel(name, compiled[name], enabled[name], usable[name], reasons[name]))
    return kernels


def _cpu_kernels() -> list[Kernel]:
    """SDPA's CPU kernels: the fused flash kernel for CPU, and math."""
    fused = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    return [Kernel("flash", fused, True, fused, "" if fused else "this torch has no fused CPU kernel"),
            Kernel("math", True, True, True)]


def environment() -> Environment:
    """Gather the facts of this machine. Imports optional packages; never raises for them."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cap = (props.major, props.minor)
            gpus.append(Gpu(i, props.name, f"{cap[0]}.{cap[1]}", architecture(cap), props.total_memory / 2**20))
    kernels = {"cpu": _cpu_kernels()}
    if torch.version.cuda is not None or torch.cuda.is_available():
        kernels["cuda"] = _cuda_kernels()
    return Environment(
        python=platform.python_version(),
        platform=platform.platform(),
        torch_version=torch.__version__,
        torch_sdpa_ok=_version_tuple(torch.__version__)[:2] >= MIN_TORCH_FOR_SDPA,
        cuda_available=torch.cuda.is_available(),
        cuda_version=torch.version.cuda,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_threads=torch.get_num_threads(),
        gpus=gpus,
        sdpa_kernels=kernels,
        flash_attn=probe_package("flash_attn"),
        flash_attn_interface=probe_package("flash_attn_interface"),
        transformers=probe_package("transformers"),
    )


# ----------------------------------------------------------------------------- the step

#: What ``check_env --require`` accepts, and what each requirement means.
REQUIREMENTS = {
    "sdpa": "torch >= 2.2 with a fused SDPA kernel on the chosen device",
    "cuda": "a CUDA GPU visible to torch",
    "flash_attn": "the flash-attn package imports (FlashAttention-2) on an Ampere-or-newer GPU",
    "flash_attn_interface": "FlashAttention-3 (module flash_attn_interface) imports",
    "sm80": "GPU 0 is Ampere (sm80) or newer",
    "sm90": "GPU 0 is Hopper (sm90), which FlashAttention-3 and its FP8 path need",
}


def _requirement_check(name: str, env: Environment, device: str) -> Check:
    cap = env.capability
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
    probe = getattr(env, name)
    if not probe.importable:
        return Check(name, False, f"{probe.error} -> {probe.meaning}")
    if name == "flash_attn" and cap is not None and cap < (8, 0):
        return Check(name, False, f"flash_attn {probe.version} imports, but GPU 0 is {architecture(cap)}: "
                                  "FlashAttention-2 needs Ampere (sm80) or newer")
    if not env.cuda_available:
        return Check(name, False, f"{name} {probe.version} imports, but no CUDA GPU is visible")
    return Check(name, True, f"{name} {probe.version} imports")


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
    for probe in (env.flash_attn, env.flash_attn_interface, env.transformers):
        if probe.importable:
            rows.append((probe.module, f"{probe.version} imports"))
        else:
            rows.append((probe.module, f"{probe.error} -> {probe.meaning}"))
    return [{"name": n, "value": v} for n, v in rows]


def check_env_step(require: list[str] | None = None, device: str = "auto", dtype: str = "auto") -> StepResult:
    """The ``check_env`` step: facts, the recommended backend, and the requested checks.

    ``require`` names entries of ``REQUIREMENTS`` (default: ``["sdpa"]``); the step passes
    when each holds. Raises ``CannotRun`` for an unknown requirement, device or dtype.
    """
    from .backends import choose, parse_dtype, resolve_device

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
    data = env.to_dict()
    data["device"] = dev
    data["dtype"] = str(dt).replace("torch.", "")
    data["facts"] = facts(env)
    data["recommendation"] = {"backend": choice.backend, "why": choice.why,
                              "rejected": [r.to_dict() for r in choice.rejected]}
    data["rejected"] = [r.to_dict() for r in choice.rejected]
    data["required"] = {r: REQUIREMENTS[r] for r in require}
    ok = all(c.passed for c in checks)
    failed = [c for c in checks if not c.passed]
    summary = (f"{'ready' if ok else 'not ready'}: torch {env.torch_version}, {dev} {data['dtype']}; "
               f"recommended backend: {choice.backend}")
    if failed:
        summary += "; missing: " + ", ".join(c.name for c in failed)
    hint = ("run enable_flash.py --model SPEC to switch and verify" if ok else
            " ".join(f"{c.name}: {c.evidence}." for c in failed))
    return StepResult("check_env", "pass" if ok else "fail", summary, checks, data, hint)
