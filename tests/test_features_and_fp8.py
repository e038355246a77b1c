"""check_features (workflow 2); fp8_attention (workflow 3) is tests/test_fp8.py."""

from attnkit.backends import BACKENDS
from conftest import FAST, MODELS, ROOT, run_script


def test_sdpa_is_proved_on_gqa_sliding_window_and_padding(tmp_path):
    run = run_script("check_features.py", "--model", "demo:mistral", "--backend", "sdpa", "--report-dir",
                     str(tmp_path))
    assert run.rc == 0 and run.result["status"] == "pass", run.result["summary"]
    needed = run.result["data"]["needed"]
    assert set(needed) == {"gqa", "sliding_window", "padding"}
    assert "(exercised)" in needed["sliding_window"]  # seq_len 256 > window 64
    assert run.check("accuracy")["passed"] and run.result["data"]["accuracy"]["padding_positions"] > 0


def test_a_backend_that_cannot_run_here_is_skipped_with_the_reason():
    run = run_script("check_features.py", "--backend", "flash_attention_2", "--dtype", "bfloat16", "--no-report")
    if run.result["status"] != "skip":  # a machine where flash-attn runs proves it instead
        assert run.result["status"] == "pass"
        return
    assert run.rc == 0
    assert "cannot run here to prove it" in run.result["summary"]
    rows = {r["feature"]: r for r in run.result["data"]["features"]}
    assert rows["gqa"]["needed"] and rows["gqa"]["supported"] and "flash_attn_func docstring" in rows["gqa"]["source"]


def test_a_needed_feature_the_backend_lacks_fails():
    run = run_script("check_features.py", "--model", f"{MODELS / 'zoo.py'}:gemma2_softcap", "--backend", "sdpa",
                     "--no-report")
    assert run.rc == 1 and run.result["status"] == "fail"
    assert "sdpa lacks softcap" in run.check("supported")["evidence"]


def test_the_reference_table_agrees_with_the_code():
    """references/advanced-features.md's support table says what the backend records say."""
    text = (ROOT / "references" / "advanced-features.md").read_text()
    table = text.split("## Which backend provides what", 1)[1].split("\n\n", 2)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    names = {"GQA / MQA (fewer key/value heads)": "gqa", "sliding window": "sliding_window", "padding": "padding",
             "logit soft-capping": "softcap", "ALiBi": "alibi", "attention dropout": "dropout"}
    for row in rows:
        feature = names[row[0]]
        for backend, cell in zip(("sdpa", "flash_attention_2", "flash_attention_3"), row[1:]):
            documented = cell.startswith("yes")
            assert documented == BACKENDS[backend].supports(feature).supported, (feature, backend, cell)


def test_check_features_on_the_default_model_needs_gqa_and_padding():
    run = run_script("check_features.py", "--no-report", *FAST[:0])
    assert set(run.result["data"]["needed"]) == {"gqa", "padding"}
