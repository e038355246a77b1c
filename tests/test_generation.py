"""profile_generation: prefill and decode with a KV cache, greedy agreement on a left-padded
batch, the longest context under a real memory limit; profile_attention --train; the
real-model-shaped demos. Real torch and transformers, tiny models; GPU tests skip without CUDA."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from attnkit import models
from attnkit.measure import generation as gen
from conftest import CTRL_C, ROOT, SCRIPTS, run_script

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def llama():
    return models.load("demo:llama", device="cpu", dtype=torch.float32)


def test_left_padded_greedy_tokens_of_sdpa_equal_eagers(llama):
    ids, mask, lengths = gen.left_padded(llama)
    assert len(lengths) == 4 and len(set(lengths)) == 4  # four prompts of different lengths
    for row, n in enumerate(lengths):  # padding on the left: zeros, then n ones
        assert mask[row].tolist() == [0] * (ids.shape[1] - n) + [1] * n
    base = gen.greedy(llama, "eager", "dynamic", ids, mask, 12)
    assert base.error is None and base.tokens.shape == (4, 12)
    for cache in gen.CACHES:
        cand = gen.greedy(llama, "sdpa", cache, ids, mask, 12)
        result = gen.agreement(llama, base, cand, ids, mask)
        assert result["agreement"] == 1.0 and result["divergences"] == [], (cache, result)


def test_a_backend_that_ignores_the_padding_is_caught(llama):
    """The same check fails when the padding mask is dropped: padded rows then attend to
    the pad tokens, and float32 allows no divergence, near-tie or not."""
    ids, mask, _ = gen.left_padded(llama)
    base = gen.greedy(llama, "eager", "dynamic", ids, mask, 12)
    broken = gen.greedy(llama, "sdpa", "dynamic", ids, torch.ones_like(mask), 12)
    result = gen.agreement(llama, base, broken, ids, mask)
    assert result["agreement"] < 1.0 and result["rows_differing"] >= 1
    assert 0 not in [d["row"] for d in result["divergences"]]  # row 0 has no padding: unaffected
    assert not any(d["near_tie"] for d in result["divergences"])  # judged against float64: a real error
    from attnkit.steps.profile_generation import agreement_check

    entries = {"sdpa": {"agreement": [result]}}
    assert not agreement_check(entries, torch.float32, None).passed
    assert not agreement_check(entries, torch.bfloat16, None).passed  # not a near-tie in half precision either


def test_teacher_forced_logits_of_sdpa_agree_at_every_step_and_a_dropped_mask_does_not(llama):
    """Every configuration is fed eager's tokens; each step's logits are judged against a
    float64 eager forward without a cache. SDPA with either cache passes every step; the
    same decoding with the padding mask dropped fails (padded rows attend to pad tokens)."""
    ids, mask, _ = gen.left_padded(llama)
    tokens = gen.greedy(llama, "eager", "dynamic", ids, mask, 8).tokens
    reference = gen.forced_reference(llama, ids, mask, tokens)
    base = gen.teacher_forced(llama, "eager", "dynamic", ids, mask, tokens)
    assert base.error is None and base.logits.shape == reference.shape == (4, 8, llama.model.config.vocab_size)
    for cache in gen.CACHES:
        result = gen.forced_agreement(base, gen.teacher_forced(llama, "sdpa", cache, ids, mask, tokens), reference,
                                      torch.float32)
        assert result["agreement"] == 1.0 and result["steps"] == 8, result
    broken = gen.teacher_forced(llama, "sdpa", "dynamic", ids, torch.ones_like(mask), tokens)
    result = gen.forced_agreement(base, broken, reference, torch.float32)
    assert result["agreement"] < 1.0 and result["worst_max_abs_err"] > result["worst_tolerance"]


def test_kv_cache_size_follows_the_formula_and_the_cache_object(llama):
    shape = llama.attention_shape()
    assert gen.kv_cache_bytes(shape, 10, 2, torch.float32) == 2 * 4 * 2 * 32 * 10 * 2 * 4
    run = gen.measure_generation(llama, "sdpa", batch_size=2, prompt_len=16, new_tokens=6, cache="static",
                                 min_run_time=0.05)
    assert run.error is None, run.error
    assert run.kv_cache_tokens == 16 + 6 and run.kv_cache_matches_formula
    assert run.kv_cache_measured_mb == pytest.approx(run.kv_cache_mb)


def test_the_search_finds_the_longest_length_that_fits_within_its_resolution():
    for threshold in (1, 700, 1000, 5000):
        found = gen.search_longest(lambda p, t=threshold: p <= t, cap=8000, start=512)
        assert found["max_context"] <= threshold < found["first_failure"]
        assert found["first_failure"] - found["max_context"] <= max(1, found["max_context"] // 64)
        assert all(p["prompt_len"] <= 8000 for p in found["probes"])
        assert all(p["fits"] == (p["prompt_len"] <= threshold) for p in found["probes"])
    capped = gen.search_longest(lambda p: True, cap=8000)
    assert capped == {"max_context": 8000, "first_failure": None, "capped": True,
                      "probes": [{"prompt_len": 8000, "fits": True}]}
    assert gen.search_longest(lambda p: False, cap=8000)["max_context"] == 0
    # context_parallel.py's search: lengths in multiples of the shard unit, to one unit or 1/64
    for threshold in (300, 70000, 600000):
        found = gen.search_longest(lambda s, t=threshold: s <= t, cap=2097152, start=65536, unit=256, name="seq_len")
        assert all(p["seq_len"] % 256 == 0 for p in found["probes"])
        assert found["max_context"] <= threshold < found["first_failure"]
        assert found["first_failure"] - found["max_context"] <= max(256, found["max_context"] // 64)


def test_step_reports_prefill_decode_and_agreement_for_eager_and_sdpa(tmp_path):
    saved = tmp_path / "chosen"
    run = run_script("profile_generation.py", "--prompt-len", "16", "--new-tokens", "16", "--batch-size", "1",
                     "--batch-size", "2", "--min-run-time", "0.3", "--report-dir", str(tmp_path / "run"),
                     "--save", str(saved))
    assert run.rc == 0, run.result["summary"] + json.dumps(run.result["checks"])
    data = run.result["data"]
    assert run.check("teacher_forced")["passed"]
    assert {(a["backend"], a["cache"], a["agreement"]) for e in data["backends"] for a in e["teacher_forced"]} == {
        (b, c, 1.0) for b in ("eager", "sdpa") for c in ("dynamic", "static")}
    assert data["bandwidth_gb_s"] > 0
    for r in (r for e in data["backends"] for r in e["runs"]):  # the floor: weights + KV cache over bandwidth
        assert r["decode_floor_ms"] > 0
        assert r["floor_percent"] == pytest.approx(100 * r["decode_floor_ms"] / r["decode_ms_per_token"])
    chosen = data["chosen"]  # the lowest request time among the configurations that passed, at P16 B1
    runs = {(r["backend"], r["cache"]): r for e in data["backends"] for r in e["runs"] if r["batch_size"] == 1}
    assert chosen["request_ms"] == pytest.approx(min(r["prefill_ms"] + 15 * r["decode_ms_per_token"]
                                                     for r in runs.values()))
    # the saved configuration applies: GenerationConfig reads it, and its code switches a fresh model
    from transformers import GenerationConfig

    assert data["saved_to"] == str(saved)
    config = GenerationConfig.from_pretrained(saved)
    assert config.cache_implementation == ("static" if chosen["cache"] == "static" else None)
    model = models.load("demo:llama", device="cpu", dtype=torch.float32).model
    model.set_attn_implementation("eager")
    exec((saved / "use_chosen.py").read_text(), {"model": model})
    assert model.config._attn_implementation == chosen["backend"]
    tmp_path = tmp_path / "run"
    assert [e["backend"] for e in data["backends"]] == ["eager", "sdpa"]  # nothing else runs on a CPU
    assert data["agreement_batch"]["padding"] == "left" and len(set(data["agreement_batch"]["prompt_lens"])) == 4
    for e in data["backends"]:
        assert e["greedy_agreement"] == 1.0
        assert {(r["batch_size"], r["cache"]) for r in e["runs"]} == {(1, "dynamic"), (1, "static"), (2, "dynamic"),
                                                                      (2, "static")}
        for r in e["runs"]:
            assert r["error"] is None
            assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["peak_memory_mb"] > 0
            assert r["decode_tokens_per_s"] == pytest.approx(r["batch_size"] * 1000 / r["decode_ms_per_token"])
            assert r["kv_cache_matches_formula"]
        for key in ("prefill_ms", "decode_ms_per_token", "decode_tokens_per_s", "peak_memory_mb"):
            assert e[key] > 0
        assert e["max_context"] is None  # not asked for
    eager, sdpa = data["backends"]
    assert all("aten::_softmax" in r["kernels"] for r in eager["runs"])
    assert all("aten::_scaled_dot_product_flash_attention_for_cpu" in r["kernels"] for r in sdpa["runs"])
    assert run.check("greedy_agreement")["passed"] and run.check("kernels")["passed"]
    assert (tmp_path / "report.png").stat().st_size > 0
    assert json.loads((tmp_path / "report.json").read_text())["data"]["backends"][1]["backend"] == "sdpa"


def test_max_context_stops_at_the_memory_limit_and_at_the_models_positions(tmp_path):
    # 8 new tokens and 0.2 s a timing: on a busy 2-core machine, 4 tokens timed for 0.05 s once left
    # decode unresolved (generate 22.7 ms, prefill 48.2 ms); the search caps at 4 new tokens either way
    run = run_script("profile_generation.py", "--model", "demo:gpt2", "--backends", "eager,sdpa", "--prompt-len", "16",
                     "--new-tokens", "8", "--batch-size", "1", "--cache", "dynamic", "--min-run-time", "0.2",
                     "--max-context", "--memory-limit", "0.25", "--no-report")
    assert run.rc == 0, run.result["summary"]
    eager, sdpa = run.result["data"]["backends"]
    e, s = eager["longest_context"], sdpa["longest_context"]
    for lc in (e, s):
        assert lc["memory_limit_gb"] == 0.25 and "RLIMIT_AS" in lc["enforced_by"]
        assert lc["cap"] == 4096 - 4 and "max_position_embeddings (4096)" in lc["cap_reason"]
    # eager's [B, H, S, S] scores hit the limit: it stops below the cap and says where it failed
    assert not e["capped"] and 0 < e["max_context"] < e["first_failure"] <= e["cap"]
    assert e["first_failure"] - e["max_context"] <= max(1, e["max_context"] // 64)
    assert all(p["fits"] == (p["prompt_len"] <= e["max_context"]) for p in e["probes"])
    # SDPA's kernel never forms the scores: the model's own positions are the cap
    assert s["capped"] and s["max_context"] == s["cap"] and s["first_failure"] is None
    assert eager["max_context"] == e["max_context"] and sdpa["max_context"] == s["max_context"]


def test_json_is_one_object_and_bad_input_is_one_line_exit_2():
    for args, phrase in ((["--new-tokens", "1"], "--new-tokens must be at least 2"),
                         (["--backends", "eager,nope"], "unknown backend nope"),
                         (["--cache", "paged"], "invalid choice: 'paged'"),
                         (["--model", "demo:bert"], "not a transformers causal language model"),
                         (["--prompt-len", "0"], "--prompt-len must be at least 1"),
                         (["--memory-limit", "2"], "add --max-context")):
        run = run_script("profile_generation.py", *args, "--no-report")
        assert run.rc == 2 and run.result["status"] == "error", args
        assert phrase in run.result["summary"] and "\n" not in run.result["summary"], run.result["summary"]
        assert "Traceback" not in run.stderr
    people = run_script("profile_generation.py", "--new-tokens", "1", json_mode=False)
    assert people.rc == 2 and people.stdout == ""
    assert people.stderr.strip().count("\n") == 0 and "error:" in people.stderr


def test_ctrl_c_keeps_what_was_measured(tmp_path):
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "profile_generation.py"), "--json", "--prompt-len", "16",
                             "--new-tokens", "6", "--batch-size", "1", "--cache", "dynamic", "--min-run-time", "0.05",
                             "--report-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **CTRL_C)
    for line in proc.stderr:
        if "sdpa: prompt 16" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err
    result = json.loads(out)
    assert result["status"] == "error" and "interrupted" in result["summary"]
    eager = result["data"]["backends"][0]
    assert eager["runs"][0]["prefill_ms"] > 0 and eager["greedy_agreement"] == 1.0  # measured before Ctrl-C: kept
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "error"


def test_training_row_reports_an_out_of_memory_backend_and_measures_the_others(tmp_path):
    """profile_attention --train under a real 1 GB address-space limit: eager's training pass
    keeps [1, 4, 4096, 4096] fp32 scores (256 MB) and more per layer for the backward and
    runs out (about 1.1 GB at its peak without a limit); SDPA's fused kernel keeps none
    (about 0.2 GB) and is measured. glibc is kept from holding on to what eager freed (a
    fixed mmap threshold) and from reserving an arena per thread, as the --max-context
    child does (``generation.steady_malloc``)."""
    cmd = [sys.executable, str(ROOT / "tests" / "run_limited.py"), "1000", "profile_attention.py", "--model",
           "demo:qwen2", "--train", "--seq-len", "4096", "--backends", "eager,sdpa", "--min-run-time", "0.05",
           "--json", "--no-report"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1"})
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)
    eager, sdpa = result["data"]["measurements"]
    assert eager["error"].startswith("out of memory") and eager["latency_ms"] is None
    assert sdpa["error"] is None and sdpa["latency_ms"] > 0 and sdpa["mode"] == "forward+backward"
    assert result["data"]["mode"] == "forward+backward"
    assert proc.returncode == 1 and "could not run" in result["summary"]


def test_training_peak_memory_counts_the_backward():
    loaded = models.load("demo:llama", device="cpu", dtype=torch.float32)
    from attnkit.measure import timing

    inputs = loaded.inputs(1, 256)
    fwd, _ = timing.measure_backend(loaded, inputs, "sdpa", min_run_time=0.05)
    loaded.model.train()
    train, out = timing.measure_backend(loaded, inputs, "sdpa", min_run_time=0.05, train=True, gradients=False)
    assert train.mode == "forward+backward" and out[1] == {}
    weights_mb = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**20
    # the backward allocates a gradient for every weight on top of the saved activations
    assert train.peak_memory_mb > fwd.peak_memory_mb + weights_mb
    assert all(p.grad is None for p in loaded.model.parameters())  # freed after each pass


def test_real_model_shaped_demos_have_the_published_shapes():
    from transformers import AutoModelForCausalLM

    expected = {"llama-2-7b": (6_738_415_616, 4096), "gpt2-medium": (354_823_168, 1024)}
    for name, (params, positions) in expected.items():
        config, family = models.DEMOS[name].build()
        assert family == "causal-lm"
        with torch.device("meta"):  # shapes only: the 7B model is never built on a CPU here
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == params
        assert config.max_position_embeddings == positions
    config, _ = models.DEMOS["llama-2-7b"].build()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.rms_norm_eps) == (4096, 32, 32, 32, 11008, 32000, 1e-5)
    config, _ = models.DEMOS["gpt2-medium"].build()
    assert (config.n_embd, config.n_layer, config.n_head, config.vocab_size) == (1024, 24, 16, 50257)


# ----------------------------------------------------------------------------- GPU (python -m pytest -m gpu)

@pytest.mark.gpu
@gpu
def test_gpu_generation_in_bf16_agrees_or_diverges_only_at_near_ties(tmp_path):
    run = run_script("profile_generation.py", "--device", "cuda", "--dtype", "bfloat16", "--prompt-len", "1024",
                     "--new-tokens", "16", "--min-run-time", "0.2", "--report-dir", str(tmp_path))
    assert run.rc == 0, run.result["summary"] + json.dumps(run.result["checks"])
    names = [e["backend"] for e in run.result["data"]["backends"]]
    assert names[:2] == ["eager", "sdpa"]
    for e in run.result["data"]["backends"]:
        assert e["prefill_ms"] > 0 and e["decode_ms_per_token"] > 0 and e["peak_memory_mb"] > 0
        for a in e["agreement"]:
            assert all(d["near_tie"] for d in a.get("divergences", [])), a
    assert (tmp_path / "report.png").exists()


@pytest.mark.gpu
@gpu
def test_gpu_max_context_stops_at_the_memory_fraction():
    run = run_script("profile_generation.py", "--device", "cuda", "--dtype", "bfloat16", "--backends", "eager,sdpa",
                     "--prompt-len", "64", "--new-tokens", "4", "--batch-size", "1", "--cache", "dynamic",
                     "--min-run-time", "0.05", "--max-context", "--memory-limit", "1", "--no-report")
    assert run.rc == 0, run.result["summary"]
    eager, sdpa = (e["longest_context"] for e in run.result["data"]["backends"])
    assert "set_per_process_memory_fraction" in eager["enforced_by"]
    # eager's [1, 8, 16384, 16384] bf16 scores alone are 4 GiB > 1 GB: it stops below the cap
    assert not eager["capped"] and eager["max_context"] < eager["first_failure"] <= eager["cap"]
    assert sdpa["capped"] and sdpa["max_context"] == sdpa["cap"] == 16384 - 4


@pytest.mark.gpu
@gpu
def test_gpu_training_row_per_backend():
    run = run_script("profile_attention.py", "--device", "cuda", "--dtype", "bfloat16", "--train", "--batch-size", "2",
                     "--seq-len", "2048", "--backends", "eager,sdpa", "--min-run-time", "0.2", "--no-report")
    rows = run.result["data"]["measurements"]
    assert [m["mode"] for m in rows] == ["forward+backward"] * 2
    assert all(m["error"] is None and m["latency_ms"] > 0 and m["peak_memory_mb"] > 0 for m in rows)
    assert rows[1]["peak_memory_mb"] < rows[0]["peak_memory_mb"]  # SDPA saves no [B, H, S, S] scores
