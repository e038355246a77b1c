"""Context parallelism: attention (or a causal LM) with the sequence sharded across N processes.

``context_parallel(options, reporter)`` is what ``scripts/context_parallel.py`` calls:

* under ``torchrun --nproc-per-node=N`` every process runs it on its own GPU (NCCL; gloo
  on CPU); rank 0 prints the result, the others nothing, exiting with rank 0's code;
* plain ``python`` on a GPU: world size 1 (the 1-GPU baseline of the same path), or
  ``--nproc N`` spawned processes;
* on CPU: ``--nproc`` (default 2) spawned gloo processes checking the ring's logic.

Each rank: (1) builds the same workload (seed 0) and runs plain SDPA over the whole
sequence: the 1-device baseline; (2) runs it sharded (``sharded_attention`` on GPUs,
``ring_attention`` on CPU) on ``--heads-per-call`` heads per ring call, profiled once
(SDPA kernel, peak memory) and ``--reps`` times timed, and gathers the output; (3) sends its
figures to rank 0, which judges the gathered output against float64 at sampled rows
(``measure.accuracy.compare``) and reports kernels, memory, latency and the scaling
efficiency T_1 / (N x T_N); (4) with ``--max-seq-len-search CAP``, finds the longest
sequence up to CAP that runs, on one device and sharded.

The API's limits (``measure.context_parallel.problems``) are checked first: one line, exit 2.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .. import models
from ..env import dtype_name, resolve
from ..measure import accuracy as acc_mod
from ..measure import context_parallel as cp
from ..measure import distributed as dd
from ..measure.flops import attention_flops
from ..measure.kernels import SDPA_OPS
from ..measure.timing import cap_cuda_memory, free_memory, oom_caught, search_longest
from ..report import (CannotRun, Check, OptionError, Reporter, Sections, StepData, StepResult, accuracy_part,
                      fmt_mb, fmt_ms, register_view, said)
from ..swap import switch
from . import flag

STEP = "context_parallel"
FLASH_IMPLS = cp.FLASH_IMPLS  # --flash-impl's choices, for the script (which imports steps only)

#: Heads per ring call when --heads-per-call is not given: one, the least memory per rank.
#: Measured on 2 H200s (S 131072, H 32, bf16, references/context-parallel.md): per-rank
#: memory 0.55x one GPU's with 1 head per call, 0.91x with 8, 2.01x with all 32; latency
#: 133.4 ms vs 126.9 ms with all heads in one call.
DEFAULT_HEADS_PER_CALL = 1

#: Default sequence length: the issue's 128K-token context on GPUs; a quick check on CPU.
DEFAULT_SEQ_LEN = {"cuda": 131072, "cpu": 512}

#: The ops that prove ring attention ran on a rank: the SDPA kernels the ring calls.
RING_OPS = {"cuda": tuple(op for op, k in SDPA_OPS.items() if k in cp.CP_KERNELS),
            "cpu": ("aten::_scaled_dot_product_flash_attention_for_cpu",)}


@dataclass
class CPOptions:
    """What ``context_parallel.py`` takes (see its --help). Shapes: q [B, H, S, D], k/v [B, H, S_kv, D]."""

    seq_len: int | None = None
    kv_len: int | None = None
    batch_size: int = 1
    heads: int = 32
    head_dim: int = 128
    dtype: str = "auto"
    device: str = "auto"
    causal: bool = True
    load_balance: bool | None = None
    rotate: str = "allgather"
    merge_dtype: str = "float32"
    heads_per_call: int | None = None  # None: DEFAULT_HEADS_PER_CALL
    sdpa_kernels: list[str] | None = None
    attn_mask: bool = False
    model: str | None = None
    trust_remote_code: bool = False
    reps: int = 5
    check_rows: int = 1024
    max_seq_len_search: int | None = None
    memory_limit: float | None = None  # GB per rank (CUDA)
    flash_impl: str | None = None
    nproc: int | None = None
    json: bool = False
    quiet: bool = False


@dataclass
class Plan:
    """The options resolved for this machine and launch, the same on every rank."""

    o: CPOptions
    device_kind: str  # cuda | cpu
    dtype: torch.dtype
    world_size: int
    launcher: str
    seq_len: int
    kv_len: int
    load_balance: bool
    sdpa_kernels: list[str] | None
    heads_per_call: int  # heads per ring call (bare attention); == heads: one call
    notes: list[str]

    @property
    def ring_calls(self) -> int:
        """Ring calls per attention call: ceil(heads / heads_per_call)."""
        return -(-self.o.heads // self.heads_per_call)


@dataclass(kw_only=True)
class ContextParallelData(StepData):
    """``data`` of rank 0's result. ``single_device``: the 1-device ``distributed.RankRun.to_dict``
    (kernels, ``resident_mb``, ``peak_memory_mb``, ``total_mb`` in MB, ``latency_ms``) or its
    ``error``; ``ranks``: the same per rank, sharded. ``latency_ms``: the slowest rank's median;
    ``speedup`` = 1-device latency / ``latency_ms``; ``scaling_efficiency`` = speedup / world
    size; ``memory_per_rank_mb``: the largest ``total_mb``; ``memory_ratio`` = that / 1-device
    ``total_mb``; each None when not measured. ``accuracy``: ``measure.accuracy.Accuracy``.
    ``tflops``, ``heads_per_call``, ``ring_calls``: bare attention only. Some runs only:
    ``max_seq_len`` (``_search``), ``memory_explained``, ``cpu_public_api``. No ``report_dir``."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset(
        {"report_dir", "max_seq_len", "memory_explained", "cpu_public_api"})

    mode: str = "attention"  # attention | model
    path: str = ""
    launcher: str = ""
    world_size: int = 1
    backend: str = ""
    device: str = ""
    dtype: str = ""
    model: str | None = None
    shape: dict[str, int] = field(default_factory=dict)
    attention: dict[str, Any] | None = None
    causal: bool = True
    load_balance: bool = False
    rotate: str = "allgather"
    merge_dtype: str = "float32"
    heads_per_call: int | None = None
    ring_calls: int | None = None
    sdpa_kernels_allowed: list[str] | None = None
    flash_impl: str | None = None
    limits: list[dict[str, str]] = field(default_factory=list)
    single_device: dict[str, Any] = field(default_factory=dict)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: float | None = None
    speedup: float | None = None
    scaling_efficiency: float | None = None
    memory_per_rank_mb: float | None = None
    memory_ratio: float | None = None
    tflops: float | None = None
    accuracy: acc_mod.Accuracy | None = None
    versions: dict[str, str] = field(default_factory=dict)
    max_seq_len: dict[str, Any] | None = None
    memory_explained: str | None = None
    cpu_public_api: dict[str, Any] | None = None


@dataclass(kw_only=True)
class NotMeasuredData(StepData):
    """``data`` of a result that measured nothing: a ``skip`` names ``torch`` (no API) or the
    ``model`` and ``device``; ranks other than 0 return it empty."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"report_dir", "torch", "model", "device"})

    torch: str | None = None
    model: str | None = None
    device: str | None = None


def plan(o: CPOptions) -> Plan:
    """Resolve device, dtype, world size and defaults; check the API's limits. Raises
    ``CannotRun`` (one line) for a bad number or a broken limit."""
    for name in ("batch_size", "heads", "head_dim", "reps", "check_rows"):
        value = getattr(o, name)
        if value < (0 if name == "reps" else 1):
            raise CannotRun(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'reps' else 'positive'}, not {value}")
    if o.heads_per_call is not None and o.heads_per_call < 1:
        raise CannotRun(f"--heads-per-call must be positive, not {o.heads_per_call}")
    if o.nproc is not None and o.nproc < 1:
        raise CannotRun(f"--nproc must be at least 1, not {o.nproc}")
    _, device, dtype = resolve(o.device, o.dtype)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if dd.launched_by_torchrun():
        world_size, launcher = dd.env_world_size(), "torchrun"
        if o.nproc is not None and o.nproc != world_size:
            raise CannotRun(f"--nproc {o.nproc} under torchrun, which started {world_size} processes",
                            "drop --nproc: torchrun's --nproc-per-node sets the world size")
    else:
        world_size = o.nproc or (2 if kind == "cpu" else 1)
        launcher = "single-process" if world_size == 1 else "spawn"
        if kind == "cuda" and world_size > torch.cuda.device_count():
            raise CannotRun(f"--nproc {world_size} needs {world_size} GPUs; {torch.cuda.device_count()} visible", "")
    seq_len = DEFAULT_SEQ_LEN[kind] if o.seq_len is None else o.seq_len  # 0 is refused below, not the default
    kv_len = seq_len if o.kv_len is None else o.kv_len
    if seq_len < 2 or kv_len < 2:
        raise CannotRun(f"--seq-len and --kv-len must be at least 2, not {seq_len} and {kv_len}")
    notes = []
    load_balance = o.load_balance
    if load_balance is None:  # torch's default is on; on only where it is allowed
        load_balance = o.causal and seq_len % (2 * world_size) == 0 and o.model is None
        if o.causal and not load_balance:
            why = ("with --model (see the limits)" if o.model else
                   f"seq_len {seq_len} is not divisible by 2 x world size {2 * world_size}")
            notes.append(f"load balancing off: {why}")
    broken = cp.problems(world_size=world_size, seq_len=seq_len, kv_len=kv_len, causal=o.causal,
                         load_balance=load_balance, sdpa_kernels=o.sdpa_kernels, attn_mask=o.attn_mask,
                         rotate=o.rotate, model=o.model is not None)
    if o.model is not None and not o.causal:
        broken.append("--model runs a causal LM: --no-causal applies to the attention workload only")
    if o.model is not None and o.kv_len not in (None, seq_len):
        broken.append("--kv-len applies to the attention workload only, not to --model")
    if o.model is not None and o.heads_per_call is not None:
        broken.append("--heads-per-call applies to the attention workload only: a model makes its own SDPA calls")
    if o.flash_impl is not None:
        if kind != "cuda":
            broken.append(f"--flash-impl {o.flash_impl} needs CUDA GPUs")
        elif o.sdpa_kernels not in (None, ["flash"]):
            broken.append(f"--flash-impl {o.flash_impl} replaces SDPA's flash kernel: allow only --sdpa-kernel flash")
    if broken:
        raise CannotRun(broken[0], "the limits of torch's context parallel API are listed in "
                                   "references/context-parallel.md")
    if o.merge_dtype not in cp.MERGE_DTYPES:
        raise CannotRun(f"--merge-dtype {o.merge_dtype}: choose {' or '.join(cp.MERGE_DTYPES)}", "")
    if o.memory_limit is not None and kind != "cuda":
        raise CannotRun("--memory-limit applies to CUDA GPUs only", "leave it out on CPU")
    if o.memory_limit is not None and not o.max_seq_len_search:
        raise CannotRun("--memory-limit bounds the --max-seq-len-search search; add --max-seq-len-search", "")
    if o.max_seq_len_search is not None and o.max_seq_len_search < seq_len:
        raise CannotRun(f"--max-seq-len-search {o.max_seq_len_search} is below --seq-len {seq_len}",
                        "pass the longest sequence to try, e.g. 1048576")
    kernels = o.sdpa_kernels or (["flash"] if o.flash_impl else list(cp.CP_KERNELS) if kind == "cuda" else None)
    heads_per_call = min(o.heads, o.heads_per_call or DEFAULT_HEADS_PER_CALL)
    return Plan(o, kind, dtype, world_size, launcher, seq_len, kv_len, load_balance, kernels, heads_per_call, notes)


def context_parallel(o: CPOptions, reporter: Reporter) -> StepResult:
    """Run the step (see the module docstring): launch or join the ranks, return rank 0's result."""
    p = plan(o)
    missing = cp.api_missing()
    if missing:
        return StepResult(STEP, "skip", f"skip: {missing}", [], NotMeasuredData(torch=torch.__version__),
                          "context parallelism needs torch 2.7 or newer with torch.distributed")
    if p.device_kind == "cpu" and o.model is not None:
        return StepResult(STEP, "skip", "skip: --model needs CUDA GPUs: on CPU, torch's context_parallel block runs "
                          "no causal SDPA kernel (the CPU flash kernel has no DTensor sharding strategy, and the math "
                          "kernel refuses causal)", [], NotMeasuredData(model=o.model, device="cpu"),
                          "run it under torchrun on GPUs; on CPU, run without --model for the check of the ring")
    if p.launcher == "spawn":
        return _spawn(p)
    if p.launcher == "single-process":
        rank = dd.join(p.device_kind, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{dd.free_port()}",
                       launcher="single-process")
    else:
        rank = dd.join(p.device_kind)
    try:
        return _on_rank(p, rank, reporter if rank.is_main else Reporter(quiet=True))
    finally:
        dd.leave()


def _spawned(index: int, p: Plan, port: int, queue: Any) -> None:
    """One spawned process: join the group, run the step, rank 0 sends its result home."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // p.world_size))
    reporter = Reporter(json_mode=p.o.json, quiet=p.o.quiet or index != 0)
    rank = dd.join(p.device_kind, rank=index, world_size=p.world_size, init_method=f"tcp://127.0.0.1:{port}",
                   launcher="spawn", local_rank=index)
    try:
        try:
            result = _on_rank(p, rank, reporter)
        except OptionError as exc:  # a spawned rank: no command line between it and the result
            result = StepResult.error(STEP, exc.render(flag))
        except CannotRun as exc:
            result = StepResult.error(STEP, exc)
        if rank.is_main:
            queue.put(result)
    finally:
        dd.leave()


def _spawn(p: Plan) -> StepResult:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    try:
        mp.spawn(_spawned, args=(p, dd.free_port(), queue), nprocs=p.world_size, join=True)
    except Exception as exc:  # a rank died: the last line of its traceback says why
        lines = [line for line in str(exc).splitlines() if line.strip()]
        message = f"{lines[0].strip(' -')}: {lines[-1].strip()}"[:400] if lines else type(exc).__name__
        if queue.empty():
            raise CannotRun(f"a spawned rank failed: {message}", "rerun with --debug, or under torchrun") from None
    return queue.get()


# --- on every rank

def _safely(fn, *args, **kwargs) -> tuple[Any, str | None]:
    """(``fn(...)``, None), or (None, the out-of-memory message) when it runs out of memory."""
    value = None
    with oom_caught() as oom:
        value = fn(*args, **kwargs)
    return value, oom.message


def _workload(p: Plan, rank: dd.Rank, seq_len: int, kv_len: int | None = None) -> cp.Workload:
    o = p.o
    return cp.make_workload(batch_size=o.batch_size, seq_len=seq_len, kv_len=kv_len or seq_len, heads=o.heads,
                            head_dim=o.head_dim, dtype=p.dtype, device=rank.device, causal=o.causal)


def _sharded(p: Plan, work: cp.Workload, rank: dd.Rank, mesh: Any, reps: int, warmup: bool = True,
             gather: bool = True, reserve_bytes: int = 0) -> cp.Sharded:
    if p.device_kind == "cuda":
        return cp.sharded_attention(work, rank, mesh, sdpa_kernels=p.sdpa_kernels, load_balance=p.load_balance,
                                    rotate=p.o.rotate, reps=reps, warmup=warmup, gather=gather,
                                    heads_per_call=p.heads_per_call, reserve_bytes=reserve_bytes)
    return cp.ring_attention(work, rank, mesh, load_balance=p.load_balance, rotate=p.o.rotate, reps=reps,
                             warmup=warmup, heads_per_call=p.heads_per_call)


def _load_model(p: Plan, rank: dd.Rank) -> models.LoadedModel:
    loaded = models.load(p.o.model, device=rank.device, dtype=p.dtype, trust_remote_code=p.o.trust_remote_code)
    if loaded.family != "causal-lm" or not loaded.is_transformers:
        raise CannotRun(f"--model {p.o.model} is a {loaded.family} model: context_parallel.py runs transformers "
                        "causal LMs (their SDPA calls are what the API shards)", "")
    with switch.using(loaded.model, "sdpa"):  # refused here, before any rank measures, when the class cannot switch
        pass
    limit = loaded.max_seq_len()
    if limit and p.seq_len > limit:
        raise CannotRun(f"--seq-len {p.seq_len} is beyond {p.o.model}'s maximum of {limit} positions", "")
    return loaded


def _model_ids(loaded: models.LoadedModel, batch_size: int, seq_len: int) -> torch.Tensor:
    return loaded.inputs(batch_size, seq_len, 0.0).kwargs["input_ids"]


def _keep(base: cp.Sharded | None, rank: dd.Rank, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Rank 0 keeps the judged rows (or a model's logits) of the 1-device output; the rest is
    freed before the sharded run."""
    if base is None or base.output is None:
        return None
    kept = None
    if rank.is_main:  # a model's logits wait on the CPU, so they do not count in rank 0's memory
        kept = base.output[:, :, rows] if rows is not None else base.output.cpu()
    base.output = None
    return kept


def _on_rank(p: Plan, rank: dd.Rank, reporter: Reporter) -> StepResult:
    """Every rank runs this; rank 0 returns the result, the others a copy of its status."""
    with cp.merge_dtype(p.o.merge_dtype):
        return _run_rank(p, rank, reporter)


def _run_rank(p: Plan, rank: dd.Rank, reporter: Reporter) -> StepResult:
    from torch.distributed.device_mesh import init_device_mesh

    o = p.o
    if o.flash_impl:
        cp.activate_flash_impl(o.flash_impl)  # every rank, the same: the baseline and the ring both run it
    mesh = init_device_mesh(p.device_kind, (rank.world_size,))
    rows = cp.check_rows(p.seq_len, rank.world_size, o.check_rows)
    loaded = None
    if o.model is not None:
        with reporter.stage(f"loading {o.model} on {rank.world_size} rank(s)"):
            loaded = _load_model(p, rank)
        ids = _model_ids(loaded, o.batch_size, p.seq_len)
        with reporter.stage(f"the 1-device baseline: {o.model} over the whole sequence, {p.seq_len} tokens"):
            base, base_err = _safely(cp.model_single_device, loaded, ids, rank, p.sdpa_kernels, o.reps)
        base_rows = _keep(base, rank, None)
        with reporter.stage(f"the sharded run: {rank.world_size} rank(s), context_parallel"):
            shard, shard_err = _safely(cp.sharded_model, loaded, ids, rank, mesh, sdpa_kernels=p.sdpa_kernels,
                                       rotate=o.rotate, reps=o.reps)
        work = None
    else:
        work = _workload(p, rank, p.seq_len, p.kv_len)
        with reporter.stage(f"the 1-device baseline: SDPA over the whole sequence, {p.seq_len} tokens"):
            base, base_err = _safely(cp.single_device, work, rank, p.sdpa_kernels, o.reps)
        base_rows = _keep(base, rank, rows)
        with reporter.stage(f"the sharded run: {rank.world_size} rank(s), "
                            f"{'context_parallel' if p.device_kind == 'cuda' else 'ring with the CPU flash kernel'}"):
            shard, shard_err = _safely(_sharded, p, work, rank, mesh, o.reps)
    runs = dd.gather(shard.run.to_dict() if shard else {"rank": rank.rank, "error": shard_err}, rank)
    cpu_api = None
    if p.device_kind == "cpu" and work is not None:
        with reporter.stage("the public context_parallel block on CPU: SDPA's math kernel"):
            cpu_api = cp.cpu_api_probe(work, rank, mesh)
    notes = list(p.notes)
    accuracy = None
    if rank.is_main and shard is not None and base_rows is not None:
        with reporter.stage("the float64 reference"):
            accuracy = _accuracy(p, rank, shard.output, base_rows, rows, loaded, notes)
    if shard is not None:
        shard.output = None
    del base_rows, work
    search = None
    if o.max_seq_len_search:
        if o.memory_limit is not None:  # every rank, for the search only
            notes.append("the search ran with each rank's memory capped at {memory_limit_gb:.1f} GB by "
                           "{enforced_by}".format(**cap_cuda_memory(o.memory_limit, rank.device)))
        try:
            search = _search(p, rank, mesh, loaded, shard, reporter)
        finally:
            if o.memory_limit is not None:
                cap_cuda_memory(None, rank.device)
    result = None
    if rank.is_main:
        result = _result(p, rank, runs, base, base_err, shard, shard_err, accuracy, notes, loaded, cpu_api, search,
                         reporter)
    status = [result.status if result else None]
    if rank.world_size > 1:
        torch.distributed.broadcast_object_list(status, src=0)
    return result or StepResult(STEP, status[0], f"rank {rank.rank}: see rank 0's result", [], NotMeasuredData(), "")


def _accuracy(p: Plan, rank: dd.Rank, output: torch.Tensor, base_rows: torch.Tensor, rows: torch.Tensor,
              loaded: Any, notes: list[str]) -> acc_mod.Accuracy | None:
    """Rank 0: the gathered output judged against float64 and the 1-device baseline (None,
    with a note, when the reference runs out of memory)."""
    o = p.o
    with oom_caught() as oom:
        if loaded is None:
            work = _workload(p, rank, p.seq_len, p.kv_len)
            ref = cp.reference_rows(work, rows)
            cand = output[:, :, rows.to(output.device)]
            return acc_mod.compare(cand, base_rows, ref, valid=None, dtype=p.dtype, language_model=False,
                                   reference_name=f"float64 attention at {rows.numel()} query rows")
        ids = _model_ids(loaded, o.batch_size, p.seq_len)
        inputs = models.Inputs(o.batch_size, p.seq_len, (), {"input_ids": ids, "use_cache": False}, None,
                               "random token ids")
        ref = acc_mod.reference_output(loaded, inputs, "eager")
        return acc_mod.compare(output, base_rows.to(output.device), ref, valid=None, dtype=p.dtype,
                               language_model=True)
    notes.append(f"the float64 reference ran out of memory ({oom.message}); rerun at a shorter --seq-len "
                 "for the accuracy check")
    return None


#: A sharded search probe first holds this times its expected allocation (``_search``): slack
#: for allocator rounding; the longest length found may fall short by about this share.
RESERVE_MARGIN = 1.05


def _search(p: Plan, rank: dd.Rank, mesh: Any, loaded: Any, shard: cp.Sharded | None,
            reporter: Reporter) -> dict[str, Any]:
    """The longest sequence that runs on one device and sharded (``timing.search_longest``),
    one forward pass per probe, in multiples of 64 x the shard count (2 x N with load
    balancing) to meet the API's limits; all ranks agree on each outcome.

    A rank out of memory inside torch's ring leaves the others waiting in NCCL (it hung a
    search on 2 H200s), so a sharded probe first makes its inputs and holds
    ``RESERVE_MARGIN`` x measured bytes per token (of the longest sharded run so far) x its
    length (``distributed.prepare_together``): all ranks fail together when any cannot."""
    o, n = p.o, rank.world_size
    unit = 64 * (2 * n if p.load_balance else n)
    model_limit = loaded.max_seq_len() if loaded is not None else None
    cap = min(o.max_seq_len_search, model_limit or o.max_seq_len_search)
    found: dict[str, Any] = {"unit": unit}
    for where in ("one_device", "sharded") if n > 1 else ("one_device",):
        peaks: dict[int, float | None] = {}
        errors: dict[int, str] = {}
        # bytes per token the sharded call allocated on this rank, and the length it was measured at
        rate = (shard.run.peak_memory_mb * 2**20 / p.seq_len, p.seq_len) \
            if shard is not None and shard.run.peak_memory_mb else (0.0, 0)

        def fits(seq_len: int, where: str = where) -> bool:
            nonlocal rate
            with reporter.stage(f"--max-seq-len-search: {where.replace('_', ' ')}, seq_len {seq_len}"):
                reserve = int(RESERVE_MARGIN * rate[0] * seq_len)
                if loaded is not None:
                    def fn():
                        if where == "one_device":
                            ids = _model_ids(loaded, o.batch_size, seq_len)
                            return cp.model_single_device(loaded, ids, rank, p.sdpa_kernels, 0, warmup=False)
                        ids = dd.prepare_together(lambda: _model_ids(loaded, o.batch_size, seq_len), rank)
                        return cp.sharded_model(loaded, ids, rank, mesh, sdpa_kernels=p.sdpa_kernels, rotate=o.rotate,
                                                reps=0, warmup=False, gather=False, reserve_bytes=reserve)
                else:
                    def fn():
                        if where == "one_device":
                            return cp.single_device(_workload(p, rank, seq_len), rank, p.sdpa_kernels, 0,
                                                    warmup=False)
                        work = dd.prepare_together(lambda: _workload(p, rank, seq_len), rank)
                        return _sharded(p, work, rank, mesh, 0, warmup=False, gather=False, reserve_bytes=reserve)
                try:
                    ran, err = _safely(fn)
                except Exception as exc:  # not memory: a failure too, with what it was
                    ran, err = None, f"{said(exc, 160)}"
                peaks[seq_len] = ran.run.total_mb if ran else None
                if where == "sharded" and ran and ran.run.peak_memory_mb and seq_len > rate[1]:
                    rate = (ran.run.peak_memory_mb * 2**20 / seq_len, seq_len)
                del ran
                free_memory(rank.device)  # as every search's probe does (timing.fits_in_memory)
            ok = dd.agree(err is None, rank)
            if not ok:
                errors[seq_len] = err or "another rank ran out of memory"
            return ok

        got = search_longest(fits, cap, p.seq_len, unit, name="seq_len")
        lo, hi = got["max_context"], got["first_failure"]
        found[where] = {"longest": {"seq_len": lo, "peak_total_mb_rank0": peaks.get(lo)} if lo else None,
                        "first_failed": {"seq_len": hi, "error": errors.get(hi)} if hi else None,
                        "cap": cap, "cap_reached": got["capped"], "probes": got["probes"]}
    one, many = found["one_device"]["longest"], found.get("sharded", {}).get("longest")
    found["ratio"] = many["seq_len"] / one["seq_len"] if one and many else None
    return found


# --- rank 0's verdict

def _kernel_names(kernels: dict[str, int]) -> str:
    named = {f"{SDPA_OPS.get(k, k)} x{n}" for k, n in kernels.items() if k in SDPA_OPS}
    return ", ".join(sorted(named)) or "no SDPA kernel seen"


def _data(p: Plan, rank: dd.Rank, runs: list[dict], base: cp.Sharded | None, base_err: str | None,
          notes: list[str], loaded: Any, search: dict | None) -> ContextParallelData:
    """Rank 0's typed ``data``: the run's settings and the figures from every rank's runs."""
    o, n = p.o, rank.world_size
    data = ContextParallelData(
        mode="model" if loaded is not None else "attention",
        path=("torch.distributed.tensor.experimental.context_parallel: ring attention over SDPA"
              if p.device_kind == "cuda" else
              "torch's ring (_templated_ring_attention) with SDPA's CPU flash kernel, on shards from "
              "_context_parallel_shard, gathered with context_parallel_unshard"),
        launcher=rank.launcher, world_size=n, backend=rank.backend, device=p.device_kind,
        dtype=dtype_name(p.dtype), model=o.model,
        shape={"batch_size": o.batch_size, "seq_len": p.seq_len, "kv_len": p.kv_len,
               **({"heads": o.heads, "head_dim": o.head_dim} if loaded is None else {})},
        attention=loaded.attention_shape() if loaded is not None else None,
        causal=o.causal, load_balance=p.load_balance, rotate=o.rotate, merge_dtype=o.merge_dtype,
        heads_per_call=p.heads_per_call if loaded is None else None,
        ring_calls=p.ring_calls if loaded is None else None,
        sdpa_kernels_allowed=p.sdpa_kernels, flash_impl=o.flash_impl,
        limits=cp.LIMITS, single_device=base.run.to_dict() if base else {"error": base_err}, ranks=runs,
        versions={"torch": torch.__version__, "python": platform.python_version()}, notes=notes,
        max_seq_len=search)
    ok_runs = [r for r in runs if not r.get("error")]
    if len(ok_runs) == n:
        data.latency_ms = max(r["latency_ms"] for r in runs) if o.reps else None
        data.memory_per_rank_mb = max(r["total_mb"] for r in runs) if all(r["total_mb"] for r in runs) else None
    if base and data.latency_ms and base.run.latency_ms:
        data.speedup = base.run.latency_ms / data.latency_ms
        data.scaling_efficiency = data.speedup / n
    if base and data.memory_per_rank_mb and base.run.total_mb:
        data.memory_ratio = data.memory_per_rank_mb / base.run.total_mb
    if loaded is None and n > 1 and len(ok_runs) == n and all(r["total_mb"] for r in runs):
        data.memory_explained = _memory_explained(p, runs)
    if loaded is None and data.latency_ms:
        data.tflops = attention_flops(o.batch_size, p.seq_len, o.heads, o.head_dim, 1, o.causal,
                                      kv_len=p.kv_len) / (data.latency_ms * 1e-3) / 1e12
    return data


def _result(p: Plan, rank: dd.Rank, runs: list[dict], base: cp.Sharded | None, base_err: str | None,
            shard: cp.Sharded | None, shard_err: str | None, accuracy: acc_mod.Accuracy | None, notes: list[str],
            loaded: Any, cpu_api: dict | None, search: dict | None, reporter: Reporter) -> StepResult:
    """Rank 0's verdict: every rank ran the sharded call on a ring kernel, and the gathered
    output passed the accuracy rule."""
    n = rank.world_size
    ring_ops = RING_OPS[p.device_kind]
    data = _data(p, rank, runs, base, base_err, notes, loaded, search)
    ok_runs = [r for r in runs if not r.get("error")]
    if accuracy is None:
        why = shard_err or base_err or (data.notes[-1] if data.notes else "nothing to compare")
        accuracy = acc_mod.not_compared(f"not compared: {why}")
    data.accuracy = accuracy
    checks = [Check("ranks", len(ok_runs) == n,
                    f"{len(ok_runs)} of {n} ranks ran the sharded {data.mode}" +
                    ("" if len(ok_runs) == n else f" ({'; '.join(str(r.get('error')) for r in runs if r.get('error'))})"))]
    ring = [r for r in ok_runs if any(op in r["kernels"] for op in ring_ops)]
    checks.append(Check("kernels", len(ring) == n and n > 0,
                        "; ".join(f"rank {r['rank']}: {_kernel_names(r.get('kernels') or {})}" for r in runs)))
    checks.append(Check("accuracy", accuracy.passed, accuracy.evidence()))
    if cpu_api is not None:
        data.cpu_public_api = _cpu_api_record(p, rank, cpu_api)
    failed = [c for c in checks if not c.passed]
    if base is None and base_err and shard is not None:
        data.notes.append(f"the 1-device baseline ran out of memory at seq_len {p.seq_len} ({base_err}); the sharded "
                          "run did not")
    per_rank = ", ".join(fmt_mb(r.get("total_mb")) for r in runs)
    figures = (f"{n} rank(s), seq_len {p.seq_len}: {fmt_ms(data.latency_ms)} (1 device: "
               f"{fmt_ms(base.run.latency_ms if base else None)}), per-rank memory {per_rank} (1 device: "
               f"{fmt_mb(base.run.total_mb if base else None)})")
    if data.scaling_efficiency is not None:
        figures += f", scaling efficiency {100 * data.scaling_efficiency:.0f} %"
    if search is not None:
        longest = [(search.get(w) or {}).get("longest") for w in ("one_device", "sharded")]
        figures += (f"; longest sequence: {longest[0]['seq_len'] if longest[0] else 'none'} on 1 device"
                    + (f", {longest[1]['seq_len'] if longest[1] else 'none'} on {n} ranks" if n > 1 else "")
                    + (f" ({search['ratio']:.2f}x)" if search.get("ratio") else ""))
    if failed:
        summary = figures + "; " + "; ".join(f"{c.name} failed ({c.evidence})" for c in failed)
        nxt = ("read checks[].evidence; an out-of-memory rank needs a shorter --seq-len or more ranks; an accuracy "
               "failure means the sharded output is not the 1-device output: do not use this setting")
        status = "fail"
    else:
        summary = figures + f"; gathered output matches ({accuracy.evidence().split(' vs ')[0]})"
        nxt = ("context parallelism works here with these settings; compare data.memory_per_rank_mb and "
               "data.scaling_efficiency with one GPU (FlashAttention on one device) before choosing it")
        status = "pass"
    for note in data.notes:
        reporter.note(note)
    return StepResult(STEP, status, summary, checks, data, nxt)


def _memory_explained(p: Plan, runs: list[dict]) -> str:
    """A rank's measured peak in multiples of its output shard [B, H, S / N, D], its parts
    named from torch's ring (``measure.context_parallel.SOURCE``)."""
    o, n = p.o, len(runs)
    shard_mb = o.batch_size * o.heads * (p.seq_len // n) * o.head_dim * p.dtype.itemsize / 2**20
    worst = max(runs, key=lambda r: r["total_mb"])
    calls = p.ring_calls
    ring = (f"torch's ring holds a send copy (torch.cat of K and V) and a receive buffer of the K/V shard "
            f"({'all N shards' if o.rotate == 'allgather' else 'one shard'} with --rotate {o.rotate}) and merges the "
            f"partial outputs in {'float32' if o.merge_dtype == 'float32' else dtype_name(p.dtype)} "
            f"(--merge-dtype {o.merge_dtype})")
    head = (f"rank {worst['rank']}: peak {fmt_mb(worst['total_mb'])} = q/k/v shards {fmt_mb(worst['resident_mb'])} + "
            f"{fmt_mb(worst['peak_memory_mb'])} allocated by the call, {worst['peak_memory_mb'] / shard_mb:.1f}x the "
            f"output shard of {fmt_mb(shard_mb)}: ")
    if calls == 1:
        return head + ring + "; for attention alone, per-rank memory falls slower than 1/N (--heads-per-call lowers it)"
    return (head + f"the output shard, allocated once, and what one of {calls} ring calls on {p.heads_per_call} of "
            f"{o.heads} heads holds, where {ring}: {p.heads_per_call}/{o.heads} of what one call on all heads holds")


def _cpu_api_record(p: Plan, rank: dd.Rank, found: dict) -> dict[str, Any]:
    """Evidence, not a check, of the public block on CPU: the math kernel non-causal (judged
    against float64 when the gathered output has the right shape) and the causal refusal."""
    noncausal = found.get("noncausal")
    record: dict[str, Any] = {"kernel": "math, non-causal, no load balancing (DTensor's own op rules, not the ring)",
                              "causal_math": found.get("causal_error") or "ran", "noncausal_math": noncausal,
                              "matches": False}
    if not isinstance(noncausal, torch.Tensor):
        return record
    work = dataclasses.replace(_workload(p, rank, p.seq_len, p.kv_len), causal=False)
    rows = cp.check_rows(p.seq_len, rank.world_size, p.o.check_rows)
    base = cp.single_device(work, rank, ["math"], 0, warmup=False).output
    if noncausal.shape != base.shape:
        record["noncausal_math"] = (f"ran, but the gathered output is {list(noncausal.shape)}, not "
                                    f"{list(base.shape)}: DTensor did not leave it sharded on the sequence")
        return record
    acc = acc_mod.compare(noncausal[:, :, rows], base[:, :, rows], cp.reference_rows(work, rows), valid=None,
                          dtype=p.dtype, language_model=False, reference_name="float64 attention, non-causal")
    record.update(noncausal_math=f"ran: {acc.evidence()}", matches=acc.passed)
    return record


#: How a result of this step is drawn (report.View): the accuracy figures.
VIEW = register_view(STEP, Sections((accuracy_part,)))
