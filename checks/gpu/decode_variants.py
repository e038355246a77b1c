"""Where compiled static decode spends its time (checks/gpu/run.sh, step 1; not part of the skill).

For ``SPEC`` (default demo:llama-1b) on ``DEV`` (cuda) at prompt ``P`` (8192), batch ``B`` (1):
``generate`` with a static cache and transformers' compiled decode step, for each
``PLAN`` entry impl:cache:compile (cache ``own``: a StaticCache passed in, as
measure.generation does; ``hf``: generation_config.cache_implementation = "static").
impl ``gqa_sdpa`` / ``gqa_math`` run single-query decode with the query heads of one KV
head packed as query rows ([B, H_kv, G, D]: no repeat_kv copy of K and V), through SDPA or
through matmul-softmax-matmul. Reports prefill ms, decode ms/token = (generate(N) -
generate(1)) / (N - 1), the steady-state decode from N and N + 64 tokens, % of the memory
floor (measure.generation's formula) and GPU time per kernel; writes $OUT/decode_diag.json.
"""
import json, os, statistics, sys, time, traceback
import torch
sys.path.insert(0, "scripts")
from attnkit.models.loading import load
from attnkit.measure.generation import generation_config, copy_bandwidth, weight_bytes_per_token
from transformers import AttentionInterface, StaticCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

OUT = os.environ.get("OUT", "/tmp")
P = int(os.environ.get("P", 8192)); B = int(os.environ.get("B", 1)); N = 33


def fold(query, key):
    b, h, s, d = query.shape
    g = h // key.shape[1]
    return query.reshape(b, key.shape[1], g * s, d), g


def unfold(out, b, h, s):
    # out [B, Hkv, G*S, D] -> [B, S, H, D]
    d = out.shape[-1]
    return out.reshape(b, h, s, d).transpose(1, 2)


def packed(attend):
    """An attention function that runs single-query decode as ``attend(q, k, v, mask, scale)``
    on the query heads of each KV head packed as rows, q [B, H_kv, G, D]; transformers' SDPA
    function otherwise."""
    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        b, h, s, d = query.shape
        if s > 1 or attention_mask is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kw)
        q, _ = fold(query, key)
        out = attend(q, key, value, attention_mask[:, :, -1:, : key.shape[-2]], scaling or d ** -0.5)
        return unfold(out, b, h, s).contiguous(), None
    return forward


def math_attend(q, k, v, m, scale):
    sc = torch.matmul(q, k.transpose(-1, -2)) * scale
    sc = sc.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else sc + m
    return torch.matmul(torch.softmax(sc.float(), dim=-1).to(v.dtype), v)


gqa_sdpa = packed(lambda q, k, v, m, scale: torch.nn.functional.scaled_dot_product_attention(
    q, k, v, attn_mask=m, scale=scale))
gqa_math = packed(math_attend)


for name, fn in (("gqa_sdpa", gqa_sdpa), ("gqa_math", gqa_math)):
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)

DEV = os.environ.get("DEV", "cuda")
loaded = load(os.environ.get("SPEC", "demo:llama-1b"), device=DEV, dtype=torch.bfloat16 if DEV == "cuda" else torch.float32)
model = loaded.model
ids = torch.randint(100, 1000, (B, P), device=DEV)
mask = torch.ones_like(ids)
bw = copy_bandwidth(DEV)
wb = weight_bytes_per_token(model)
sh = loaded.attention_shape()
kvb = 2 * sh["layers"] * sh["kv_heads"] * sh["head_dim"] * (2 if DEV == "cuda" else 4) * (P + N / 2) * B
floor = (wb + kvb) / bw * 1e3
results = {"bandwidth_gb_s": bw / 1e9, "weights_mb": wb / 2**20, "floor_ms": floor, "P": P, "B": B, "runs": []}
print("floor ms", floor, flush=True)


def gen(n, cache_mode, compile_):
    gc = generation_config(loaded, n, compile=compile_)
    kw = {}
    if cache_mode == "own":
        kw["past_key_values"] = StaticCache(config=model.config, max_cache_len=P + N + 64)
    else:
        gc.cache_implementation = "static"
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=gc, **kw)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps=5):
    ts = []
    for _ in range(reps):
        sync(); t = time.perf_counter(); fn(); sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), ts


def variant(impl, cache_mode, compile_):
    r = {"impl": impl, "cache": cache_mode, "compile": compile_}
    model.set_attn_implementation(impl)
    t0 = time.perf_counter()
    gen(N + 64, cache_mode, compile_); gen(1, cache_mode, compile_); gen(N, cache_mode, compile_)
    r["warmup_s"] = time.perf_counter() - t0
    g1, _ = timed(lambda: gen(1, cache_mode, compile_))
    gN, tsN = timed(lambda: gen(N, cache_mode, compile_))
    r["prefill_ms"], r["generate_ms"], r["decode_ms"] = g1, gN, (gN - g1) / (N - 1)
    r["floor_pct"] = 100 * floor / r["decode_ms"]
    gL, _ = timed(lambda: gen(N + 64, cache_mode, compile_), reps=3)
    r["steady_decode_ms"] = (gL - gN) / 64
    r["steady_floor_pct"] = 100 * floor / r["steady_decode_ms"]
    # profile one generate of N tokens: GPU kernel time by name
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen(N, cache_mode, compile_); sync()
    rows = sorted(((e.key[:110], e.count, e.self_device_time_total / 1e3) for e in prof.key_averages()
                   if e.self_device_time_total > 0), key=lambda x: -x[2])
    r["gpu_ms_total"] = sum(x[2] for x in rows)
    r["top_kernels"] = rows[:25]
    cpu = sorted(((e.key[:80], e.count, e.cpu_time_total / 1e3) for e in prof.key_averages()), key=lambda x: -x[2])
    r["top_cpu"] = cpu[:15]
    print(json.dumps({k: v for k, v in r.items() if k not in ("top_kernels", "top_cpu")}), flush=True)
    for row in rows[:12]:
        print("   ", row, flush=True)
    return r


plan = [x.split(":") for x in os.environ.get("PLAN", "sdpa:own:1,sdpa:hf:1,gqa_sdpa:hf:1,gqa_math:hf:1").split(",")]
for impl, cache_mode, c in plan:
    try:
        results["runs"].append(variant(impl, cache_mode, c == "1"))
    except Exception as e:
        traceback.print_exc()
        results["runs"].append({"impl": impl, "cache": cache_mode, "compile": c, "error": repr(e)[:800]})
    torch._dynamo.reset()
    json.dump(results, open(f"{OUT}/decode_diag.json", "w"), indent=1)
