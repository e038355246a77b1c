"""Load a model from a spec into a ``LoadedModel``: the model, its inputs, the output to compare.

A spec (``--model``) is one of:

* ``demo:NAME``: a built-in model from a config with random weights (seed 0), offline;
  ``demo:llama`` is the default. See ``DEMOS``.
* a folder with a ``config.json`` (``save_pretrained`` output), or a Hugging Face id, read
  from the local cache first and downloaded unless ``HF_HUB_OFFLINE``; ``trust_remote_code``
  only when asked.
* ``path/to/file.py:factory`` or ``package.module:factory``: a callable returning an
  ``nn.Module``. Its module may define ``example_inputs(batch_size, seq_len)`` returning the
  positional inputs; else token ids [B, S] when the first submodule is an ``nn.Embedding``,
  else a float tensor [B, S, d_model].

``device_map`` spreads a model over the devices with accelerate (``from_pretrained`` for a
folder or hub id, ``infer_auto_device_map`` + ``dispatch_model`` for a demo or factory
built on the CPU); the inputs go to the first device holding weights (``LoadedModel.device``).

Models are moved and cast by ``place``, never ``Module.to(dtype=...)`` (it casts complex
tensors to real). A factory's model is first proven unchanged by ``check_placement``.

Every failure to load raises ``CannotRun`` with one line saying what is wrong.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import torch
from torch import nn

from ..env import dtype_name
from ..report import CannotRun, NeedsTrust, OptionError, one_line, said
from .demos import DEFAULT_MODEL, DEMOS
from .inputs import TEXT, Inputs, row_lengths

#: A Hugging Face repo id: ``name`` or ``org/name`` (huggingface_hub's own pattern is
#: stricter; this only separates ids from paths).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

#: transformers' device_map strategies (``from_pretrained(device_map=...)``), placed by accelerate.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

#: A --max-memory size, as accelerate's ``convert_file_size_to_int`` reads it ("10GiB", "500MB", bytes).
_SIZE = re.compile(r"^\d+(\.\d+)?(GiB|MiB|KiB|GB|MB|KB)?$", re.IGNORECASE)


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``0=10GiB,cpu=50GiB`` -> {0: "10GiB", "cpu": "50GiB"} (GPU indices as ints, as accelerate
    takes them; devices left out get nothing). Raises ``OptionError`` for a malformed entry."""
    if not text:
        return None
    out: dict[int | str, str] = {}
    for item in text.split(","):
        key, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not _SIZE.match(size) or not (key.isdigit() or key in ("cpu", "mps")):
            raise OptionError("max_memory", "{max_memory} entry {value!r} is not DEVICE=SIZE (DEVICE a GPU index, cpu "
                              "or mps; SIZE like 10GiB or 500MB)", "e.g. {max_memory} 0=10GiB,cpu=50GiB",
                              value=item.strip())
        out[int(key) if key.isdigit() else key] = size
    return out


def accelerate_missing() -> str | None:
    """Why accelerate cannot be imported (what ``device_map`` needs), or None when it can."""
    try:
        import accelerate  # noqa: F401
    except Exception as exc:
        return f"accelerate is not importable ({type(exc).__name__}: {exc})"
    return None


def main_device(device_map: dict[str, Any]) -> str:
    """Where the inputs go: the first device of the map that holds weights (accelerate's
    ``dispatch_model`` takes the first device not 'cpu' or 'disk' as its main device)."""
    placed = [d for d in device_map.values() if d not in ("cpu", "disk")]
    first = placed[0] if placed else "cpu"
    return f"cuda:{first}" if isinstance(first, int) else str(first)


def _dispatch(model: nn.Module, device_map: str, max_memory: dict | None, dtype: torch.dtype) -> nn.Module:
    """Place a model built on the CPU across devices with accelerate, like from_pretrained's ``device_map``."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device_map != "sequential":  # transformers balances "auto" too
        max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=device_map == "balanced_low_0")
    placed = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    _refuse_disk(placed)
    return dispatch_model(model, placed)


def _refuse_disk(placed: dict[str, Any]) -> None:
    disk = [name for name, d in placed.items() if d == "disk"]
    if disk:
        names = ", ".join(n or "the whole model" for n in disk[:3]) + (" ..." if len(disk) > 3 else "")
        raise OptionError("max_memory", "the model does not fit in {max_memory}: accelerate would offload {n} module "
                          "group(s) to disk ({names}), which this job does not do",
                          "raise {max_memory}, or give the cpu more (cpu=SIZE)", n=len(disk), names=names)


def _token_rows(loaded: "LoadedModel", lengths: list[int], seq_len: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, S], right-padded; from the tokenizer when there is one."""
    config = loaded.text_config
    vocab = int(getattr(config, "vocab_size", 0) or 1000)
    pad_id = getattr(config, "pad_token_id", None)
    tok = loaded.tokenizer
    if tok is not None and getattr(tok, "pad_token_id", None) is not None:
        pad_id = tok.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    ids = torch.full((len(lengths), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), seq_len), dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    for row, n in enumerate(lengths):
        if tok is not None:
            text = TEXT * (1 + (n * 2) // max(1, len(TEXT.split())))
            tokens = tok(text, truncation=True, max_length=n)["input_ids"][:n]
            tokens = torch.tensor(tokens, dtype=torch.long)
        else:
            tokens = torch.randint(0, vocab, (n,), generator=gen)
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids.to(device), mask.to(device)


# --- the model

@dataclass
class LoadedModel:
    """A model ready to measure, and what the job knows about it."""

    model: nn.Module
    spec: str
    name: str
    kind: str  # demo | folder | hub | factory
    family: str  # causal-lm | encoder | seq2seq | module
    device: str
    dtype: torch.dtype
    tokenizer: Any = None
    factory_module: ModuleType | None = None
    original_backend: str | None = None
    notes: list[str] = field(default_factory=list)
    train_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # measure.timing.train_fn's loss G
    device_map: dict[str, Any] | None = None  # module -> device, when accelerate placed the model (``device_map``)

    @property
    def devices(self) -> list[str]:
        """The devices the model's weights are on: ['cuda:0', 'cuda:1', 'cpu'] with a device map, else [device]."""
        if not self.device_map:
            return [self.device]
        return list(dict.fromkeys(f"cuda:{d}" if isinstance(d, int) else str(d) for d in self.device_map.values()))

    #: set when a plain cast to ``dtype`` cannot run (float32 tensors built inside forward):
    #: float32 weights, forward under torch.autocast(dtype)
    autocast: torch.dtype | None = None

    @property
    def dtype_policy(self) -> str:
        """How the run's dtype is applied: 'cast' (weights and inputs in ``dtype``) or
        'autocast' (float32 weights, torch.autocast to ``dtype``)."""
        return "autocast" if self.autocast is not None else "cast"

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.float32 if self.autocast is not None else self.dtype

    def use_autocast(self) -> None:
        """Fall back to torch.autocast(dtype) with the weights back in float32 (exact from bf16/fp16)."""
        self.autocast = self.dtype
        self.model.float()

    @property
    def is_transformers(self) -> bool:
        from transformers import PreTrainedModel

        return isinstance(self.model, PreTrainedModel)

    @property
    def text_config(self) -> Any:
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            return config.get_text_config()
        return config

    def max_seq_len(self) -> int | None:
        config = self.text_config
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def attention_shape(self) -> dict[str, Any] | None:
        """layers, heads, kv_heads, head_dim, causal and sliding_window from the config."""
        from ..backends import head_dim_of

        config = self.text_config
        if config is None:
            return None
        heads = getattr(config, "num_attention_heads", None)
        layers = getattr(config, "num_hidden_layers", None)
        if not heads or not layers:
            return None
        return {"layers": layers, "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
                "head_dim": head_dim_of(self.model), "causal": self.family == "causal-lm",
                "sliding_window": getattr(config, "sliding_window", None)}

    def inputs(self, batch_size: int, seq_len: int, pad_fraction: float | None = None) -> Inputs:
        """Example inputs [B, S] on the model's device (module docstring); ``pad_fraction``
        None: 0 for causal LMs (one prompt per row), 0.5 for encoders (uneven sentences)."""
        if self.family == "module":
            return self._module_inputs(batch_size, seq_len)
        if pad_fraction is None:
            pad_fraction = 0.0 if self.family == "causal-lm" else 0.5
        lengths = row_lengths(batch_size, seq_len, pad_fraction)
        ids, mask = _token_rows(self, lengths, seq_len, self.device)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.family == "causal-lm":
            kwargs["use_cache"] = False  # a forward pass over the prompt; no KV cache to build
        if self.family == "seq2seq":
            kwargs["decoder_input_ids"] = ids
        if self.family == "encoder" and getattr(self.text_config, "type_vocab_size", 0):
            kwargs["token_type_ids"] = torch.zeros_like(ids)
        source = "tokenized text" if self.tokenizer is not None else "random token ids (seed 0)"
        padded = sum(seq_len - n for n in lengths)
        desc = f"{source}, [B, S] = [{batch_size}, {seq_len}], {padded} padding positions (right-padded)"
        return Inputs(batch_size, seq_len, (), kwargs, mask.bool(), desc)

    def probe(self) -> Inputs:
        """Inputs to find attention and verify swaps on: [1, 16] for transformers, else [2, 32]
        (masks exercised), capped to the model's maximum length."""
        batch, length = (1, 16) if self.is_transformers else (2, 32)
        return self.inputs(batch, min(length, self.max_seq_len() or length))

    def _module_inputs(self, batch_size: int, seq_len: int) -> Inputs:
        make = getattr(self.factory_module, "example_inputs", None)
        if make is not None:
            try:
                args = make(batch_size, seq_len)
            except Exception as exc:
                raise CannotRun(f"example_inputs({batch_size}, {seq_len}) in {self.spec.rsplit(':', 1)[0]} raised "
                                f"{type(exc).__name__}: {exc}", "fix example_inputs or pass other sizes") from None
            args = args if isinstance(args, tuple) else (args,)
            args = tuple(a.to(self.device, self.input_dtype if a.is_floating_point() else a.dtype)
                         if isinstance(a, torch.Tensor) else a for a in args)
            return Inputs(batch_size, seq_len, args, {}, None, f"example_inputs({batch_size}, {seq_len}) from the factory")
        gen = torch.Generator().manual_seed(0)
        first = next((m for m in self.model.modules() if m is not self.model), None)
        if isinstance(first, nn.Embedding):
            ids = torch.randint(0, first.num_embeddings, (batch_size, seq_len), generator=gen).to(self.device)
            return Inputs(batch_size, seq_len, (ids,), {}, None, f"random token ids [B, S] = [{batch_size}, {seq_len}]")
        d_model = _d_model(self.model)
        if d_model is None:
            raise CannotRun(f"cannot guess the input of {type(self.model).__name__}: it starts with no nn.Embedding and "
                            "has no d_model / embed_dim / hidden_size or nn.Linear to size a float input",
                            "define example_inputs(batch_size, seq_len) in the factory's module")
        x = torch.randn(batch_size, seq_len, d_model, generator=gen).to(self.device, self.input_dtype)
        return Inputs(batch_size, seq_len, (x,), {}, None, f"random float input [B, S, d_model] = "
                                                           f"[{batch_size}, {seq_len}, {d_model}]")

    def forward(self, inputs: Inputs, autocast: bool = True) -> torch.Tensor:
        """One forward pass: ``select_output``; under torch.autocast when the model runs that
        way, unless ``autocast=False`` (the float64 reference)."""
        if autocast and self.autocast is not None:
            with torch.autocast(torch.device(self.device).type, dtype=self.autocast):
                return select_output(self.model(*inputs.args, **inputs.kwargs))
        return select_output(self.model(*inputs.args, **inputs.kwargs))


def _d_model(model: nn.Module) -> int | None:
    for key in ("d_model", "embed_dim", "hidden_size", "dim"):
        value = getattr(model, key, None)
        if isinstance(value, int):
            return value
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
        if isinstance(m, nn.MultiheadAttention):
            return m.embed_dim
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[-1])
    return None


def select_output(out: Any) -> torch.Tensor:
    """The tensor a forward pass is judged by: logits for language models, else the last
    hidden state [B, S, hidden], else the output itself or its first tensor.

    Raises ``CannotRun`` when the output holds no tensor.
    """
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is None and isinstance(out, dict):
            value = out.get(key)
        if isinstance(value, torch.Tensor):
            return value
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else []
    for value in items:
        if isinstance(value, torch.Tensor):
            return value
    raise CannotRun(f"the model returned {type(out).__name__} with no tensor to compare", "")


# --- placement

def place(model: nn.Module, device: str | torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Move ``model`` (in place; returned) to ``device`` and cast its floating parameters and
    buffers (and gradients) to ``dtype`` (None: move only); complex, integer and bool tensors
    keep their dtype.

    Not ``Module.to(dtype=...)``: it casts complex tensors too, keeping the real part only
    ("Casting complex values to real discards the imaginary part"), so a complex rotary
    ``freqs_cis`` buffer (Meta's reference Llama, ``torch.polar``) becomes cosine-only.

    Raises ``ValueError`` for a non-floating ``dtype``. torch's errors from the move pass
    through: ``torch.OutOfMemoryError``, ``RuntimeError`` (unusable device),
    ``NotImplementedError`` (a meta tensor).
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"place() casts floating-point tensors to a floating-point dtype, not {dtype}")
    target = torch.device(device)

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(target, dtype) if dtype is not None and t.is_floating_point() else t.to(target)

    return model._apply(convert)


#: Mantissa bits no placement bound is tighter than: TF32, which torch may use for float32
#: matmuls and convolutions on a GPU (torch.backends.cuda.matmul.allow_tf32,
#: torch.backends.cudnn.allow_tf32), keeps 10.
TF32_BITS = 10


def placement_bound(dtype: torch.dtype, scale: float) -> tuple[float, int]:
    """The largest difference ``check_placement`` accepts between two forward passes whose outputs
    reach ``scale`` = max|out| in a model computing in ``dtype``: 4 * 2**-m * scale, m the
    mantissa bits of ``dtype`` and at most ``TF32_BITS``; returns (bound, m)."""
    bits = min(-round(math.log2(torch.finfo(dtype).eps)), TF32_BITS)
    return 4 * 2.0 ** -bits * scale, bits


def check_placement(loaded: LoadedModel, device: str) -> str:
    """Place ``loaded.model`` (as the factory returned it) on ``device`` in its own dtypes and
    prove the placement kept it; returns the note for ``LoadedModel.notes`` (``loaded.device``
    is ``device`` after).

    A forward pass on ``loaded.probe()`` before and after, each under ``torch.no_grad()``
    after ``torch.manual_seed(0)`` (the caller's RNG restored), must agree within
    ``placement_bound`` (bit for bit on one device). Nothing is copied: the first pass keeps
    its output and two float64 sums of each buffer and non-floating parameter, to name what
    changed. Skipped, saying why, when the model cannot run the probe as returned (reported
    later), does not fit in its own dtype (cast on the way), or is random and ``device`` is
    another kind of device.

    Raises ``CannotRun`` (largest difference, likely cause, advice) when the outputs differ
    beyond the bound or the forward raises only after placement. Move errors pass (``place``).
    """
    model, source, own = loaded.model, loaded.device, loaded.dtype
    with torch.random.fork_rng(devices=_cuda_indices(source, device)):
        skipped, probe, before, facts = None, None, None, {}
        try:
            probe = loaded.probe()
            torch.manual_seed(0)
            with torch.no_grad():
                before = loaded.forward(probe).detach()
            facts = _tensor_facts(model)
        except Exception as exc:  # the model's own failure (OOM too): the step that runs it reports it
            what = f"on {probe.description}" if probe is not None else "on a probe input"
            skipped = (f"loading check skipped: a forward pass of the model as the factory returned it {what} "
                       f"raised {said(exc, 160)}")
        try:
            place(model, device)
        except torch.OutOfMemoryError as exc:
            _release(device)
            return (f"loading check skipped: the model in {dtype_name(own)} does not fit on {device} ({said(exc, 160)}); "
                    "it is cast to the run's dtype on the way there instead")
        loaded.device = device
        if skipped:
            return skipped
        moved = Inputs(probe.batch_size, probe.seq_len, _to_device(probe.args, device),
                       _to_device(probe.kwargs, device), probe.valid, probe.description)
        where = f"{source} -> {device}" if source != device else f"on {device}"
        try:
            torch.manual_seed(0)
            with torch.no_grad():
                after = loaded.forward(moved).detach()
        except torch.OutOfMemoryError as exc:
            _release(device)
            return f"loading check skipped: the probe's forward pass ran out of memory on {device} ({said(exc, 160)})"
        except Exception as exc:
            raise CannotRun(f"loading broke the model: its forward pass on {probe.description} ran on the model as "
                            f"the factory returned it (on {source}) but raised {said(exc, 160)} after placing it "
                            f"{where}; likely cause: {_cause(facts, model)}", _PLACEMENT_ADVICE) from None
        diff, scale = _largest_difference(before, after)
        bound, bits = placement_bound(own, scale)
        if diff <= bound:
            return (f"loading kept the model: max|diff| {diff:.3g} in {dtype_name(own)} on the first forward "
                    f"({probe.description}, {where}), within 4 x 2^-{bits} x max|out| = {bound:.3g}")
        if torch.device(source).type != torch.device(device).type:
            torch.manual_seed(1)
            with torch.no_grad():
                again = loaded.forward(moved).detach()
            if _largest_difference(after, again)[0] > 0:
                return (f"loading check skipped: the forward pass is random (seeds 0 and 1 differ) and {device} "
                        f"draws other numbers than {source} from one seed, so the two runs cannot be compared")
        raise CannotRun(f"loading changed the model: placed {where} in {dtype_name(own)}, its first forward on "
                        f"{probe.description} differs from the model as the factory returned it by max|diff| "
                        f"{diff:.3g} (bound 4 x 2^-{bits} x max|out| = {bound:.3g}); likely cause: "
                        f"{_cause(facts, model)}", _PLACEMENT_ADVICE)


_PLACEMENT_ADVICE = ("keep every tensor forward reads a parameter or a registered buffer "
                     "(self.register_buffer(name, t, persistent=False)), and let .to() / _apply move it unchanged; "
                     "then check the factory's model gives the same output on the target device")


def _cuda_indices(*devices: str) -> list[int]:
    """The CUDA device indices among ``devices`` (fork_rng's ``devices``)."""
    out = []
    for d in devices:
        dev = torch.device(d)
        if dev.type == "cuda":
            out.append(dev.index if dev.index is not None else torch.cuda.current_device())
    return sorted(set(out))


def _release(device: str) -> None:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _to_device(obj: Any, device: str) -> Any:
    """``obj`` with every tensor in it, through nested tuples, lists and dicts, moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _as_returned(model: nn.Module) -> tuple[str, torch.dtype]:
    """A factory's model's device (of its first parameter or buffer; cpu without any) and own
    dtype (of its first floating parameter, else buffer; float32 without any)."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    return (str(tensors[0].device) if tensors else "cpu",
            next((t.dtype for t in tensors if t.is_floating_point()), torch.float32))


def _fingerprint(t: torch.Tensor) -> tuple[float, float] | None:
    """sum(t) and sum(|t|) in float64 (complex: over real and imaginary parts); None on the meta device."""
    if t.is_meta:
        return None
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        total = float(t.sum(dtype=torch.float64))
        return total, total
    return float(t.sum(dtype=torch.float64)), float(t.abs().sum(dtype=torch.float64))


def _tensor_facts(model: nn.Module) -> dict[str, tuple[str, torch.dtype, tuple[int, ...], Any]]:
    """name -> (parameter | buffer, dtype, shape, fingerprint of buffers and non-floating parameters)."""
    facts = {}
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            sig = _fingerprint(t) if kind == "buffer" or not t.is_floating_point() else None
            facts[name] = (kind, t.dtype, tuple(t.shape), sig)
    return facts


def _same_sum(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    if a is None or b is None:
        return True
    tol = 1e-9 * max(1.0, abs(a[1]))  # another device may sum in another order
    return all(x == y or abs(x - y) <= tol or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def _cause(facts: dict[str, tuple], model: nn.Module) -> str:
    """What most likely changed in placement: a parameter or buffer's dtype, shape or values,
    else a tensor kept as a plain attribute (``.to()`` does not move it)."""
    now = _tensor_facts(model)
    changed = []
    for name, (kind, dtype, shape, sig) in facts.items():
        kept = "" if dtype.is_floating_point else ", not floating-point"
        if name not in now:
            changed.append(f"{kind} {name} ({dtype_name(dtype)}{kept}) disappeared")
        elif now[name][1:3] != (dtype, shape):
            changed.append(f"{kind} {name} ({dtype_name(dtype)}{kept}) changed to {dtype_name(now[name][1])} "
                           f"{list(now[name][2])}")
        elif not _same_sum(sig, now[name][3]):
            changed.append(f"{kind} {name} ({dtype_name(dtype)}{kept}) changed its values")
    if changed:
        more = f" and {len(changed) - 2} more" if len(changed) > 2 else ""
        return "; ".join(changed[:2]) + more + " in the placement"
    plain = [f"{prefix}.{key}" if prefix else key for prefix, m in model.named_modules()
             for key, value in vars(m).items() if isinstance(value, torch.Tensor)]
    if plain:
        more = f" and {len(plain) - 3} more" if len(plain) > 3 else ""
        return (f"a tensor kept as a plain attribute ({', '.join(plain[:3])}{more}), which .to() does not move or "
                "cast and the model may change itself")
    return "none found: no parameter or buffer changed, so forward depends on the device it runs on"


def _largest_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max|a - b|, max|a| over finite entries), in float64 on the CPU: equal or both-NaN
    entries count 0; other shapes or NaN against a number, inf."""
    if a.shape != b.shape:
        return math.inf, 0.0
    a, b = (torch.view_as_real(t) if t.is_complex() else t for t in (a.cpu(), b.cpu()))
    a, b = a.double(), b.double()
    diff = (a - b).abs()
    diff = torch.where((a == b) | (a.isnan() & b.isnan()), 0.0, diff).nan_to_num(nan=math.inf)
    finite = a[a.isfinite()]
    return (float(diff.max()) if diff.numel() else 0.0), (float(finite.abs().max()) if finite.numel() else 0.0)


# --- loading

def _family_of(config: Any) -> str:
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not archs and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in ("bert", "roberta"):
        return "causal-lm"
    return "encoder"


def _auto_class(family: str):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if family == "causal-lm" else AutoModel


def _tokenizer(ref: str | Path, **kw: Any) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(ref, **kw)
    except Exception:  # no tokenizer files: the job feeds random token ids instead
        return None


def _from_pretrained(ref: str | Path, *, device: str, dtype: torch.dtype, trust_remote_code: bool,
                     local_files_only: bool, device_map: str | None = None,
                     max_memory: dict | None = None) -> tuple[nn.Module, str, Any]:
    from transformers import AutoConfig

    kw = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    try:
        config = AutoConfig.from_pretrained(ref, **kw)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise NeedsTrust(str(ref)) from None
        raise CannotRun(f"cannot read the config of {ref}: {exc}", "") from None
    except OSError as exc:  # not in the cache / not downloadable / not a model folder
        raise CannotRun(f"cannot read the config of {ref}: {one_line(exc, 300)}", "") from None
    except Exception as exc:  # values transformers refuses (num_attention_heads 0: ZeroDivisionError)
        raise CannotRun(f"the config of {ref} is not one transformers can build: {said(exc, 300)}",
                        "fix its config.json, or take the model's original files again") from None
    family = _family_of(config)
    placement = {"device_map": device_map, "max_memory": max_memory} if device_map else {}
    try:
        model = _auto_class(family).from_pretrained(ref, dtype=dtype, **placement, **kw)
    except Exception as exc:
        raise _weights_error(ref, config, family, exc) from None
    if device_map:
        _refuse_disk(getattr(model, "hf_device_map", {}))
        return model.eval(), family, _tokenizer(ref, **kw)
    return model.to(device).eval(), family, _tokenizer(ref, **kw)


def _weight_files(ref: str | Path) -> list[Path]:
    """The weight files of a local model folder (safetensors, else PyTorch's .bin), sorted."""
    folder = Path(ref)
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def _unreadable(files: list[Path]) -> list[str]:
    """Each safetensors file that does not read (truncated), with what safetensors said."""
    from safetensors import safe_open

    bad = []
    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    st.get_slice(key).get_shape()
        except Exception as exc:
            bad.append(f"{f} ({one_line(exc, 120)})")
    return bad


def _mismatched_shapes(files: list[Path], config: Any, family: str) -> list[str]:
    """'name: [a, b] in FILE, [c, d] from config.json' for each safetensors tensor whose shape
    differs from the config's model (built on the meta device)."""
    from safetensors import safe_open

    with torch.device("meta"):
        model = _auto_class(family).from_config(config)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = []
    for f in files:
        if f.suffix != ".safetensors":
            continue
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                want = (expected.get(key) or expected.get(f"{prefix}.{key}")
                        or expected.get(key.removeprefix(prefix + ".")))
                shape = list(st.get_slice(key).get_shape())
                if want is not None and want != shape:
                    out.append(f"{key}: {shape} in {f.name}, {want} from config.json")
    return out


def _weights_error(ref: str | Path, config: Any, family: str, exc: Exception) -> CannotRun:
    """``from_pretrained``'s failure as a one-line ``CannotRun``: a corrupt weights file, a
    config.json that does not fit the weights, or what transformers said (an OSError or
    ValueError). Anything else is re-raised: a bug, not the user's model."""
    text = one_line(exc, 300)
    files = _weight_files(ref)
    if type(exc).__name__ == "SafetensorError" or "deserializ" in text or "incomplete metadata" in text:
        bad = _unreadable(files)
        return CannotRun(f"the weights of {ref} cannot be read: " + ("; ".join(bad) if bad else text) +
                         " is truncated or corrupt", "copy or download the weights again (compare the file size with "
                                                   "the original)")
    if "mismatched_sizes" in text or "size mismatch" in text:
        try:
            wrong = _mismatched_shapes(files, config, family)
        except Exception:  # the comparison itself is a courtesy: the message stands without it
            wrong = []
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        return CannotRun(f"the config.json of {ref} does not fit its weights"
                         + (f": {shown}" if shown else f" ({text})"),
                         "restore the config.json saved with these weights (save_pretrained writes both)")
    if isinstance(exc, (OSError, ValueError)):
        return CannotRun(f"cannot load the weights of {ref}: {text}", "")
    raise exc


def _load_demo(name: str, device: str, dtype: torch.dtype, device_map: str | None = None,
               max_memory: dict | None = None) -> tuple[nn.Module, str, Any]:
    demo = DEMOS.get(name)
    if demo is None:
        raise CannotRun(f"unknown demo {name!r}; choose from {', '.join('demo:' + d for d in DEMOS)}", "")
    built, family = demo.build()
    if isinstance(built, Path):  # real weights on disk
        return _from_pretrained(built, device=device, dtype=dtype, trust_remote_code=False, local_files_only=True,
                                device_map=device_map, max_memory=max_memory)
    torch.manual_seed(0)
    with torch.device("cpu" if device_map else device):
        # Built with eager attention, as research code often pins it: the job's "before".
        model = _auto_class(family).from_config(built, dtype=dtype, attn_implementation="eager")
    if demo.adjust is not None:
        demo.adjust(model)
    if device_map:
        model = _dispatch(model, device_map, max_memory, dtype)
    return model.eval(), family, None


@contextlib.contextmanager
def _as_user_code(what: str, argv0: str) -> Iterator[None]:
    """Run user code (factory import or call) as its own program: ``sys.argv`` is ``[argv0]``
    (put back after), and ``sys.exit`` becomes ``CannotRun`` naming ``what``, so stdout
    still holds one JSON object."""
    saved = sys.argv
    sys.argv = [argv0]
    try:
        yield
    except SystemExit as exc:
        raise CannotRun(f"{what} called sys.exit({exc.code!r}), which would have ended the step",
                        "keep sys.exit (and argument parsing that exits) under if __name__ == '__main__': in the "
                        "code a model spec imports") from None
    finally:
        sys.argv = saved


def _load_factory(spec: str) -> tuple[nn.Module, ModuleType]:
    """(the factory's model in eval mode, its module), run as ``_as_user_code``."""
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise CannotRun(f"factory file {target} does not exist", "pass path/to/file.py:factory")
        module_name = f"_attnkit_factory_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        sys.path.insert(0, str(path.resolve().parent))
        try:
            with _as_user_code(f"importing {target}", str(path)):
                module_spec.loader.exec_module(module)
        except CannotRun:
            raise
        except Exception as exc:
            raise CannotRun(f"importing {target} raised {type(exc).__name__}: {exc}", "fix that file") from None
        finally:
            sys.path.remove(str(path.resolve().parent))
        argv0 = str(path)
    else:
        try:
            with _as_user_code(f"importing module {target}", target):
                module = importlib.import_module(target)
        except CannotRun:
            raise
        except Exception as exc:
            raise CannotRun(f"cannot import module {target}: {type(exc).__name__}: {exc}",
                            "pass package.module:factory importable from here, or path/to/file.py:factory") from None
        argv0 = getattr(module, "__file__", None) or target
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CannotRun(f"{target} has no callable {attr!r}", f"define def {attr}(): return your nn.Module")
    try:
        with _as_user_code(f"factory {spec}", argv0):
            obj = factory()
    except CannotRun:
        raise
    except Exception as exc:
        raise CannotRun(f"factory {spec} raised {type(exc).__name__}: {exc}", "fix the factory") from None
    if not isinstance(obj, nn.Module):
        raise CannotRun(f"factory {spec} returned {type(obj).__name__}, not a torch.nn.Module",
                        "return the model instance from the factory")
    return obj.eval(), module


def _place_factory(model: nn.Module, spec: str, module: ModuleType, family: str, device: str,
                   dtype: torch.dtype, notes: list[str]) -> nn.Module:
    """A factory's model on ``device`` in ``dtype`` after ``check_placement`` (its note appended to
    ``notes``; its ``CannotRun`` raised)."""
    as_returned = LoadedModel(model, spec, spec, "factory", family, *_as_returned(model), None, module)
    notes.append(check_placement(as_returned, device))
    return place(model, device, dtype)


def classify(spec: str) -> str:
    """demo, factory, folder or hub. Raises ``CannotRun`` for a missing path or none of them."""
    if spec.startswith("demo:"):
        return "demo"
    target, sep, attr = spec.rpartition(":")
    if sep and attr.isidentifier() and not target.endswith(".py") and Path(target).expanduser().is_file():
        raise CannotRun(f"factory file {target} is not a .py file: a FILE:factory spec names a Python source file",
                        f"put def {attr}(): return your nn.Module into a .py file and pass path/to/file.py:{attr}")
    if sep and attr.isidentifier() and (target.endswith(".py") or re.fullmatch(r"[A-Za-z_][\w.]*", target)) \
            and not re.match(r"^[A-Za-z]:[\\/]", spec):
        return "factory"
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CannotRun(f"model path {spec} is a file, not a model folder",
                            "pass a folder with config.json, or path/to/file.py:factory")
        return "folder"
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1 or spec.endswith(".py")
    if looks_like_path or not HUB_ID.match(spec):
        raise CannotRun(f"model path {spec} does not exist", "pass an existing folder, a Hugging Face id, "
                        "path/to/file.py:factory or demo:NAME")
    return "hub"


def load(spec: str | None, *, device: str, dtype: torch.dtype, trust_remote_code: bool = False,
         device_map: str | None = None, max_memory: dict | None = None) -> LoadedModel:
    """Load ``spec`` (module docstring) onto ``device`` in ``dtype``, in eval mode; with
    ``device_map`` (``DEVICE_MAPS``; ``max_memory`` from ``parse_max_memory``) across devices,
    ``device`` being where the inputs go.

    Raises ``CannotRun`` (one line) for a missing path, a folder without config.json, a hub
    id not available offline, a failing factory or one returning no ``nn.Module``, a model
    that placement changed (``check_placement``), remote code without ``trust_remote_code``,
    a ``device_map`` without accelerate or one that would offload to disk.
    """
    spec = spec or DEFAULT_MODEL
    kind = classify(spec)
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise OptionError("device_map", "{device_map} {value!r}: choose from {names}", value=device_map,
                              names=", ".join(DEVICE_MAPS))
        missing = accelerate_missing()
        if missing:
            raise OptionError("device_map", "{device_map} needs accelerate to place the model: {missing}",
                              "pip install accelerate", missing=missing)
    placement = {"device_map": device_map, "max_memory": max_memory}
    tokenizer, module, notes = None, None, []

    def pretrained(ref: str | Path, local_files_only: bool = True) -> tuple[nn.Module, str, Any]:
        return _from_pretrained(ref, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                local_files_only=local_files_only, **placement)

    if kind == "demo":
        model, family, tokenizer = _load_demo(spec.split(":", 1)[1], device, dtype, **placement)
    elif kind == "factory":
        model, module = _load_factory(spec)
        from transformers import PreTrainedModel

        family = _family_of(model.config) if isinstance(model, PreTrainedModel) else "module"
        model = _place_factory(model, spec, module, family, "cpu" if device_map else device, dtype, notes)
        if device_map:
            model = _dispatch(model, device_map, max_memory, dtype).eval()
    elif kind == "folder":
        if not (Path(spec).expanduser() / "config.json").is_file():
            raise CannotRun(f"model folder {spec} has no config.json: not a Hugging Face model folder",
                            "pass the folder save_pretrained wrote, or path/to/file.py:factory")
        model, family, tokenizer = pretrained(Path(spec).expanduser())
    else:
        try:
            model, family, tokenizer = pretrained(spec)
        except CannotRun as exc:
            from huggingface_hub import constants

            if isinstance(exc, OptionError) or "ships its own modelling code" in exc.message:
                raise  # not a cache miss: the model needs trust, or does not fit in max_memory
            if constants.HF_HUB_OFFLINE:
                raise CannotRun(f"model {spec} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                                "downloading it", f"on a connected machine run `hf download {spec}`, or pass a local "
                                "folder") from None
            try:
                model, family, tokenizer = pretrained(spec, local_files_only=False)
            except CannotRun as exc2:
                raise CannotRun(f"model {spec} is not in the local cache and could not be downloaded: {exc2.message}",
                                "check the id and the network, or pass a local folder") from None
            notes.append(f"downloaded {spec} from the Hugging Face Hub")
    original = getattr(getattr(model, "config", None), "_attn_implementation", None)
    placed = dict(getattr(model, "hf_device_map", None) or {}) if device_map else None
    if placed:
        device = main_device(placed)
        notes.append(f"--device-map {device_map}: {len(placed)} module group(s) over "
                     f"{', '.join(str(d) for d in dict.fromkeys(placed.values()))} (accelerate)")
    return LoadedModel(model, spec, spec.removeprefix("demo:") if kind == "demo" else spec, kind, family, device,
                       dtype, tokenizer, module, original, notes, device_map=placed)
