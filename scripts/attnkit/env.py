"""What this machine is: torch, CUDA, GPUs and their capability, SDPA's kernels, packages.

The ground layer: ``environment()`` gathers the facts once; each backend's needs live in
``attnkit.backends``. Packages are found by pip distribution and probed by import,
keeping the exact exception (flash-attn's ``benchmark_flash_attention.py`` habit).
``parse_dtype`` and ``resolve_device`` read ``--dtype`` and ``--device``. Whether an SDPA
kernel runs on this GPU is asked of torch (``torch.backends.cuda.can_use_flash_attention``
and friends, on a small bf16 probe), not read from a table that would go stale.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .report import OptionError, one_line

#: SDPA's FlashAttention-2 kernel arrived in PyTorch 2.2 (its release notes, Jan 2024);
#: ``torch.nn.attention.sdpa_kernel`` (replacing ``torch.backends.cuda.sdp_kernel``) came with
#: pytorch/pytorch PR #114689, merged 2024-01-24 after the 2.2 branch cut: in 2.3 and later.
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


def distribution_version(name: str) -> str | None:
    """The installed version of pip distribution ``name``, or None. Not an import: ``flash-attn-4``
    ships only ``flash_attn/cute/``, so ``import flash_attn`` succeeds without FlashAttention-2."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def explain_import_error(module: str, exc: BaseException, install: str = "", distribution: str = "") -> str:
    """What an import failure of ``module`` means, in one sentence; ``install``: the command for
    a missing package; ``distribution``: the pip name to reinstall (default: ``module``)."""
    text = f"{type(exc).__name__}: {exc}"
    dist = distribution or module
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == module.split(".")[0]:
        return f"not installed: {install or 'pip install ' + dist}"
    if "undefined symbol" in text:
        return (f"installed but built against another torch or CUDA than this one (torch {torch.__version__}); "
                f"the compiled extension does not match: rebuild it for this torch "
                f"(pip install --force-reinstall --no-build-isolation --no-cache-dir {dist})")
    if "cannot open shared object file" in text or "libcudart" in text or "libc10_cuda" in text:
        return (f"installed but its CUDA libraries cannot be loaded; this torch is {torch.__version__} "
                f"(CUDA {torch.version.cuda or 'none: a CPU-only build'}); it needs a CUDA build of torch and a GPU")
    if "no kernel image" in text or "sm_" in text or "Ampere" in text:
        return "installed but not built for this GPU: FlashAttention-2 needs Ampere (sm80) or newer"
    return f"installed but its import fails ({text}); reinstall it for this torch and CUDA"


def probe_package(module: str, distributions: tuple[str, ...] = (), install: str = "") -> PackageProbe:
    """Import ``module`` and report its version or the exact error and what it means. The
    first installed of ``distributions`` (default: ``module``) is reported beside it.
    Never raises."""
    distribution = None
    for dist in distributions or (module,):
        version = distribution_version(dist)
        if version is not None:
            distribution = f"{dist} {version}"
            break
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, OSError from a missing .so, RuntimeError from CUDA init
        return PackageProbe(module, False, None, distribution, f"{type(exc).__name__}: {exc}",
                            explain_import_error(module, exc, install, (distributions or (module,))[0]))
    version = (distribution.split(" ", 1)[1] if distribution else None) or getattr(mod, "__version__", None)
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
    """Every fact ``check_env`` reports: its fields open the step's ``data``
    (``steps.check_env.CheckEnvData``), under the same names; ``to_dict`` is their JSON form."""

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
        d["transformers"] = self.transformers.to_dict() if self.transformers else None
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
                reasons[name] = one_line("; ".join(str(w.message) for w in caught), 400)
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
    """Gather the facts of this machine. Never raises for a missing package."""
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
        transformers=probe_package("transformers"),
    )


# --- --dtype and --device

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16."""
    return str(dtype).replace("torch.", "")


def parse_dtype(text: str, env: Environment, device: str) -> torch.dtype:
    """``auto`` (bf16 on sm80+ GPUs, fp16 on older GPUs, fp32 on CPU) or a dtype name.

    Raises ``OptionError`` for an unknown name.
    """
    if text == "auto":
        return env.default_dtype(device)
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise OptionError("dtype", "unknown {dtype} {value!r}; choose auto, float32, bfloat16 or float16",
                          "bfloat16 on Ampere-or-newer GPUs, float32 on CPU", value=text) from None


def resolve_device(text: str, env: Environment) -> str:
    """``auto`` (cuda when a GPU is visible), ``cpu``, ``cuda`` or ``cuda:N``. Raises
    ``OptionError`` when the device does not exist here."""
    if text == "auto":
        return env.default_device()
    if text == "cpu":
        return "cpu"
    if text == "cuda" or text.startswith("cuda:"):
        if not env.cuda_available:
            raise OptionError("device", "{device} {value}: no CUDA GPU is visible to torch {torch} (CUDA build: "
                              "{cuda})", "use {device} cpu", value=text, torch=env.torch_version,
                              cuda=env.cuda_version or "none, a CPU-only build")
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= len(env.gpus):
            raise OptionError("device", "{device} {value}: only {n} GPU(s) visible", "use {device} cuda:0",
                              value=text, n=len(env.gpus))
        return text
    raise OptionError("device", "unknown {device} {value!r}; choose auto, cpu, cuda or cuda:N", value=text)


def resolve(device: str, dtype: str, env: Environment | None = None) -> tuple[Environment, str, torch.dtype]:
    """(environment, device, dtype) for ``--device`` and ``--dtype``; see ``resolve_device``
    and ``parse_dtype`` for what they raise."""
    env = env or environment()
    dev = resolve_device(device, env)
    return env, dev, parse_dtype(dtype, env, dev)
