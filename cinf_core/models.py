"""Model access: load a causal LM (+ PEFT adapter), read hidden states at a layer.

Layer convention: layer ``l`` is HF ``hidden_states[l]``; 0 is the embedding output,
``l`` in 1..L is the residual stream after block ``l-1``. Layer L (the last) is what HF returns
after the final norm, so asking for it runs the whole model; any lower layer stops the forward
right after block ``l-1``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .data import EncodedExample, batches, encode_dataset, encode_example


@dataclass
class ModelSpec:
    """What to load. ``path`` is a local directory or a hub id."""

    path: str
    adapter: str | None = None
    merge_adapter: bool = False
    dtype: str = "auto"
    device: str | None = None
    trust_remote_code: bool = False
    name: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def model_id(self) -> str:
        """Stable id from what determines the weights (not device or dtype)."""
        key = json.dumps({"path": self.path, "adapter": self.adapter}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def weights_fingerprint(self) -> str | None:
        """Name, size and modification time of every file in the local model and adapter folders.

        It changes when a model or an adapter is rewritten in place (a retrained LoRA saved to the
        same folder), which the id above cannot see; runs put it in their key so such a model is
        scored again instead of served stale. ``None`` when neither folder is local (a hub id).
        Cheap: no file is read.
        """
        rows = []
        for kind, where in (("model", self.path), ("adapter", self.adapter)):
            if not where or not Path(where).is_dir():
                continue
            root = Path(where)
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    st = f.stat()
                    rows.append([kind, f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
        if not rows:
            return None
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: ModelSpec
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def num_layers(self) -> int:
        return len(find_blocks(self.model))

    @property
    def hidden_size(self) -> int:
        return int(base_config(self.model).hidden_size)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)


def torch_threads(requested: int | None = None) -> int:
    """Intra-op CPU threads: ``requested``, or the cores not busy right now.

    Waiting intra-op threads spin, so on a shared machine whose cores are already taken two
    threads run far slower than one (measured on the 2-core dev box under load 7: 219 vs 2406
    training tokens/s; a tiny-model forward pass 70x slower).
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1 (or None for automatic), got {requested}")
        return requested
    cores = os.cpu_count() or 1
    return max(1, min(cores, int(cores - os.getloadavg()[0] + 0.5)))


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return table[dtype]


def _is_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~"))


def _check_source(path: str, what: str) -> None:
    if Path(path).expanduser().exists():
        return
    if _is_hub_id(path) or "/" not in path:
        return  # a hub id: transformers resolves it (needs network or a local HF cache)
    raise FileNotFoundError(f"{what} directory not found: {path}; pass an existing folder or a hub id")


def check_model_files(spec: ModelSpec) -> None:
    """Refuse a local model or adapter folder without its config or weights, before it is
    registered (a hub id is resolved only when the model loads)."""
    from transformers.utils import (CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME,
                                    WEIGHTS_INDEX_NAME, WEIGHTS_NAME)

    _check_folder(spec.path, "model", CONFIG_NAME,
                  (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME),
                  "model.save_pretrained(folder)")
    if spec.adapter:
        from peft.utils.constants import CONFIG_NAME as ADAPTER_CONFIG
        from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME as ADAPTER_WEIGHTS

        _check_folder(spec.adapter, "adapter", ADAPTER_CONFIG,
                      (SAFETENSORS_WEIGHTS_NAME, ADAPTER_WEIGHTS),
                      "peft_model.save_pretrained(folder)")


def _check_folder(path: str, what: str, config: str, weights: Sequence[str], save: str) -> None:
    _check_source(path, what)
    folder = Path(path).expanduser()
    if not folder.exists():
        return  # a hub id
    if not folder.is_dir():
        raise ValueError(f"{what} path {path} is a file; pass the folder written by {save}")
    if not (folder / config).is_file():
        raise ValueError(f"{what} folder {path} has no {config}; save the {what} there with {save}")
    if not any((folder / name).is_file() for name in weights):
        raise ValueError(f"{what} folder {path} holds no weights (none of {', '.join(weights)}); "
                         f"save the {what} there with {save}")


def model_dimensions(spec: ModelSpec) -> tuple[int, int]:
    """``(n_layers, d_model)`` from the model's config alone (no weights are loaded): what a
    concept or an SAE can read is ``hidden_states[0..n_layers]``, each ``d_model`` wide."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    return int(cfg.num_hidden_layers), int(cfg.hidden_size)


def load_model(spec: ModelSpec | str, **overrides) -> LoadedModel:
    """Load tokenizer + causal LM (+ optional PEFT adapter, kept or merged) in eval mode.

    Refuses (``ValueError``) a checkpoint that does not fill its architecture exactly and an
    adapter that does not fit its base: transformers and PEFT only warn about those, and the model
    would then run on randomly initialised weights (see :func:`check_load_report`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if isinstance(spec, str):
        spec = ModelSpec(path=spec, **overrides)
    _check_source(spec.path, "model")
    if spec.adapter:
        _check_source(spec.adapter, "adapter")
        check_adapter_base(spec)
    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device)
    tok_source = spec.path
    if spec.adapter and (Path(spec.adapter) / "tokenizer_config.json").exists():
        tok_source = spec.adapter
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source, trust_remote_code=spec.trust_remote_code)
        # Weights of the wrong shape come back in the report (and are refused below) instead of
        # an error that points at a report on stderr.
        model, report = AutoModelForCausalLM.from_pretrained(
            spec.path, dtype=dtype, trust_remote_code=spec.trust_remote_code,
            output_loading_info=True, ignore_mismatched_sizes=True)
    except OSError as err:
        raise OSError(
            f"could not load model {spec.path!r}: {err}. If this is a hub id, this machine needs "
            "network access or a local HF cache; otherwise pass a local directory."
        ) from err
    check_load_report(model, report, spec.path)
    if spec.adapter:
        model = _load_adapter(model, spec)
        if spec.merge_adapter:
            model = model.merge_and_unload()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, device=device)


# ---------------------------------------------------------------- checkpoint integrity

SHOWN_KEYS = 4
"""How many offending keys an integrity error lists."""
_PEFT_KEY = re.compile(r"\.base_layer\.|\.lora_[A-Za-z]+\.|\.modules_to_save\.")
_PEFT_SAVED_AS_BASE = (
    "The checkpoint holds PEFT keys (…base_layer… / lora_…): the model was saved while "
    "peft.get_peft_model wrapped its layers. Save the base before wrapping it "
    "(model.save_pretrained) and the adapter with peft_model.save_pretrained(adapter_folder), then "
    "pass the adapter with --adapter; or save peft_model.merge_and_unload() as the model.")
_WRONG_CHECKPOINT = (
    "This usually means a model saved while PEFT wrapped its layers, or the wrong folder (weights "
    "of another model or architecture, or a config.json that does not belong to them).")


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def check_load_report(model: nn.Module, report: dict, path: str) -> None:
    """Refuse a checkpoint that leaves parameters of the architecture uninitialised, holds weights
    the architecture has no place for, or holds weights of other shapes.

    ``report`` is transformers' ``output_loading_info``. transformers only prints a LOAD REPORT
    for these and fills the gaps with random weights (different on every load). A parameter tied
    to one that was loaded (tied input/output embeddings) is not uninitialised; transformers 5
    already leaves those out of ``missing_keys``, and the tie is checked here as well.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    absent = set(report.get("missing_keys") or ())
    loaded = {p.data_ptr() for name, p in params.items() if name not in absent}
    missing = {k for k in absent if k in params and params[k].data_ptr() not in loaded}
    unexpected = set(report.get("unexpected_keys") or ())
    mismatched = [f"{key} ({tuple(saved)} in the checkpoint, {tuple(wanted)} in the model)"
                  for key, saved, wanted in report.get("mismatched_keys") or ()]
    errors = list(report.get("error_msgs") or ())
    if not (missing or unexpected or mismatched or errors):
        return
    arch = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    parts = []
    if missing:
        parts.append(f"{len(missing)} parameter(s) of {arch} are not in it and would be left "
                     f"randomly initialised: {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) in it have no place in {arch}: "
                     f"{_listed(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} weight(s) have another shape than config.json gives: "
                     f"{_listed(mismatched)}")
    parts += errors[:SHOWN_KEYS]
    cause = (_PEFT_SAVED_AS_BASE if any(_PEFT_KEY.search(k) for k in unexpected)
             else _WRONG_CHECKPOINT)
    raise ValueError(f"model {path}: the checkpoint does not fit its architecture; "
                     + "; ".join(parts) + f". {cause} cinf refuses to use it.")


def _weights_digest(folder: Path) -> str:
    """Names, sizes, and the first and last MiB of every weights file: equal for a copy of a
    model, different for another model of the same shape, without reading whole checkpoints."""
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def check_adapter_base(spec: ModelSpec) -> None:
    """Refuse an adapter whose ``adapter_config.json`` names another base model than ``spec.path``,
    where that can be checked: two hub ids that differ, or an absolute local folder that exists and
    holds other weights than ``spec.path`` (a copy of the same model passes). A relative or absent
    folder, or a hub id against a local folder, cannot be compared and passes; shapes and modules
    are still checked when the adapter loads."""
    config = Path(spec.adapter) / "adapter_config.json"
    if not config.is_file():
        return
    named = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not named:
        return
    given, recorded = Path(spec.path).expanduser(), Path(named).expanduser()
    if given.exists():
        if not (recorded.is_absolute() and recorded.is_dir()) or recorded.samefile(given):
            return
        if _weights_digest(recorded) == _weights_digest(given):
            return
    elif not (_is_hub_id(named) and named != spec.path):
        return
    raise ValueError(
        f"adapter {spec.adapter} was trained on {named} (base_model_name_or_path in its "
        f"adapter_config.json), but the model given is {spec.path}, which holds other weights; "
        f"pass {named} as the model. If {spec.path} is that model under another name, set "
        "base_model_name_or_path in adapter_config.json to it.")


def _load_adapter(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Wrap ``model`` with the PEFT adapter of ``spec``; refuse an adapter that does not fit: no
    target module in the model, weights of other shapes, or adapter weights that would be left
    out or left at their initial values (other layers or modules than the model has)."""
    import warnings

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    fix = (f"Pass the base model the adapter was trained on (base_model_name_or_path in "
           f"{Path(spec.adapter) / 'adapter_config.json'}).")
    try:
        with warnings.catch_warnings():
            # PEFT's own warning for missing adapter keys; they are refused below, by name.
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_model = PeftModel.from_pretrained(model, spec.adapter)
    except (RuntimeError, ValueError) as err:
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:SHOWN_KEYS + 1]
                           if line.strip()) or str(err)
        raise ValueError(f"adapter {spec.adapter} does not fit model {spec.path}: "
                         f"{detail.rstrip('. ')}. "
                         f"{fix}") from err
    saved = set(load_peft_weights(spec.adapter, device="cpu"))
    expected = set(get_peft_model_state_dict(peft_model))
    parts = []
    if expected - saved:
        parts.append(f"{len(expected - saved)} adapter weight(s) the model has modules for are not "
                     f"in the adapter and would stay at their initial values: "
                     f"{_listed(expected - saved)}")
    if saved - expected:
        parts.append(f"{len(saved - expected)} adapter weight(s) have no module in the model and "
                     f"would be ignored: {_listed(saved - expected)}")
    if parts:
        raise ValueError(f"adapter {spec.adapter} does not fit model {spec.path}: "
                         + "; ".join(parts) + f". {fix}")
    return peft_model


# ---------------------------------------------------------------- structure


_MODEL_CACHE: dict[tuple, LoadedModel] = {}


def cached_model(spec: ModelSpec) -> LoadedModel:
    """Load a model once per process: the one loader behind scoring, benchmarks and the app's
    token-level views (each holds the same weights instead of its own copy)."""
    key = (spec.path, spec.adapter, spec.merge_adapter, spec.dtype, spec.device,
           spec.weights_fingerprint())  # a model rewritten in place is loaded again
    if key not in _MODEL_CACHE:
        for old in [k for k in _MODEL_CACHE if k[:5] == key[:5]]:
            del _MODEL_CACHE[old]  # the same folders, older files
        _MODEL_CACHE[key] = load_model(spec)
    return _MODEL_CACHE[key]


def base_config(model: nn.Module):
    """The HF config of a model, unwrapping PEFT."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the ModuleList with ``num_hidden_layers`` entries."""
    n = int(base_config(model).num_hidden_layers)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"could not find the {n} transformer blocks of {type(model).__name__}")


def block_index_of(model: nn.Module) -> dict[str, int]:
    """Map every submodule name to the index of the block that contains it (if any)."""
    blocks = find_blocks(model)
    prefix = next(name for name, mod in model.named_modules() if mod is blocks)
    out = {}
    for name, _ in model.named_modules():
        if name.startswith(prefix + "."):
            rest = name[len(prefix) + 1:]
            out[name] = int(rest.split(".")[0])
    return out


def check_layer(model: nn.Module, layer: int) -> int:
    n = len(find_blocks(model))
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer <= n:
        raise ValueError(
            f"layer {layer!r} is out of range for this model: use 0 (embeddings) to {n} "
            f"(hidden_states index; the model has {n} blocks)"
        )
    return layer


# ---------------------------------------------------------------- hidden states


class _StopForward(Exception):
    pass


@contextmanager
def capture_layers(model: nn.Module, layers: Sequence[int], stop: bool = True) -> Iterator[dict]:
    """Hooks that store ``hidden_states[l]`` for each requested layer into the yielded dict.

    With ``stop`` the forward is aborted right after the highest layer is produced (a truncated
    forward: blocks above it never run). Layer L (the last) is not captured by hooks; callers use
    ``output_hidden_states`` for it (it includes the final norm).
    """
    blocks = find_blocks(model)
    captured: dict[int, torch.Tensor] = {}
    top = max(layers, default=-1)
    handles = []

    def make_hook(layer: int):
        def hook(_mod, _inp, out):
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            captured[layer] = hidden
            if stop and layer == top:
                raise _StopForward
        return hook

    for layer in layers:
        if layer == 0:
            handles.append(model.get_input_embeddings().register_forward_hook(make_hook(0)))
        elif layer < len(blocks):
            handles.append(blocks[layer - 1].register_forward_hook(make_hook(layer)))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def hidden_states_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    n_blocks: int | None = None,
) -> dict[int, torch.Tensor]:
    """``{layer: hidden [batch, seq, d_model]}``; stops the forward after the highest layer.

    ``n_blocks``: the model's block count, from a caller that has checked ``layers`` once for
    many batches (the layers are then not checked again here)."""
    if n_blocks is None:
        for layer in layers:
            check_layer(model, layer)
    n = len(find_blocks(model)) if n_blocks is None else n_blocks
    needs_full = any(layer == n for layer in layers)
    with capture_layers(model, [l for l in layers if l < n], stop=not needs_full) as captured:
        try:
            out = model(input_ids=input_ids, attention_mask=attention_mask,
                        output_hidden_states=needs_full, use_cache=False)
        except _StopForward:
            out = None
    if needs_full:
        captured[n] = out.hidden_states[n]
    return {layer: captured[layer] for layer in layers}


def response_mean(hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens only: ``[batch, seq, d] x [batch, seq] -> [batch, d]``."""
    mask = response_mask.to(hidden.dtype).unsqueeze(-1)
    count = mask.sum(dim=1).clamp_min(1.0)
    return (hidden * mask).sum(dim=1) / count


@torch.no_grad()
def response_mean_activations(
    lm: LoadedModel,
    examples: Sequence,
    layers: int | Sequence[int],
    batch_size: int = 16,
    max_length: int | None = None,
    encoded: Sequence[EncodedExample] | None = None,
    progress=None,
) -> torch.Tensor:
    """Response-mean activations in fp32.

    ``examples`` are ChatExamples or message lists (ignored when ``encoded`` is given).
    Returns ``[n, d]`` for one layer, ``[n, len(layers), d]`` for a list.
    """
    single = not isinstance(layers, (list, tuple, range))
    layer_list = [layers] if single else list(layers)
    for layer in layer_list:
        check_layer(lm.model, layer)
    if encoded is None:
        encoded, _ = encode_dataset(lm.tokenizer, examples, max_length)
    out = torch.empty(len(encoded), len(layer_list), lm.hidden_size, dtype=torch.float32)
    for idx, batch in batches(encoded, batch_size, lm.pad_token_id):
        hs = hidden_states_at(lm.model, batch["input_ids"].to(lm.device),
                              batch["attention_mask"].to(lm.device), layer_list)
        mask = batch["response_mask"].to(lm.device)
        for j, layer in enumerate(layer_list):
            out[idx[0]: idx[-1] + 1, j] = response_mean(hs[layer].float(), mask).cpu()
        if progress is not None:
            progress(len(idx))
    return out[:, 0] if single else out


@torch.no_grad()
def token_activations(
    lm: LoadedModel, messages: Sequence[dict], layer: int, max_length: int | None = None
) -> tuple[list[str], torch.Tensor]:
    """Per-token activations of the response, for highlighting.

    Returns ``(tokens, acts [n_response_tokens, d])`` where tokens are the decoded strings.
    """
    enc = encode_example(lm.tokenizer, messages, max_length)
    ids = torch.tensor([enc.input_ids], device=lm.device)
    hidden = hidden_states_at(lm.model, ids, torch.ones_like(ids), [layer])[layer][0].float()
    keep = torch.tensor(enc.response_mask, dtype=torch.bool, device=lm.device)
    resp_ids = [t for t, m in zip(enc.input_ids, enc.response_mask) if m]
    tokens = [lm.tokenizer.decode([t]) for t in resp_ids]
    return tokens, hidden[keep].cpu()


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: Sequence[Sequence[dict]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    progress=None,
) -> list[str]:
    """Generate the assistant response to each prompt (a list of messages without the answer)."""
    tok = lm.tokenizer
    torch.manual_seed(seed)
    texts = [tok.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    old_side = tok.padding_side
    tok.padding_side = "left"
    outputs: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=lm.pad_token_id)
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            else:
                kwargs.update(do_sample=False)
            gen = lm.model.generate(**enc, **kwargs)
            new = gen[:, enc["input_ids"].shape[1]:]
            outputs.extend(tok.batch_decode(new, skip_special_tokens=True))
            if progress is not None:
                progress(len(chunk))
    finally:
        tok.padding_side = old_side
    return [o.strip() for o in outputs]
