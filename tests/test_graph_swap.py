"""The graph path (swap/graph.py, issue 20): hand-written attention that the source matcher
refuses is found in a graph captured with torch.compile, matched by data flow, rewritten to
SDPA, and proven site by site like every other swap.

Every style of tests/models/graph_styles.py is refused by the source matcher, or its rewrite
fails the per-site trial (the 'before', checked by the first test); the graph path must swap
those it can express and refuse those it cannot, naming the construct and its line.
"""

import pytest
import torch
from attnkit.steps.session import open_session
from attnkit.swap import graph, scan
from attnkit.swap.live import Swapper
from conftest import FAST, MODELS, run_script
from models import graph_styles as G

STYLES_FILE = MODELS / "graph_styles.py"
FUSED = "aten::_scaled_dot_product_flash_attention_for_cpu"
SWAP = sorted(n for n, (_, want) in G.STYLES.items() if want == "swap")
REFUSED = sorted(n for n, (_, want) in G.STYLES.items() if want != "swap")
#: read by the source matcher, whose rewrite the per-site trial rejects: ArithmeticMask's raises
#: NameError 'm'; RelativeLogits' runs SDPA's math kernel (v narrower than q, k); CosineTau's
#: and CosineProjected's pass a tensor as SDPA's scale (TypeError); SummedProducts' forms the second product
#: as an [S_q, S_k] attn_mask, so the graph path is preferred. The graph path takes all five (test below).
SOURCE_READS = {"ArithmeticMask", "RelativeLogits", "CosineTau", "CosineProjected", "SummedProducts"}
#: swapped by the source matcher's own rewrite, and proven: the graph path is checked on them alone
#: (test below). ViewAsMask's fills the scores in place, which the source rewrite replays on a real
#: zero tensor (on an expanded one, one write reached every element: outputs differed by 0.15).
SOURCE_TAKES = {"ViewAsMask", "ChannelsFirst"}


@pytest.mark.parametrize("style", SWAP)
def test_each_style_is_the_attention_sdpa_computes(style):
    torch.manual_seed(0)
    module = G.STYLES[style][0]().eval()
    x, mask = G.example_inputs(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(x, mask), module.sdpa(x, mask), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("style", sorted(G.STYLES))
def test_the_source_matcher_alone_swaps_none_of_them(style):
    """The 'before': without the graph path each style is refused (or its rewrite raises)."""
    model = getattr(G, f"build_{style.lower()}")().eval()
    x, mask = G.example_inputs(2, 32)
    swapper = Swapper(model, register=False)
    swapper.graph_path = False
    sites = swapper.discover(lambda: model(x, mask))
    taken = [s for s in sites if s in swapper.swappable()]
    if style in SOURCE_READS | SOURCE_TAKES:  # read (its rewrite may fail the trial: see above)
        assert taken and taken[0].path == "source"
    else:
        assert not taken and all(s.reason for s in sites), [(s.line, s.reason) for s in sites]


@pytest.mark.parametrize("style", sorted(SOURCE_TAKES))
def test_styles_the_source_rewrite_takes_are_proven_and_the_graph_path_takes_them_too(style, tmp_path):
    run = run_script("enable_flash.py", "--model", f"{STYLES_FILE}:build_{style.lower()}", "--backend", "sdpa",
                     "--device", "cpu", "--dtype", "float32", "--seq-len", "128", "--no-report", *FAST)
    assert run.check("accuracy")["passed"], run.check("accuracy")
    assert all(s["path"] == "source" and s["status"] == "swapped" for s in run.result["data"]["sites"])
    torch.manual_seed(0)
    module = G.STYLES[style][0]().eval()
    x, mask = G.example_inputs(2, 64)
    capture = graph.Capture(module)
    capture.run((x, mask), {})
    (site,) = capture.sites.values()
    assert site.swappable and capture.rewritten, site.reason
    with torch.no_grad():
        torch.testing.assert_close(capture(x, mask), module(x, mask), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("style", sorted(set(SWAP) - SOURCE_TAKES))
def test_each_style_is_swapped_by_the_graph_path_and_proven(style, tmp_path):
    run = run_script("enable_flash.py", "--model", f"{STYLES_FILE}:build_{style.lower()}", "--backend", "sdpa",
                     "--device", "cpu", "--dtype", "float32", "--seq-len", "128", "--report-dir", str(tmp_path),
                     *FAST)
    res = run.result
    assert run.check("switch")["passed"], run.check("switch")
    assert run.check("accuracy")["passed"], run.check("accuracy")
    assert run.check("kernels")["passed"], run.check("kernels")
    sites = res["data"]["sites"]
    assert len(sites) == 2 and all(s["status"] == "swapped" for s in sites), [(s["status"], s["reason"]) for s in sites]
    assert all(s["path"] == "graph" and s["runtime_only"].startswith("run-time only") for s in sites)
    assert all(s["kernel_after"] == FUSED and s["accuracy"]["passed"] for s in sites)
    assert FUSED in res["data"]["candidate"]["kernels"] and "aten::_softmax" not in res["data"]["candidate"]["kernels"]
    assert res["data"]["patch"] == ""  # run-time only: no source patch


@pytest.mark.parametrize("style", REFUSED)
def test_what_sdpa_cannot_express_is_refused_naming_the_construct_and_its_line(style):
    run = run_script("enable_flash.py", "--model", f"{STYLES_FILE}:build_{style.lower()}", "--backend", "sdpa",
                     "--device", "cpu", "--dtype", "float32", "--seq-len", "128", "--no-report", *FAST)
    assert run.rc == 2
    summary = run.result["summary"]
    assert G.STYLES[style][1] in summary and "line " in summary, summary
    model = getattr(G, f"build_{style.lower()}")()
    assert model(*G.example_inputs(2, 32)).shape == (2, 32, G.D_MODEL)  # the model keeps working


def test_the_matcher_reads_scale_mask_and_layout_from_the_data_flow():
    session = open_session(f"{STYLES_FILE}:build_inplace", seq_len=32, batch_size=2)
    site = next(iter(session.swapper.sites.values()))
    g = site.graph
    assert g.form == "matmul" and g.scale == pytest.approx(0.5)  # w.mul_(0.5); q /= sqrt(d) stays on q
    assert g.mask == "boolean" and any("masked_fill" in t for t in g.mask_terms)
    session = open_session(f"{STYLES_FILE}:build_biasloop", seq_len=32, batch_size=2)
    g = next(iter(session.swapper.sites.values())).graph
    assert g.mask == "additive" and len(g.mask_terms) == 2  # both biases of the loop
    session = open_session(f"{STYLES_FILE}:build_baddbmmempty", seq_len=32, batch_size=2)
    g = next(iter(session.swapper.sites.values())).graph
    assert g.form == "baddbmm" and g.mask == "none" and g.scale == pytest.approx(0.25)  # beta=0: empty ignored


def test_graph_swaps_revert_exactly_and_the_capture_time_is_recorded():
    session = open_session(f"{STYLES_FILE}:build_einsumfstring", seq_len=32, batch_size=2)
    model, inputs, swapper = session.loaded.model, session.inputs, session.swapper
    assert set(swapper.capture_seconds) == {"blocks.0.attn", "blocks.1.attn"}
    assert all(0 < t < 60 for t in swapper.capture_seconds.values())
    with torch.no_grad():
        before = model(*inputs.args)
        swapper.apply("sdpa")
        assert all("forward" in b.attn.__dict__ for b in model.blocks)
        swapped = model(*inputs.args)
        swapper.revert()
        after = model(*inputs.args)
    assert all("forward" not in b.attn.__dict__ for b in model.blocks)
    assert torch.equal(before, after) and torch.allclose(before, swapped, atol=1e-5)


def test_the_soft_cap_is_never_dropped_in_the_graph():
    """The finding of issue 20: a tanh soft-cap was rewritten as if it were not there. SDPA
    refuses it by name; flex_attention's score_mod replays it."""
    module = G.SoftCapHelper().eval()
    capture = graph.Capture(module)
    capture.run(G.example_inputs(2, 16), {})
    (site,) = capture.sites.values()
    why = site.reason_for("sdpa")
    assert "torch.tanh" in why and "line " in why and "flex_attention" in why
    assert not capture.rewritten and site.targets == ["flex_attention"]



class _ShiftThenCap(torch.nn.Module):
    """The row max subtracted, then a soft-cap: tanh(x - m) is not tanh(x) shifted by a
    constant, so the shift is part of the scores and cannot be dropped (_row_shift)."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2)
        s = 5.0 * torch.tanh((s - s.amax(-1, keepdim=True)) / 5.0)
        return s.softmax(-1) @ v


def test_a_row_shift_with_a_function_of_the_scores_after_it_is_refused_for_every_target():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    capture = graph.Capture(_ShiftThenCap().eval(), target="flex_attention")
    capture.run((q, k, v), {})
    (site,) = capture.sites.values()
    assert site.targets == [] and "line " in site.reason, (site.targets, site.reason)
    assert not capture.rewritten


def test_a_second_product_added_to_the_scores_joins_q_and_k_along_head_dim(tmp_path):
    """Issue 20, summed contractions as a concatenated D: q·kᵀ + q_r·k_rᵀ (K's part shared by
    every head) is one call on [q, q_r]·[k, k_r]ᵀ, no [S_q, S_k] term, for SDPA and
    flex_attention; enable_flash takes the graph path over the source rewrite, which forms
    the second product as an attn_mask."""
    x, mask = G.example_inputs(2, 32)
    for target in graph.TARGETS:
        torch.manual_seed(0)
        module = G.SummedProducts().eval()
        capture = graph.Capture(module, target=target)
        capture.run((x, mask), {})
        (site,) = capture.sites.values()
        assert site.mask == "boolean" and any("joins Q and K along head_dim" in n for n in site.notes), site.notes
        with torch.no_grad():
            torch.testing.assert_close(capture(x, mask), module(x, mask), atol=2e-6, rtol=1e-5)
    run = run_script("enable_flash.py", "--model", f"{STYLES_FILE}:build_summedproducts", "--backend", "sdpa",
                     "--device", "cpu", "--dtype", "float32", "--seq-len", "128", "--report-dir", str(tmp_path),
                     *FAST)
    assert run.check("accuracy")["passed"], run.check("accuracy")
    sites = run.result["data"]["sites"]
    assert all(s["path"] == "graph" and "attn_mask" in s["runtime_only"] for s in sites), sites

def _flex_capture(style, seq_len):
    torch.manual_seed(0)
    module = G.FLEX_STYLES[style][0]().eval()
    x, mask = G.example_inputs(2, seq_len)
    with torch.no_grad():
        want = module(x, mask)
    capture = graph.Capture(module, target="flex_attention")
    capture.run((x, mask), {})
    with torch.no_grad():
        got = capture(x, mask)
    return capture, got, want


@pytest.mark.parametrize("style", sorted(G.FLEX_STYLES))
def test_score_modifiers_are_replayed_by_flex_attention(style):
    """Issue 21: soft-cap, ALiBi and a causal fill become one compiled flex_attention call whose
    score_mod replays them in order; the rewrite computes what the module computes."""
    capture, got, want = _flex_capture(style, 64)
    assert capture.rewritten and not capture.errors, capture.errors
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    (site,) = capture.sites.values()
    if "SoftCap" in style:
        assert any("torch.tanh" in f for f in site.score_mod)



def test_sinks_with_a_sliding_window_are_one_flex_call():
    """Issue 21: gpt-oss's sink logits (an extra score column) with a causal sliding window
    built from positions: zero keys whose scores are the logits, the window a BlockMask over
    S_k + 1 keys; equal to the module at a length that is not a multiple of flex's blocks."""
    for S in (64, 200):
        capture, got, want = _flex_capture("SinksWindow", S)
        assert capture.rewritten and not capture.errors, capture.errors
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    (site,) = capture.sites.values()
    assert "flex_attention" in site.targets and any("no [S_q, S_k] tensor" in n for n in site.notes), site.notes

def test_alibi_built_from_positions_forms_no_score_sized_tensor():
    """Issue 21: an ALiBi bias and a causal mask computed in forward from torch.arange are
    read from a table of S_q + S_k - 1 diagonals inside score_mod: after the rewrite no
    tensor of the graph is [.., S, S] (before it, the bias [H, S, S] and the mask [S, S] were)."""
    S = 96
    capture, got, want = _flex_capture("AlibiArange", S)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    (site,) = capture.sites.values()
    assert sum("no [S_q, S_k] tensor is formed" in n for n in site.notes) == 2  # the bias and the mask
    shapes = [tuple(n.meta["example_value"].shape) for gm in capture.graphs for n in gm.graph.nodes
              if isinstance(n.meta.get("example_value"), torch.Tensor)]
    assert shapes and not [s for s in shapes if s[-2:] == (S, S)], shapes
    sdpa = graph.Capture(G.FLEX_STYLES["AlibiArange"][0]().eval())  # SDPA needs the bias as a mask
    sdpa.run(G.example_inputs(2, S), {})
    assert any(tuple(n.meta["example_value"].shape)[-2:] == (S, S) for gm in sdpa.graphs for n in gm.graph.nodes
               if isinstance(n.meta.get("example_value"), torch.Tensor))


def test_a_table_of_diagonals_is_rebuilt_when_its_leaf_changes_and_kept_otherwise():
    """The ALiBi table is kept between calls while its slopes are the same tensor at the same
    version; changed in place (an optimizer step), the next call reads the new slopes."""
    capture, got, want = _flex_capture("AlibiArange", 64)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    module, (x, mask) = capture.module, G.example_inputs(2, 64)
    programs = [t.lazy for gm in capture.graphs for n in gm.graph.nodes if n.op == "call_function"
                for t in getattr(n.target, "terms", ())] or None
    with torch.no_grad():
        capture(x, mask)
        module.slopes.mul_(4.0)  # the buffer changes in place: its _version moves
        got, want = capture(x, mask), module(x, mask)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert programs is None or all(p.cached is not None for p in programs)


def test_a_soft_capped_hand_written_model_is_switched_to_flex_attention(tmp_path):
    run = run_script("enable_flash.py", "--model", f"{STYLES_FILE}:build_softcapalibi", "--backend", "flex_attention",
                     "--device", "cpu", "--dtype", "float32", "--seq-len", "128", "--report-dir", str(tmp_path),
                     *FAST)
    for name in ("switch", "kernels", "accuracy"):
        assert run.check(name)["passed"], run.check(name)
    sites = run.result["data"]["sites"]
    assert len(sites) == 2 and all(s["status"] == "swapped" and s["path"] == "graph" for s in sites), sites
    assert all(s["kernel_after"] == "flex_attention (compiled)" for s in sites)
    assert "flex_attention (compiled)" in run.result["data"]["candidate"]["kernels"]
    sdpa = run_script("enable_flash.py", "--model", f"{STYLES_FILE}:build_softcapalibi", "--backend", "sdpa",
                      "--device", "cpu", "--dtype", "float32", "--seq-len", "128", "--no-report", *FAST)
    assert sdpa.rc == 2 and "torch.tanh" in sdpa.result["summary"] and "--backend flex_attention" in sdpa.result["summary"]


def test_source_sites_keep_the_source_path():
    """A site the source matcher takes keeps it (and its patch): the graph path is a fallback."""
    found = scan.analyze_path(MODELS / "attention_styles.py")[0]
    assert found  # the source matcher still reads files without running them
    session = open_session(f"{MODELS / 'attention_styles.py'}:build_scaleonquery", seq_len=32, batch_size=2)
    assert all(s.path == "source" and s.status == "swapped" for s in session.swapper.sites.values())


@pytest.mark.parametrize("style", sorted(__import__("models.attention_styles", fromlist=["STYLES"]).STYLES))
def test_the_graph_path_alone_reads_every_style_of_the_first_set(style):
    """One matcher, no case per construct: every style of tests/models/attention_styles.py
    (which the source matcher was built from) is matched by the graph path alone, with the
    same output, and the two that SDPA cannot express are refused by name."""
    from models import attention_styles as A

    torch.manual_seed(0)
    module = A.STYLES[style][0]().eval()
    x = torch.randn(2, 64, A.D_MODEL)
    args = (x, A.pad_mask(2, 64)) if style in A.TAKES_MASK else (x,)
    capture = graph.Capture(module)
    with torch.no_grad():
        want = module(*args)
        capture.run(args, {})
        got = capture(*args)
    (site,) = capture.sites.values()
    assert not capture.errors
    if A.STYLES[style][1] == "swap":
        assert site.swappable and capture.rewritten, site.reason
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    else:
        why = site.reason_for("sdpa")
        assert "sdpa" not in site.targets and A.STYLES[style][1] in why and "line " in why, why


class _QueryAxisSoftmax(torch.nn.Module):
    def forward(self, q, k, v):  # [B, H, S, D] each
        return torch.matmul((q @ k.transpose(-1, -2)).softmax(dim=-2), v)


class _WeightsKept(torch.nn.Module):
    def forward(self, q, k, v):
        w = (q @ k.transpose(-1, -2) * 0.25).softmax(dim=-1)
        return w @ v, w.mean()


class _TopK(torch.nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2)
        kth = s.topk(4, dim=-1).values[..., -1:]
        s = s.masked_fill(s < kth, float("-inf"))
        return s.softmax(dim=-1) @ v


class _OneMapTwoCombinations(torch.nn.Module):
    """Differential-style maps where one map feeds two linear combinations: the value
    product cannot be moved before them as one call per map (push_value_products refuses)."""

    def forward(self, q, k, v):
        b, h, s, _ = q.shape
        w = (q @ k.transpose(-1, -2)).softmax(-1).view(b, h // 2, 2, s, s)
        return (w[:, :, 0] - 0.3 * w[:, :, 1]) @ v[:, : h // 2] + (w[:, :, 1] + 0.5 * w[:, :, 0]) @ v[:, : h // 2]


@pytest.mark.parametrize("module,construct", [(_QueryAxisSoftmax, "the query axis"),
                                              (_WeightsKept, "weights used anywhere but ·V"),
                                              (_TopK, "Tensor.topk"),
                                              (_OneMapTwoCombinations, "Tensor.view")])
def test_other_constructs_sdpa_cannot_express_are_refused_by_name(module, construct):
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    capture = graph.Capture(module().eval())
    capture.run((q, k, v), {})
    (site,) = capture.sites.values()
    assert not site.swappable and construct in site.reason and "line " in site.reason, site.reason
    assert not capture.rewritten


def test_differential_attention_is_two_fused_calls_combined_after_the_value_product(tmp_path):
    """Issue 21: w0 - λ·w1 before ·V is taken per map (2H heads of one SDPA call, the narrower
    q/k head_dim zero-padded to v's) and combined after ·V, by linearity."""
    run = run_script("enable_flash.py", "--model", f"{STYLES_FILE}:build_differential", "--backend", "sdpa",
                     "--device", "cpu", "--dtype", "float32", "--seq-len", "128", "--report-dir", str(tmp_path),
                     *FAST)
    for name in ("switch", "kernels", "accuracy"):
        assert run.check(name)["passed"], run.check(name)
    sites = run.result["data"]["sites"]
    assert len(sites) == 2 and all(s["status"] == "swapped" and s["kernel_after"] == FUSED for s in sites), sites
    assert all(any("combined across 2 maps" in n for n in s["notes"]) for s in sites)


def test_auto_switches_a_soft_capped_model_to_flex_when_compiled_candidates_are_timed():
    """Issue 21: --backend auto with --tune-compiled (the default on CUDA) swaps sites SDPA
    cannot take for flex_attention instead of stopping at 'no site could be swapped'."""
    run = run_script("enable_flash.py", "--model", f"{STYLES_FILE}:build_softcaphelper", "--tune-compiled",
                     "--device", "cpu", "--dtype", "float32", "--seq-len", "64", "--no-report", *FAST)
    assert run.result["data"]["chosen"] == "flex_attention", run.result["summary"]
    for name in ("switch", "kernels", "accuracy"):
        assert run.check(name)["passed"], run.check(name)
