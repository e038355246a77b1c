"""Several processes, one measurement: the process group, per-rank figures gathered on rank 0.

A step on N processes (torchrun, or spawned) measures on every rank and reports from rank
0. Nothing here is about attention:

* ``Rank`` and ``join``: the default process group (NCCL on GPUs, gloo on CPU).
* ``gather``, ``agree``, ``barrier``; ``prepare_together``: local allocations that fail on
  every rank together, before any collective.
* ``timed_runs``: the same number of timed runs on every rank, as collectives need (so
  not ``blocked_autorange``'s adaptive count).
* ``profile_call``: kernels and peak memory of one call (CUDA's allocator counters, or the
  CPU profiler's memory events).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..report import CannotRun
from .kernels import attention_kernels, profiled
from .timing import _cpu_peak_mb, is_oom, quartiles, synchronize

#: How long a collective may wait for the other ranks before the run fails (torch's own
#: default for NCCL is 10 minutes; ``init_process_group(timeout=...)``).
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class Rank:
    """This process in a group of ``world_size``: its rank, local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: str  # cuda:LOCAL_RANK or cpu
    backend: str  # nccl or gloo
    launcher: str  # torchrun | spawn | single-process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or another launcher setting RANK and WORLD_SIZE) started."""
    return os.environ.get("RANK") is not None and os.environ.get("WORLD_SIZE") is not None


def env_world_size() -> int:
    """WORLD_SIZE from the launcher, 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A TCP port free on the loopback interface now, for a rendezvous of processes on this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(device_kind: str, *, rank: int | None = None, world_size: int | None = None,
         init_method: str | None = None, launcher: str = "torchrun", local_rank: int | None = None) -> Rank:
    """Join (or make) the default process group: NCCL for 'cuda', gloo for 'cpu'; without
    ``init_method`` from torchrun's environment. Each CUDA rank uses GPU LOCAL_RANK. Raises
    ``CannotRun`` for fewer GPUs than local ranks, or a missing backend."""
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if not dist.is_available():
        raise CannotRun("this torch has no torch.distributed", "install a torch build with distributed support")
    if backend == "nccl" and not dist.is_nccl_available():
        raise CannotRun("this torch has no NCCL backend", "install a CUDA build of torch")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = env_world_size() if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
    device = "cpu"
    if device_kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise CannotRun(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible",
                            "start at most one process per GPU (--nproc-per-node)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": TIMEOUT}
        if init_method is not None:
            kwargs.update(init_method=init_method, rank=rank, world_size=world_size)
        if backend == "nccl":
            kwargs["device_id"] = torch.device(device)
        dist.init_process_group(**kwargs)
    return Rank(dist.get_rank(), dist.get_world_size(), local_rank, device, backend, launcher)


def leave() -> None:
    """Destroy the default process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(rank: Rank) -> None:
    if rank.world_size > 1:
        dist.barrier()


def gather(obj: Any, rank: Rank) -> list[Any] | None:
    """Every rank's ``obj`` (picklable) as a list on rank 0, None on the others."""
    if rank.world_size == 1:
        return [obj]
    out: list[Any] | None = [None] * rank.world_size if rank.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def agree(flag: bool, rank: Rank) -> bool:
    """True on every rank when ``flag`` is True on every rank (an all-reduce of the minimum)."""
    if rank.world_size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=rank.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class PeerOutOfMemory(RuntimeError):
    """Another rank ran out of memory before the collectives began (``is_oom`` reads it as out of memory)."""


def prepare_together(build: Callable[[], Any], rank: Rank, reserve_bytes: int = 0) -> Any:
    """``build()`` (local work, no collectives), then ``reserve_bytes`` allocated and freed
    (kept in torch's caching allocator), then one ``agree`` every rank reaches. Returns
    ``build()``'s result; when any rank ran out of memory, raises on every rank (its own
    error, ``PeerOutOfMemory`` on the others); other errors raise on their rank alone.

    Why: a rank out of memory inside torch's ring leaves the others waiting in NCCL until
    the timeout; before the first collective, all can report it."""
    built, failure = None, None
    try:
        built = build()
        if reserve_bytes > 0 and rank.device.startswith("cuda"):
            torch.empty(reserve_bytes, dtype=torch.uint8, device=rank.device)  # held and freed: now cached
    except Exception as exc:
        if not is_oom(exc):
            raise
        failure = exc
    if not agree(failure is None, rank):
        built = None  # the traceback keeps this frame alive: free what was built before raising
        raise failure or PeerOutOfMemory("another rank ran out of memory before the collectives began")
    return built


@dataclass
class RankRun:
    """One rank's measurement of one call: kernels, memory (MB) and latency (ms)."""

    rank: int
    device: str
    kernels: dict[str, int]
    resident_mb: float | None  # allocated before the call (inputs, tables, weights)
    peak_memory_mb: float | None  # peak allocated during the call, above resident_mb
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None
    runs: int = 0
    error: str | None = None

    @property
    def total_mb(self) -> float | None:
        """The most this rank held at once during the call: resident + peak (MB)."""
        if self.resident_mb is None or self.peak_memory_mb is None:
            return None
        return self.resident_mb + self.peak_memory_mb

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_mb": self.total_mb}


def profile_call(run: Callable[[], Any], rank: Rank, resident_mb: float | None = None,
                 exclude_mb: float = 0.0) -> tuple[RankRun, Any]:
    """Run ``run()`` once under torch.profiler: (``RankRun`` with attention ops and peak MB,
    output). Resident memory: on CUDA the allocator's before the call less ``exclude_mb``;
    on CPU (no counter) the caller's ``resident_mb``."""
    device = rank.device
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        resident_mb = resident / 2**20 - exclude_mb
    with profiled(device, memory=not device.startswith("cuda")) as prof:
        out = run()
        synchronize(device)
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
    else:
        peak = _cpu_peak_mb(prof)
    counts = attention_kernels(prof.events())
    return RankRun(rank.rank, device, dict(sorted(counts.items())), resident_mb, peak), out


def timed_runs(run: Callable[[], Any], rank: Rank, reps: int, together: bool = True) -> tuple[float, float | None, int]:
    """(median ms, IQR ms or None under 4 runs, count) of ``reps`` runs, each by
    ``Timer.timeit(1)`` (synchronises CUDA); with ``together`` after a barrier (for runs
    with collectives; not for a rank's own 1-device run, which another rank may skip)."""
    import torch.utils.benchmark as benchmark

    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    times = []
    for _ in range(reps):
        if together:
            barrier(rank)
        times.append(timer.timeit(1).median * 1e3)
    q1, median, q3 = quartiles(times)
    return median, q3 - q1 if len(times) >= 4 else None, len(times)
