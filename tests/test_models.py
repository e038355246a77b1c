"""Model specs, loading, inputs and outputs."""

import pytest
import torch
from attnkit import models
from attnkit.report import CannotRun
from conftest import MODELS


@pytest.mark.parametrize("spec,kind", [
    ("demo:llama", "demo"), ("tests/models/zoo.py:mha", "factory"), ("attnkit.models:minilm_path", "factory"),
    ("meta-llama/Llama-3.2-1B", "hub"), ("gpt2", "hub"), (".", "folder"),
])
def test_specs_are_told_apart(spec, kind):
    assert models.classify(spec) == kind


@pytest.mark.parametrize("spec", ["./missing", "/no/such/dir", "a/b/c", "~/nothing-here", "weights.py"])
def test_missing_paths_are_reported_as_paths(spec):
    with pytest.raises(CannotRun, match="does not exist"):
        models.classify(spec)


def test_row_lengths_pad_the_later_rows():
    assert models.row_lengths(1, 100, 0.5) == [100]
    assert models.row_lengths(4, 100, 0.5) == [100, 83, 67, 50]
    assert models.row_lengths(3, 10, 0.0) == [10, 10, 10]


def test_demo_inputs_mark_padding_and_real_tokens():
    loaded = models.load("demo:llama", device="cpu", dtype=torch.float32)
    assert loaded.family == "causal-lm" and loaded.original_backend == "eager"
    inputs = loaded.inputs(3, 64, 0.5)
    assert inputs.kwargs["input_ids"].shape == (3, 64)
    assert inputs.valid.sum(1).tolist() == [64, 48, 32]
    assert inputs.padding_positions == 48
    assert (inputs.kwargs["attention_mask"].bool() == inputs.valid).all()
    out = loaded.forward(inputs)
    assert out.shape == (3, 64, loaded.text_config.vocab_size)  # logits [B, S, V]


def test_minilm_reads_real_text_through_its_tokenizer(minilm_dir):
    loaded = models.load(str(minilm_dir), device="cpu", dtype=torch.float32)
    assert loaded.tokenizer is not None and loaded.family == "encoder"
    inputs = loaded.inputs(2, 32)
    ids = inputs.kwargs["input_ids"]
    assert ids[0, 0].item() == loaded.tokenizer.cls_token_id
    text = loaded.tokenizer.decode(ids[0, 1:10])
    assert "attention" in text
    assert loaded.forward(inputs).shape == (2, 32, 384)  # last_hidden_state [B, S, hidden]


def test_factory_inputs_follow_the_first_module():
    loaded = models.load(f"{MODELS / 'zoo.py'}:mha", device="cpu", dtype=torch.float32)
    assert loaded.family == "module"
    (x,) = loaded.inputs(2, 8).args
    assert x.shape == (2, 8, 32) and x.dtype == torch.float32


def test_factory_example_inputs_are_used(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import torch\n"
                    "def build():\n    return torch.nn.Linear(6, 6)\n"
                    "def example_inputs(batch_size, seq_len):\n    return (torch.ones(batch_size, seq_len, 6),)\n")
    loaded = models.load(f"{path}:build", device="cpu", dtype=torch.bfloat16)
    (x,) = loaded.inputs(3, 5).args
    assert x.shape == (3, 5, 6) and x.dtype == torch.bfloat16  # cast to the run's dtype


def test_select_output_prefers_logits_then_hidden_states():
    t = torch.ones(1)
    assert models.select_output(t) is t
    assert models.select_output({"last_hidden_state": t, "pooler_output": torch.zeros(1)}) is t
    assert models.select_output((t, torch.zeros(1))) is t
    with pytest.raises(CannotRun):
        models.select_output({"loss": 1.0})
