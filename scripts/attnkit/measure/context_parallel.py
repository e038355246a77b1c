"""Attention with the sequence sharded across ranks, through PyTorch's context parallel API.

``context_parallel(mesh, buffers=..., buffer_seq_dims=...)`` shards the buffers along their
sequence dimension in place and, inside the block, runs ``F.scaled_dot_product_attention``
as ring attention (``_templated_ring_attention``) over SDPA's kernels: K/V rotate between
ranks, partial outputs merge by their logsumexp. ``context_parallel_unshard(mesh, [out],
[2])`` all-gathers the output and undoes the load balancer's order. All of it is torch's;
this module calls, measures and states its limits (``LIMITS``, read in ``SOURCE`` of torch
2.13; pytorch/pytorch commit 09b101c5 has the same checks). Explained with measurements in
references/context-parallel.md.

On CPU (torch 2.13, gloo) the public block runs only SDPA's math kernel, non-causal, by
DTensor's generic rules, not the ring (``cpu_api_probe``; the reference's "On CPU"); the
ring itself runs there: ``ring_attention`` checks sharding, rotation, merging, gathering.

The workload: token ids [B, S] are what is sharded (no rank holds the whole q, k, v, as in
a model), and q, k, v [B, H, S, D] are rows of random tables [V, H, D] (``TABLE_ROWS`` rows,
seed 0, left out of the memory figures) at each rank's own positions.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..models import select_output
from ..report import OptionError, said
from ..swap import switch
from .distributed import Rank, RankRun, prepare_together, profile_call, timed_runs

#: Where the limits below were read (torch 2.13 wheel).
SOURCE = "torch/distributed/tensor/experimental/_context_parallel/_attention.py"

#: SDPA kernels the ring handles (``_sdpa_handler``'s ``call_maps``).
CP_KERNELS = ("flash", "efficient", "cudnn")

#: ``set_rotate_method``'s choices: how K/V shards travel between ranks.
ROTATE_METHODS = ("allgather", "alltoall")

#: Rows of the random q/k/v tables the token ids index. The tables are the workload's
#: generator, the same on one device and on every rank: memory figures leave them out.
TABLE_ROWS = 1024

#: The limits the step checks before it starts, each with where torch says it.
LIMITS = [
    {"limit": "SDPA kernel flash, efficient or cudnn (math and CPU kernels are not ring attention)",
     "source": f"{SOURCE}: _sdpa_handler call_maps"},
    {"limit": "no attn_mask", "source": f"{SOURCE}: _scaled_dot_product_ring_efficient_attention / "
                                        "_cudnn_attention raise 'attn_bias is not supported yet'"},
    {"limit": "causal needs q_len == kv_len", "source": f"{SOURCE}: _templated_ring_attention"},
    {"limit": "load balancing needs causal", "source": f"{SOURCE}: _templated_ring_attention"},
    {"limit": "load balancing needs seq_len divisible by 2 x world size",
     "source": "_context_parallel/_load_balancer.py: _create_default_load_balancer"},
    {"limit": "seq_len and kv_len divisible by the world size (equal shards for the K/V rotation)",
     "source": f"{SOURCE}: _templated_ring_attention reshapes the received K/V to the local shape"},
    {"limit": "rotate method allgather or alltoall", "source": f"{SOURCE}: set_rotate_method"},
]


def api_missing() -> str | None:
    """Why torch's context parallel API cannot be imported here, or None when it can."""
    try:
        from torch.distributed.tensor.experimental import context_parallel  # noqa: F401
        from torch.distributed.tensor.experimental._attention import context_parallel_unshard  # noqa: F401
    except Exception as exc:  # an old torch, or one built without distributed
        return f"torch {torch.__version__} has no context parallel API ({type(exc).__name__}: {exc})"
    return None


#: Flash attention implementations torch 2.13 can put behind SDPA's flash op
#: (``torch.nn.attention.activate_flash_attention_impl``; ``torch/nn/attention/_fa3.py``,
#: ``_fa4.py`` register them). The ring calls that op, so they run inside ring attention too.
FLASH_IMPLS = ("FA3", "FA4")


def activate_flash_impl(name: str) -> None:
    """Put ``name`` (``FLASH_IMPLS``) behind SDPA's flash kernel in this process. Raises
    ``OptionError`` (one line) when torch has no such registry or the library is missing."""
    import importlib

    try:
        import torch.nn.attention as attention

        importlib.import_module(f"torch.nn.attention._{name.lower()}")  # registers it
        attention.activate_flash_attention_impl(name)
    except Exception as exc:
        raise OptionError("flash_impl", "{flash_impl} {value}: torch {torch} could not activate it ({why})",
                          "FA4 needs flash-attn-4 (module flash_attn.cute) and an sm90/sm100 GPU", value=name,
                          torch=torch.__version__, why=said(exc, 200)) from None


def problems(*, world_size: int, seq_len: int, kv_len: int, causal: bool, load_balance: bool | None,
             sdpa_kernels: list[str] | None, attn_mask: bool, rotate: str, model: bool = False) -> list[str]:
    """The limits (``LIMITS``) these settings break, one line each; empty when none."""
    out = []
    bad = [k for k in sdpa_kernels or [] if k not in CP_KERNELS]
    if bad:
        out.append(f"--sdpa-kernel {', '.join(bad)}: context parallel runs only SDPA's {', '.join(CP_KERNELS)} kernels "
                   f"as ring attention ({SOURCE}, _sdpa_handler)")
    if attn_mask:
        out.append("--attn-mask: context parallel SDPA takes no attn_mask (its efficient and cudnn ring functions "
                   "raise 'attn_bias is not supported yet'; the flash kernel takes no mask); use is_causal")
    if causal and kv_len != seq_len:
        out.append(f"causal attention under context parallel needs q_len == kv_len, not {seq_len} and {kv_len} "
                   "(torch: 'is_causal requires the same query and context sequence lengths')")
    if load_balance and not causal:
        out.append("--load-balance needs causal attention (torch: 'Load balancing requires `is_causal=True`'); "
                   "pass --no-load-balance for non-causal runs")
    if load_balance and seq_len % (2 * world_size):
        out.append(f"--load-balance needs seq_len divisible by 2 x world size = {2 * world_size}, and {seq_len} is not "
                   "(torch would turn load balancing off without a word)")
    for name, n in (("seq_len", seq_len), ("kv_len", kv_len)):
        if n % world_size:
            out.append(f"{name} {n} is not divisible by the world size {world_size}: the ring rotates K/V shards of "
                       "one length")
            break
    if rotate not in ROTATE_METHODS:
        out.append(f"--rotate {rotate}: torch's set_rotate_method takes {' or '.join(ROTATE_METHODS)}")
    if model and load_balance:
        out.append("--load-balance with --model: the head-tail order gives each rank non-contiguous position_ids, "
                   "which transformers' create_causal_mask reads as packed sequences and turns into an attn_mask "
                   "(find_packed_sequence_indices); pass --no-load-balance")
    return out


#: ``--merge-dtype``: the dtype the ring merges the partial outputs in (torch's
#: ``_cp_options.convert_to_f32``, default True: float32). "input" merges in the input's dtype.
MERGE_DTYPES = ("float32", "input")


@contextlib.contextmanager
def merge_dtype(name: str) -> Iterator[None]:
    """The block runs with torch's ring merging partial outputs and logsumexps in ``name``
    (``MERGE_DTYPES``). ``_SDPAMerger`` (``SOURCE``) keeps them in float32 under
    ``_cp_options.convert_to_f32``, and its update ``out - sigmoid(lse_b - lse) x (out -
    out_b)`` makes temporaries of the output shard's size, in float32 twice bf16's bytes.
    Raises ``OptionError`` when this torch has no such option."""
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    if not hasattr(cp._cp_options, "convert_to_f32"):
        raise OptionError("merge_dtype", "{merge_dtype}: torch {torch} has no _cp_options.convert_to_f32",
                          "leave it out", torch=torch.__version__)
    saved = cp._cp_options.convert_to_f32
    cp._cp_options.convert_to_f32 = name == "float32"
    try:
        yield
    finally:
        cp._cp_options.convert_to_f32 = saved


@contextlib.contextmanager
def cp_options(load_balance: bool, rotate: str) -> Iterator[None]:
    """Torch's global ``_cp_options.enable_load_balance`` and ``set_rotate_method`` for the
    block; its values (and dispatch mode, which ``_context_parallel_shard`` changes) back after."""
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    saved = (cp._cp_options.enable_load_balance, cp._cp_options.rotate_method, cp._dispatch_mode)
    cp._cp_options.enable_load_balance = load_balance
    cp.set_rotate_method(rotate)
    try:
        yield
    finally:
        cp._cp_options.enable_load_balance, cp._cp_options.rotate_method, cp._dispatch_mode = saved


# --- the workload

@dataclass
class Workload:
    """Token ids [B, S] (and [B, S_kv]) and the random tables q, k, v are read from."""

    ids: torch.Tensor  # [B, S] int64
    ids_kv: torch.Tensor  # [B, S_kv] int64 (the same tensor when S_kv == S)
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q, k, v tables [V, H, D]
    causal: bool
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> dict[str, int]:
        b, s = self.ids.shape
        _, h, d = self.tables[0].shape
        return {"batch_size": b, "seq_len": s, "kv_len": self.ids_kv.shape[1], "heads": h, "head_dim": d}

    def qkv(self, ids: torch.Tensor, ids_kv: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """q, k, v [B, H, S, D] for token ids [B, S] (k and v at ``ids_kv`` when given)."""
        ids_kv = ids if ids_kv is None else ids_kv
        tq, tk, tv = self.tables
        # [B, S, H, D] -> [B, H, S, D], contiguous: the ring's key.contiguous() would copy a view
        return tuple(t[i].transpose(1, 2).contiguous() for t, i in ((tq, ids), (tk, ids_kv), (tv, ids_kv)))


def make_workload(*, batch_size: int, seq_len: int, kv_len: int, heads: int, head_dim: int, dtype: torch.dtype,
                  device: str, causal: bool, seed: int = 0) -> Workload:
    """The same ids and tables on every rank: drawn from a generator on ``device`` with ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, TABLE_ROWS, (batch_size, seq_len), generator=gen, device=device)
    ids_kv = ids if kv_len == seq_len else torch.randint(0, TABLE_ROWS, (batch_size, kv_len), generator=gen,
                                                         device=device)
    tables = tuple(torch.randn(TABLE_ROWS, heads, head_dim, generator=gen, device=device, dtype=torch.float32)
                   .to(dtype) for _ in range(3))
    return Workload(ids, ids_kv, tables, causal, dtype)


def tensors_mb(*tensors: torch.Tensor) -> float:
    """Bytes held by ``tensors`` (their storages, each counted once), in MB."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total / 2**20


def by_head_groups(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   heads_per_call: int | None) -> torch.Tensor:
    """``attend(q, k, v)`` on ``heads_per_call`` heads at a time (None or >= H: one call), into
    one output allocated once: q [B, H, S, D], k and v [B, H, S_kv, D] -> [B, H, S, D]. Heads
    are independent, so the output is the same, and what the ring allocates per call (K/V
    send and receive buffers, block outputs, merge temporaries: ``memory_explained``)
    shrinks to the group's share.
    """
    heads = q.shape[1]
    if heads_per_call is None or heads_per_call >= heads:
        return attend(q, k, v)
    out = q.new_empty(*q.shape[:3], v.shape[3])
    for start in range(0, heads, heads_per_call):
        group = slice(start, start + heads_per_call)
        out[:, group] = attend(q[:, group], k[:, group], v[:, group])
    return out


# --- runs

@dataclass
class Sharded:
    """One rank's run: its measurement, and (on every rank) the gathered output [B, H, S, D]."""

    run: RankRun
    output: torch.Tensor | None


def _measure(fn, rank: Rank, reps: int, resident_mb: float | None, warmup: bool = True,
             exclude_mb: float = 0.0, together: bool = True) -> tuple[RankRun, Any]:
    if warmup:
        fn()  # kernel choice, allocator growth, first collectives
    measured, out = profile_call(fn, rank, resident_mb, exclude_mb)
    if reps:
        measured.latency_ms, measured.latency_iqr_ms, measured.runs = timed_runs(fn, rank, reps, together)
    return measured, out


def single_device(work: Workload, rank: Rank, sdpa_kernels: list[str] | None, reps: int,
                  warmup: bool = True) -> Sharded:
    """Plain SDPA over the whole sequence on this rank's device: the 1-device baseline."""
    q, k, v = work.qkv(work.ids, work.ids_kv)

    def run() -> torch.Tensor:
        with torch.no_grad(), switch.sdpa_kernels(sdpa_kernels):
            return F.scaled_dot_product_attention(q, k, v, is_causal=work.causal)

    measured, out = _measure(run, rank, reps, tensors_mb(q, k, v, work.ids), warmup,
                             tensors_mb(*work.tables), together=False)
    return Sharded(measured, out)


def _buffers(work: Workload) -> list[torch.Tensor]:
    ids = work.ids.clone()
    return [ids] if work.ids_kv is work.ids else [ids, work.ids_kv.clone()]


def sharded_attention(work: Workload, rank: Rank, mesh: Any, *, sdpa_kernels: list[str] | None, load_balance: bool,
                      rotate: str, reps: int, warmup: bool = True, gather: bool = True,
                      heads_per_call: int | None = None, reserve_bytes: int = 0) -> Sharded:
    """SDPA inside ``context_parallel`` (the public API; CUDA) on sharded token ids, each rank
    calling the ring on its own q, k, v ``by_head_groups``; the output gathered with
    ``context_parallel_unshard`` unless ``gather=False`` (output None: the longest-sequence
    search). q, k, v are made with ``reserve_bytes`` on top by ``distributed.prepare_together``,
    so OOM there fails every rank together."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard

    with cp_options(load_balance, rotate):
        buffers = _buffers(work)
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers),
                              no_restore_buffers=set(buffers)):
            q, k, v = prepare_together(lambda: work.qkv(*buffers), rank, reserve_bytes)  # [B, H, S / N, D] each

            def ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, is_causal=work.causal)  # the ring, via DTensor

            def run() -> torch.Tensor:
                with torch.no_grad(), switch.sdpa_kernels(sdpa_kernels):
                    return by_head_groups(ring, q, k, v, heads_per_call)

            measured, out = _measure(run, rank, reps, tensors_mb(q, k, v, *buffers), warmup,
                                     tensors_mb(*work.tables))
            q = k = v = None  # free the shards before gathering
        if not gather:
            return Sharded(measured, None)
        (full,) = context_parallel_unshard(mesh, [out], [2])
    return Sharded(measured, full)


def ring_attention(work: Workload, rank: Rank, mesh: Any, *, load_balance: bool, rotate: str, reps: int,
                   warmup: bool = True, heads_per_call: int | None = None) -> Sharded:
    """Torch's ring (``_templated_ring_attention``) with SDPA's CPU flash kernel on shards from
    ``_context_parallel_shard`` (head-tail load balancer), ``by_head_groups``, gathered by
    ``context_parallel_unshard``: the CPU check of what the GPU handlers run."""
    from torch.distributed.tensor.experimental._attention import (_context_parallel_shard, _HeadTailLoadBalancer,
                                                                  _templated_ring_attention, context_parallel_unshard)

    seq_len = work.ids.shape[1]
    with cp_options(load_balance, rotate):
        balancer = _HeadTailLoadBalancer(seq_len, rank.world_size, work.ids.device) if load_balance else None
        full_buffers = _buffers(work)
        buffers = _context_parallel_shard(mesh, full_buffers, [1] * len(full_buffers), load_balancer=balancer)
        q, k, v = work.qkv(*buffers)
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

        def ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return _templated_ring_attention(mesh.get_group(), 2, op, q, k, v, is_causal=work.causal)[0]

        def run() -> torch.Tensor:
            with torch.no_grad():
                return by_head_groups(ring, q, k, v, heads_per_call)

        measured, out = _measure(run, rank, reps, tensors_mb(q, k, v, *buffers), warmup, tensors_mb(*work.tables))
        (full,) = context_parallel_unshard(mesh, [out], [2], load_balancer=balancer)
    return Sharded(measured, full)


def cpu_api_probe(work: Workload, rank: Rank, mesh: Any) -> dict[str, Any]:
    """The public ``context_parallel`` block on CPU with SDPA's math kernel, non-causal,
    without load balancing (what torch 2.13 runs there), and the causal call it refuses.
    Returns {"noncausal": gathered output or the error, "causal_error": the error or None}."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard

    found: dict[str, Any] = {}
    for causal in (False, True):
        with cp_options(False, "allgather"):
            buffers = _buffers(work)
            try:
                with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers),
                                      no_restore_buffers=set(buffers)):
                    q, k, v = work.qkv(*buffers)
                    with torch.no_grad(), switch.sdpa_kernels(["math"]):
                        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                (full,) = context_parallel_unshard(mesh, [out], [2])
                found["causal_error" if causal else "noncausal"] = None if causal else full
            except Exception as exc:  # torch's own refusal, kept as evidence
                found["causal_error" if causal else "noncausal"] = f"{said(exc, 200)}"
    return found


def _model_forward(loaded: Any, ids: torch.Tensor, positions: torch.Tensor, sdpa_kernels: list[str] | None):
    def run() -> torch.Tensor:
        # SDPA is what torch's context parallel API shards: the model runs on it in this scope
        with torch.no_grad(), switch.using(loaded.model, "sdpa"), switch.sdpa_kernels(sdpa_kernels):
            out = loaded.model(input_ids=ids, position_ids=positions, use_cache=False)
        return select_output(out)

    return run


def model_single_device(loaded: Any, ids: torch.Tensor, rank: Rank, sdpa_kernels: list[str] | None, reps: int,
                        warmup: bool = True) -> Sharded:
    """The 1-device baseline: a causal LM (``models.LoadedModel``, on SDPA while it runs) over
    token ids [B, S]; output logits [B, S, V]."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
    measured, out = _measure(_model_forward(loaded, ids, positions, sdpa_kernels), rank, reps, None, warmup,
                             together=False)
    return Sharded(measured, out)


def sharded_model(loaded: Any, ids: torch.Tensor, rank: Rank, mesh: Any, *, sdpa_kernels: list[str] | None,
                  rotate: str, reps: int, warmup: bool = True, gather: bool = True,
                  reserve_bytes: int = 0) -> Sharded:
    """The same pass inside ``context_parallel``: token and position ids [B, S] sharded
    contiguously (no load balancing: ``problems``), every SDPA call a ring, logits
    [B, S / N, V] gathered to [B, S, V] unless ``gather=False``; ``reserve_bytes`` held first
    (``distributed.prepare_together``)."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard

    with cp_options(False, rotate):
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
        buffers = [ids.clone(), positions]
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1, 1], no_restore_buffers=set(buffers)):
            prepare_together(lambda: None, rank, reserve_bytes)
            measured, out = _measure(_model_forward(loaded, *buffers, sdpa_kernels), rank, reps, None, warmup)
        if not gather:
            return Sharded(measured, None)
        (full,) = context_parallel_unshard(mesh, [out.contiguous()], [1])
    return Sharded(measured, full)


# --- reference

def reference_rows(work: Workload, rows: torch.Tensor, device: str | None = None,
                   block_bytes: int = 1 << 30) -> torch.Tensor:
    """Attention in float64 (scale 1/sqrt(D), causal keys 0..row) at query positions ``rows``
    [R]: [B, H, R, D], in row blocks whose scores [B, H, r, S_kv] stay under ``block_bytes``;
    K and V held in float64 (2 x B x S_kv x H x D x 8 bytes)."""
    device = device or str(work.ids.device)
    tq, tk, tv = (t.to(device, torch.float64) for t in work.tables)
    k = tk[work.ids_kv.to(device)]  # [B, S_kv, H, D]
    v = tv[work.ids_kv.to(device)]
    b, s_kv, h, d = k.shape
    scale = 1.0 / math.sqrt(d)
    per_row = b * h * s_kv * 8
    step = max(1, block_bytes // per_row)
    rows = rows.to(device)
    keys = torch.arange(s_kv, device=device)
    out = []
    for start in range(0, rows.numel(), step):
        r = rows[start:start + step]
        q = tq[work.ids.to(device)[:, r]]  # [B, r, H, D]
        scores = torch.einsum("brhd,bshd->bhrs", q, k) * scale  # [B, H, r, S_kv]
        if work.causal:
            scores = scores.masked_fill(keys[None, None, None, :] > r[None, None, :, None], float("-inf"))
        out.append(torch.einsum("bhrs,bshd->bhrd", torch.softmax(scores, dim=-1), v))
    return torch.cat(out, dim=2)


def check_rows(seq_len: int, world_size: int, wanted: int) -> torch.Tensor:
    """Query positions judged: all when ``seq_len <= wanted``, else ``wanted`` evenly spaced
    plus the first and last of each of the 2 x world size chunks (where shards meet)."""
    if seq_len <= wanted:
        return torch.arange(seq_len)
    even = torch.linspace(0, seq_len - 1, wanted).round().long()
    chunk = seq_len // (2 * world_size)
    edges = torch.tensor([i * chunk + o for i in range(2 * world_size) for o in (0, chunk - 1)])
    return torch.unique(torch.cat([even, edges.clamp(0, seq_len - 1)]))
