"""Hand-written wide models, eager against the swap (checks/gpu/run.sh, step 2; not part of the skill).

``PLAN``: style:target:S entries of tests/models/graph_styles.py's ``build_<style>_wide``
(d_model 1024, 16 heads, 2 blocks), batch 2, bf16 on CUDA. For each: median forward ms
(torch.utils.benchmark), peak MB, GPU ms per forward and the top kernels and CPU ops of
five profiled forwards, eager and swapped; writes $OUT/wide_diag.json.
"""
import json, os, sys, traceback
import torch
sys.path.insert(0, "scripts")
from torch.utils import benchmark
from attnkit.steps.session import open_session
from attnkit.measure.timing import forward_fn
from attnkit.swap import switch

OUT = os.environ.get("OUT", "/tmp"); DEV = os.environ.get("DEV", "cuda")
res = []
for item in os.environ.get("PLAN", "alibiarange:flex_attention:1024,alibiarange:flex_attention:4096").split(","):
    style, tgt, S = item.split(":"); S = int(S)
    r = {"style": style, "target": tgt, "S": S}
    try:
        s = open_session(f"tests/models/graph_styles.py:build_{style}_wide", device=DEV,
                         dtype="bfloat16" if DEV == "cuda" else "float32", batch_size=2, seq_len=S, target=tgt)
        fwd = forward_fn(s.loaded, s.inputs)
        for be in ("eager", tgt):
            with switch.using(s.loaded.model, be):
                for _ in range(3):
                    fwd()
                if DEV == "cuda":
                    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
                m = benchmark.Timer("f()", globals={"f": fwd}).blocked_autorange(min_run_time=1.0)
                r[f"{be}_ms"] = m.median * 1e3
                if DEV == "cuda":
                    r[f"{be}_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                from torch.profiler import profile, ProfilerActivity
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
                with profile(activities=acts) as prof:
                    for _ in range(5):
                        fwd()
                    if DEV == "cuda":
                        torch.cuda.synchronize()
                ka = prof.key_averages()
                r[f"{be}_gpu_ms_per_fwd"] = sum(e.self_device_time_total for e in ka) / 5e3
                r[f"{be}_kernels"] = sorted(((e.key[:90], e.count // 5, round(e.self_device_time_total / 5e3, 4))
                                             for e in ka if e.self_device_time_total > 0), key=lambda x: -x[2])[:12]
                r[f"{be}_cpu_top"] = sorted(((e.key[:70], e.count // 5, round(e.self_cpu_time_total / 5e3, 4))
                                             for e in ka), key=lambda x: -x[2])[:10]
        r["speedup"] = r["eager_ms"] / r[f"{tgt}_ms"]
    except Exception as e:
        traceback.print_exc(); r["error"] = repr(e)[:600]
    print(json.dumps({k: v for k, v in r.items() if not k.endswith(("kernels", "cpu_top"))}), flush=True)
    res.append(r)
    json.dump(res, open(f"{OUT}/wide_diag.json", "w"), indent=1)
