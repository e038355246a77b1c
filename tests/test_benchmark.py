"""benchmark_attention.py on a CPU: the grid's rows, the autotuner's agreement, the plots."""

from conftest import run_script


def test_the_grid_writes_rows_json_and_plots(tmp_path):
    run = run_script("benchmark_attention.py", "--device", "cpu", "--shape", "1,4,2,16",
                     "--seq-len", "64", "--seq-len", "128", "--direction", "both", "--min-run-time", "0.04",
                     "--tune-time", "0.02", "--report-dir", str(tmp_path))
    assert run.rc in (0, 1), run.stderr  # the autotune check may fail on a busy CPU: figures, not verdicts
    data = run.result["data"]
    configs = {(a["shape"], a["seq_len"], a["causal"], a["direction"]) for a in data["autotune_by_config"]}
    assert len(configs) == 2 * 2 * 2  # S x causal x direction (one GQA shape: 4 query heads, 2 key/value)
    assert data["matmul_peak_tflops"]["float32"] > 0
    timed = [r for r in data["grid"] if r["latency_ms"] is not None]
    labels = {r["label"] for r in timed}
    assert {"eager", "sdpa[flash]", "sdpa[math]"} <= labels
    for r in timed:
        assert r["tflops"] > 0 and r["pct_of_matmul_peak"] > 0 and r["peak_memory_mb"] is not None
    passed = [r for r in timed if r["status"] == "passed"]
    assert passed and all(r["max_abs_err"] <= r["tolerance"] for r in passed)
    skipped = [r for r in data["grid"] if r["status"] == "skipped"]
    assert skipped and all(r["reason"] for r in skipped)
    for a in data["autotune_by_config"]:
        assert a["chosen"] and a["fastest"] and 0 < a["ratio"] <= 1.0 + 1e-9
    assert (tmp_path / "report.png").stat().st_size > 0 and (tmp_path / "memory.png").stat().st_size > 0
    assert (tmp_path / "report.json").is_file()


def test_a_bad_shape_is_one_line_and_exit_2():
    run = run_script("benchmark_attention.py", "--device", "cpu", "--shape", "8,32", "--no-report")
    assert run.rc == 2 and "--shape" in run.result["summary"] and "Traceback" not in run.stderr
    run = run_script("benchmark_attention.py", "--device", "cpu", "--max-seq-len-search", "--memory-limit", "8",
                     "--no-report")
    assert run.rc == 2 and "CUDA" in run.result["summary"]
