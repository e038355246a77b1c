"""context_parallel.py (issue 13): torch's context parallel API, its limits, the CPU check,
and enable_flash.py --device-map. Real torch, transformers and gloo processes; no mocks.

On CPU the step spawns 2 gloo processes (or runs under torchrun) and checks torch's ring
with SDPA's CPU flash kernel; the multigpu test runs it on 2 GPUs over NCCL and skips
where fewer are visible.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import SCRIPTS, run_script

# --device cpu: these are the CPU path's tests, also on a machine with GPUs
SMALL = ["--device", "cpu", "--heads", "4", "--head-dim", "32", "--seq-len", "256", "--reps", "1"]
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None
# --device-map on CPU: where a GPU is visible, enable_flash.py chooses the backend for the GPU
ON_CPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU test: here --device-map would use the GPUs")


def test_cpu_gloo_check_runs_torchs_ring_and_gathers_the_output():
    run = run_script("context_parallel.py", *SMALL, "--max-seq-len-search", "512")
    assert run.rc == 0, run.stderr[-2000:]
    r = run.result
    assert r["status"] == "pass", r["summary"]
    d = r["data"]
    assert (d["world_size"], d["backend"], d["launcher"], d["device"]) == (2, "gloo", "spawn", "cpu")
    assert d["causal"] and d["load_balance"] and d["rotate"] == "allgather"
    assert (d["heads_per_call"], d["ring_calls"]) == (1, 4)  # the default: torch's ring on one head at a time
    # torch's ring ran SDPA's CPU flash kernel on each rank, once per ring step (2) and head (4)
    assert run.check("kernels")["passed"]
    for rank in d["ranks"]:
        assert rank["kernels"] == {"aten::_scaled_dot_product_flash_attention_for_cpu": 8}
        assert rank["total_mb"] > 0 and rank["latency_ms"] > 0
    acc = d["accuracy"]
    assert acc["passed"] and acc["compared_positions"] > 0
    assert acc["max_abs_err"] <= acc["tolerance"]
    # the public block on CPU, recorded as evidence: math, non-causal, matches; causal refused by torch itself
    api = d["cpu_public_api"]
    assert api["matches"] and api["noncausal_math"].startswith("ran: max_abs_err")
    assert "mixed torch.Tensor and DTensor" in api["causal_math"]
    assert d["scaling_efficiency"] is not None and d["single_device"]["latency_ms"] > 0
    # the search (no out-of-memory on CPU): the cap, a multiple of 2 x world size x 64, ran on both
    search = d["max_seq_len"]
    assert search["unit"] == 256 and search["ratio"] == 1.0
    for where in ("one_device", "sharded"):
        assert search[where]["cap_reached"] and search[where]["longest"]["seq_len"] == 512
        assert search[where]["probes"] == [{"seq_len": 512, "fits": True}]
    assert "longest sequence: 512 on 1 device, 512 on 2 ranks" in r["summary"]


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_under_torchrun_only_rank_0_prints_and_alltoall_non_causal_match():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(SCRIPTS / "context_parallel.py"),
           *SMALL, "--no-causal", "--kv-len", "128", "--rotate", "alltoall", "--json"]
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        # Known flake, cause not found (2026-12-07): under the full suite's load on 2 cores, rank 0 died
        # with SIGABRT inside torchrun in 2 of 3 fresh-clone runs, never alone. One retry, for that only.
        if proc.returncode == 0 or "SIGABRT" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)  # exactly one object: rank 1 printed nothing on stdout
    assert result["status"] == "pass", result["summary"]
    d = result["data"]
    assert (d["launcher"], d["world_size"], d["load_balance"], d["rotate"]) == ("torchrun", 2, False, "alltoall")
    assert d["shape"]["kv_len"] == 128 and d["accuracy"]["passed"]


def test_a_bf16_merge_and_one_head_per_ring_call_each_hold_less_than_torchs_own_way():
    # bf16 on CPU: torch's own way is one ring call on all heads, merged in float32
    # (_cp_options.convert_to_f32): --heads-per-call 4. --merge-dtype input merges in bf16; the
    # step's default runs the ring once per head (4 calls). Each must match float64 and allocate
    # less than torch's own way.
    settings = {"torch": ["--heads-per-call", "4"], "bf16 merge": ["--heads-per-call", "4", "--merge-dtype", "input"],
                "1 head per call": []}
    runs = {name: run_script("context_parallel.py", *SMALL, "--dtype", "bfloat16", *args)
            for name, args in settings.items()}
    for name, run in runs.items():
        assert run.rc == 0 and run.result["status"] == "pass", (name, run.result["summary"], run.stderr[-2000:])
        d = run.result["data"]
        assert d["accuracy"]["passed"]
        assert ("in bfloat16" if name == "bf16 merge" else "in float32") in d["memory_explained"]
    per_head = runs["1 head per call"].result["data"]
    assert (per_head["heads_per_call"], per_head["ring_calls"]) == (1, 4)
    assert "one of 4 ring calls on 1 of 4 heads" in per_head["memory_explained"]
    for r in per_head["ranks"]:  # 2 ring steps per call, 4 calls
        assert r["kernels"] == {"aten::_scaled_dot_product_flash_attention_for_cpu": 8}
    assert runs["torch"].result["data"]["ring_calls"] == 1
    peak = {name: max(r["peak_memory_mb"] for r in run.result["data"]["ranks"]) for name, run in runs.items()}
    assert peak["bf16 merge"] < peak["torch"] and peak["1 head per call"] < peak["torch"], peak


def _prepare_on_rank(index: int, port: int, queue) -> None:
    from attnkit.measure import distributed as dd

    rank = dd.join("cpu", rank=index, world_size=2, init_method=f"tcp://127.0.0.1:{port}", launcher="spawn")
    try:
        failed = []
        # rank 1 asks the CPU allocator for 4 EiB: a real out-of-memory error, on one rank only
        size = (1 << 62) if rank.rank == 1 else 16
        try:
            dd.prepare_together(lambda: torch.empty(size, dtype=torch.uint8), rank)
        except Exception as exc:
            failed.append(type(exc).__name__)
        ok = dd.prepare_together(lambda: torch.ones(4), rank)  # the next round: every rank in step
        t = torch.tensor([rank.rank + 1.0])
        torch.distributed.all_reduce(t)
        queue.put((rank.rank, failed, ok.sum().item(), t.item()))
    finally:
        dd.leave()


def test_out_of_memory_on_one_rank_before_the_ring_fails_every_rank_and_leaves_them_in_step():
    # a rank out of memory inside torch's ring left the other waiting in NCCL (a search hung on
    # 2 H200s); prepare_together makes every rank fail together before the first collective
    import torch.multiprocessing as mp
    from attnkit.measure import distributed as dd

    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_prepare_on_rank, args=(dd.free_port(), queue), nprocs=2, join=True)
    got = sorted(queue.get() for _ in range(2))
    assert got == [(0, ["PeerOutOfMemory"], 4.0, 3.0), (1, ["RuntimeError"], 4.0, 3.0)], got


LIMITS = [
    (["--sdpa-kernel", "math"], "runs only SDPA's flash, efficient, cudnn kernels"),
    (["--attn-mask"], "takes no attn_mask"),
    (["--kv-len", "128"], "causal attention under context parallel needs q_len == kv_len"),
    (["--no-causal", "--load-balance"], "--load-balance needs causal attention"),
    (["--seq-len", "258", "--load-balance"], "needs seq_len divisible by 2 x world size = 4"),
    (["--seq-len", "257", "--no-load-balance"], "is not divisible by the world size 2"),
    (["--rotate", "ring"], "invalid choice: 'ring'"),
    (["--merge-dtype", "bf16"], "invalid choice: 'bf16'"),
    (["--heads-per-call", "0"], "--heads-per-call must be at least 1, not 0"),
    (["--model", "demo:llama", "--heads-per-call", "1"], "--heads-per-call applies to the attention workload only"),
    (["--model", "demo:llama", "--load-balance", "--device", "cuda"], None),
]


@pytest.mark.parametrize("args,words", LIMITS, ids=[" ".join(a) for a, _ in LIMITS])
def test_each_limit_of_the_api_is_one_line_and_exit_2(args, words):
    if words is None:  # the transformers limit: checked where the device exists, else the device is refused
        words = "--load-balance with --model" if torch.cuda.is_available() else "cuda"
    device = [] if "--device" in args else ["--device", "cpu"]  # 2 spawned processes: the same world size anywhere
    run = run_script("context_parallel.py", "--heads", "4", "--head-dim", "32", *device, *args)
    assert run.rc == 2 and run.result["status"] == "error", run.result
    assert words in run.result["summary"] and "\n" not in run.result["summary"]
    assert "Traceback" not in run.stderr


def test_a_model_on_cpu_is_a_skip_with_the_reason():
    run = run_script("context_parallel.py", "--model", "demo:llama", "--device", "cpu")
    assert run.rc == 0 and run.result["status"] == "skip"
    assert "needs CUDA GPUs" in run.result["summary"]


def test_head_tail_positions_become_a_mask_in_transformers():
    """Why --model needs --no-load-balance: the head-tail order hands rank 0 positions
    [0..k) + [3k..4k), which transformers reads as packed sequences and masks, and the
    API takes no mask; contiguous shards keep is_causal and no mask."""
    import torch.nn.functional as F
    from attnkit import models
    from attnkit.swap import switch

    loaded = models.load("demo:llama", device="cpu", dtype=torch.float32)
    switch.apply(loaded.model, "sdpa")
    seen, original = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((attn_mask is not None, kw.get("is_causal")))
        return original(q, k, v, attn_mask=attn_mask, **kw)

    ids = torch.randint(0, 100, (1, 8))  # rank 0's 8 of 16 tokens, 2 ranks: chunks 0 and 3 of 4 when balanced
    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            for positions in (torch.arange(8, 16), torch.cat([torch.arange(0, 4), torch.arange(12, 16)])):
                loaded.model(input_ids=ids, position_ids=positions[None], use_cache=False)
    finally:
        F.scaled_dot_product_attention = original
    layers = loaded.model.config.num_hidden_layers
    assert seen[:layers] == [(False, True)] * layers  # contiguous: no mask, is_causal
    assert all(mask and not causal for mask, causal in seen[layers:])  # load-balanced: a mask


def test_the_module_by_module_float64_reference_equals_the_whole_model_one():
    from attnkit import models
    from attnkit.measure import accuracy

    loaded = models.load("demo:llama", device="cpu", dtype=torch.bfloat16)
    inputs = loaded.inputs(1, 32)
    whole = accuracy.reference_output(loaded, inputs)
    before = {n: p.clone() for n, p in loaded.model.named_parameters()}
    with accuracy.exact_cast_per_module(loaded.model), torch.inference_mode():
        per_module = loaded.forward(inputs.cast(torch.float64)).double()
    assert torch.equal(whole, per_module)
    for n, p in loaded.model.named_parameters():  # restored bit for bit, still ordinary tensors
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]) and not p.is_inference()


@ON_CPU
@pytest.mark.skipif(not HAS_ACCELERATE, reason="accelerate is not installed (pip install accelerate)")
def test_device_map_auto_on_cpu_loads_switches_and_proves():
    run = run_script("enable_flash.py", "--device-map", "auto", "--max-memory", "cpu=2GiB", "--seq-len", "128",
                     "--min-run-time", "0.1", "--no-report")
    # switch, kernels and accuracy prove it; speed at seq_len 128 on a shared CPU is a benchmark's matter
    checks = {c["name"]: c["passed"] for c in run.result["checks"]}
    assert checks["switch"] and checks["kernels"] and checks["accuracy"], run.result["summary"]
    d = run.result["data"]
    assert d["device_map"] == {"": "cpu"} and d["devices"] == ["cpu"]
    assert d["accuracy"]["passed"] and any("--device-map auto" in n for n in d["notes"])


@ON_CPU
@pytest.mark.skipif(not HAS_ACCELERATE, reason="accelerate is not installed (pip install accelerate)")
def test_device_map_that_needs_the_disk_is_refused_in_one_line():
    run = run_script("enable_flash.py", "--device-map", "auto", "--max-memory", "cpu=1MiB", "--no-report")
    assert run.rc == 2 and "does not fit in --max-memory" in run.result["summary"]


@pytest.mark.skipif(HAS_ACCELERATE, reason="accelerate is installed")
def test_device_map_without_accelerate_is_refused_in_one_line():
    run = run_script("enable_flash.py", "--device-map", "auto", "--max-memory", "cpu=2GiB", "--no-report")
    assert run.rc == 2 and "--device-map needs accelerate" in run.result["summary"]


@pytest.mark.parametrize("args,words", [
    (["--max-memory", "cpu=2GiB"], "--max-memory needs --device-map"),
    (["--device-map", "auto", "--max-memory", "gpu=2"], "is not DEVICE=SIZE"),
    (["--device-map", "auto", "--device", "cpu"], "the map places the model"),
    (["--device-map", "everywhere"], "invalid choice"),
])
def test_device_map_arguments_are_checked_first(args, words):
    run = run_script("enable_flash.py", *args, "--no-report")
    assert run.rc == 2 and words in run.result["summary"]


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")
def test_two_gpus_match_one_and_each_rank_holds_its_half():
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(SCRIPTS / "context_parallel.py"), "--seq-len", "16384",
                           "--rotate", "alltoall", "--json"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "pass", result["summary"]
    d = result["data"]
    assert d["backend"] == "nccl" and d["accuracy"]["passed"]
    assert all(r["kernels"] for r in d["ranks"]) and d["scaling_efficiency"] > 0
    # each rank holds its half of q, k, v (the ids are sharded; inputs are resident before the call)
    single = d["single_device"]["resident_mb"]
    for r in d["ranks"]:
        assert r["total_mb"] > 0 and abs(r["resident_mb"] - single / 2) <= 0.1 * single
    # the default, torch's ring on one head at a time: below the 3/4 of one GPU's memory that a
    # ring on all heads at once needs at least (its q/k/v/output shards and one peer K/V shard)
    assert d["heads_per_call"] == 1 and d["memory_ratio"] < 0.75, d["memory_explained"]


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")
def test_device_map_auto_spreads_a_model_over_two_gpus_and_proves_the_switch():
    # 300 MiB on GPU 0 cannot hold demo:gpt2-medium's bf16 weights (about 0.7 GB): the rest goes to GPU 1
    run = run_script("enable_flash.py", "--model", "demo:gpt2-medium", "--device-map", "auto",
                     "--max-memory", "0=300MiB,1=20GiB", "--seq-len", "1024", "--no-report")
    # the switch is proven as on one GPU; speed at this size is close to a tie (a benchmark's matter, not a test's)
    checks = {c["name"]: c["passed"] for c in run.result["checks"]}
    assert checks["switch"] and checks["kernels"] and checks["accuracy"], (run.result["summary"], run.stderr[-3000:])
    d = run.result["data"]
    assert {"cuda:0", "cuda:1"} <= set(d["devices"])
    assert set(d["baseline"]["peak_memory_by_device"]) >= {"cuda:0", "cuda:1"}
