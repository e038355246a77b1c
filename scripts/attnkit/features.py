"""The advanced attention features a model needs, and which backends provide them.

``needed(loaded, inputs)`` reads the model's config and the batch: grouped-query (GQA) or
multi-query (MQA) attention, a sliding window, padding, logit soft-capping, ALiBi, and
attention dropout. ``SUPPORT`` says, for each backend, whether and how it provides each
feature, with the source of the statement. ``check_features`` combines the two and,
where the backend can run here, proves it on inputs that exercise the features (a
padded batch longer than the window) with the accuracy rule of ``accuracy.compare``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import CannotRun, Check, StepResult, default_run_folder, write_run_folder

FEATURES = {
    "gqa": "grouped-query attention: fewer key/value heads than query heads",
    "mqa": "multi-query attention: one key/value head",
    "sliding_window": "sliding-window (local) attention",
    "padding": "padded batches",
    "softcap": "attention logit soft-capping",
    "alibi": "ALiBi position bias",
    "dropout": "attention dropout (training only)",
}

FA2_DOC = "flash_attn_func docstring (flash-attn): 'Supports multi-query and grouped-query attention (MQA/GQA) by " \
          "passing in KV with fewer heads than Q'"
FA_CHANGELOG = "flash-attn README changelog"
FA3_SIG = "hopper/flash_attn_interface.py flash_attn_func signature (flash-attention repository)"

#: backend -> feature -> (supported, how, source)
SUPPORT: dict[str, dict[str, tuple[bool, str, str]]] = {
    "eager": {f: (True, "written out in PyTorch ops", "transformers' eager_attention_forward") for f in FEATURES},
    "sdpa": {
        "gqa": (True, "enable_gqa=True, or the key/value heads repeated first",
                "torch SDPA docs (enable_gqa, torch 2.5+); transformers/integrations/sdpa_attention.py"),
        "mqa": (True, "as GQA with one key/value head", "torch SDPA docs (enable_gqa)"),
        "sliding_window": (True, "an explicit attn_mask; on CUDA a mask rules out the flash kernel, efficient or "
                                 "cuDNN run instead", "pytorch sdp_utils: 'Flash Attention does not support non-null "
                                 "attn_mask'"),
        "padding": (True, "an explicit attn_mask: padded positions are masked, still computed",
                    "transformers/integrations/sdpa_attention.py"),
        "softcap": (False, "transformers' SDPA path raises: '`sdpa` attention does not support `softcap`'",
                    "transformers/integrations/sdpa_attention.py"),
        "alibi": (True, "an additive float attn_mask", "torch SDPA docs (attn_mask)"),
        "dropout": (True, "dropout_p", "torch SDPA docs"),
    },
    "flash_attention_2": {
        "gqa": (True, "key/value with fewer heads than the query", FA2_DOC),
        "mqa": (True, "key/value with one head", FA2_DOC),
        "sliding_window": (True, "window_size=(left, right)", f"{FA_CHANGELOG}, 2.3: 'Local (i.e., sliding window) "
                                                              "attention'"),
        "padding": (True, "flash_attn_varlen_func with cu_seqlens: padding removed, not computed",
                    "flash_attn_varlen_func signature (flash-attn)"),
        "softcap": (True, "softcap=", f"{FA_CHANGELOG}, 2.6: 'Softcapping'"),
        "alibi": (True, "alibi_slopes=", f"{FA_CHANGELOG}, 2.4: 'ALiBi (attention with linear bias)'"),
        "dropout": (True, "dropout_p=", "flash_attn_func signature (flash-attn)"),
    },
    "flash_attention_3": {
        "gqa": (True, "key/value with fewer heads (pack_gqa=)", FA3_SIG),
        "mqa": (True, "key/value with one head", FA3_SIG),
        "sliding_window": (True, "window_size=(left, right)", FA3_SIG),
        "padding": (True, "flash_attn_varlen_func with cu_seqlens", FA3_SIG),
        "softcap": (True, "softcap=", FA3_SIG),
        "alibi": (False, "flash_attn_func has no alibi_slopes parameter", FA3_SIG),
        "dropout": (False, "flash_attn_func has no dropout_p parameter", FA3_SIG),
    },
    "flex_attention": {
        "gqa": (True, "enable_gqa=True", "torch.nn.attention.flex_attention signature"),
        "mqa": (True, "enable_gqa=True", "torch.nn.attention.flex_attention signature"),
        "sliding_window": (True, "a block_mask", "torch.nn.attention.flex_attention docs"),
        "padding": (True, "a block_mask", "torch.nn.attention.flex_attention docs"),
        "softcap": (True, "a score_mod", "torch.nn.attention.flex_attention docs"),
        "alibi": (True, "a score_mod", "torch.nn.attention.flex_attention docs"),
        "dropout": (False, "flex_attention has no dropout argument", "torch.nn.attention.flex_attention signature"),
    },
}


def sliding_window_of(config: Any) -> int | None:
    """The window the model really uses: ``sliding_window``, unless the config turns it off
    (Qwen2's ``use_sliding_window`` defaults to False)."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def needed(loaded: Any, inputs: Any) -> dict[str, str]:
    """The features ``loaded`` (a ``models.LoadedModel``) uses on ``inputs``: feature -> detail."""
    config = loaded.text_config
    out: dict[str, str] = {}
    shape = loaded.attention_shape() or {}
    heads, kv = shape.get("heads"), shape.get("kv_heads")
    if heads and kv == 1:
        out["mqa"] = f"{heads} query heads share 1 key/value head"
    elif heads and kv and kv < heads:
        out["gqa"] = f"{heads} query heads share {kv} key/value heads"
    window = sliding_window_of(config)
    if window:
        used = "exercised" if inputs.seq_len > window else f"not exercised at seq_len {inputs.seq_len}"
        out["sliding_window"] = f"window of {window} tokens ({used})"
    if inputs.padding_positions:
        out["padding"] = f"{inputs.padding_positions} padding positions in this batch"
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap:
        out["softcap"] = f"attn_logit_softcapping = {softcap}"
    if getattr(config, "alibi", False) or getattr(config, "model_type", "") == "bloom":
        out["alibi"] = "ALiBi position bias"
    for key in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        p = getattr(config, key, 0) or 0
        if isinstance(p, (int, float)) and p > 0:
            out["dropout"] = f"{key} = {p} (training only; inference runs without it)"
            break
    return out


@dataclass
class FeatureOptions:
    """What ``check_features.py`` takes (see its --help)."""

    model: str | None = None
    backend: str = "auto"
    batch_size: int = 2
    seq_len: int = 256
    pad_fraction: float | None = 0.25
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    report_dir: str | None = None
    write_report: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def check_features(o: FeatureOptions, reporter: Any) -> StepResult:
    """The check_features step: fail when the backend lacks a feature the model needs,
    skip (with the reason) when the backend cannot run here, else pass or fail on the
    outputs of a batch that exercises the features. Raises ``CannotRun`` when it cannot
    start (see ``session.open_session``)."""
    from .accuracy import judge_outputs
    from .backends import CATALOGUE, availability, choose
    from .session import open_session, resolve

    if o.backend != "auto" and o.backend not in CATALOGUE:
        raise CannotRun(f"unknown --backend {o.backend!r}; choose from auto, {', '.join(CATALOGUE)}", "")
    env, device, dtype = resolve(o.device, o.dtype)
    session = open_session(o.model, device=device, dtype=o.dtype, batch_size=o.batch_size, seq_len=o.seq_len,
                           pad_fraction=o.pad_fraction, trust_remote_code=o.trust_remote_code, reporter=reporter,
                           env=env)
    loaded, inputs = session.loaded, session.inputs
    backend = choose("auto", env=env, device=device, dtype=dtype, model=loaded.model).backend \
        if o.backend == "auto" else o.backend
    uses = needed(loaded, inputs)
    table = [{"feature": f, "needed": f in uses, "detail": uses.get(f, ""), "supported": SUPPORT[backend][f][0],
              "how": SUPPORT[backend][f][1], "source": SUPPORT[backend][f][2]} for f in FEATURES]
    data = session.data()
    data.update({"backend": backend, "needed": uses, "features": table, "accuracy": None, "report_dir": None})
    lacking = [row for row in table if row["needed"] and not row["supported"]]
    names = ", ".join(uses) or "none of the advanced features"
    can = availability(backend, env=env, device=device, dtype=dtype, model=loaded.model)
    checks = [Check("supported", not lacking,
                    f"{backend} lacks {', '.join(r['feature'] for r in lacking)}: " +
                    "; ".join(f"{r['how']} ({r['source']})" for r in lacking) if lacking else
                    f"{backend} provides every feature the model uses: {names}")]
    if lacking:
        result = StepResult("check_features", "fail", f"{backend} cannot run {loaded.name}: " + checks[0].evidence,
                            checks, data, "choose a backend that provides these features, e.g. --backend eager or "
                                          "flash_attention_2")
    elif not can.available:
        result = StepResult("check_features", "skip", f"{backend} provides {names} (by its documentation; sources in "
                                                      f"data.features), but it cannot run here to prove it: "
                                                      f"{can.reason}", checks, data,
                            f"run this step where {backend} can run to verify the outputs")
    else:
        acc = judge_outputs(loaded, loaded, inputs, "eager", backend, ("eager", backend), reporter, dtype)
        data["accuracy"] = acc.to_dict()
        checks.append(Check("accuracy", acc.passed, acc.evidence()))
        status = "pass" if acc.passed else "fail"
        summary = (f"{backend} on {loaded.name} with {names}: " +
                   ("outputs match eager" if acc.passed else "outputs differ from eager") +
                   f" ({acc.evidence().split(' vs ')[0]})")
        result = StepResult("check_features", status, summary, checks, data,
                            "benchmark it next with profile_attention.py" if acc.passed else
                            f"do not use {backend} for this model: read data.accuracy")
    if o.write_report:
        write_run_folder(result, Path(o.report_dir) if o.report_dir else default_run_folder("check_features",
                                                                                            loaded.name))
    return result
