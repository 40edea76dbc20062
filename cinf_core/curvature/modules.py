"""Which Linear modules the curvature (and the gradient methods) track."""
from __future__ import annotations

from torch import nn

from ..models import block_index_of, check_layer, find_blocks
from .config import CurvatureConfig

ATTN_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "ffn", "feed_forward")


def module_kind(name: str) -> str | None:
    """'attn', 'mlp' or None from the dotted path of a module inside a block."""
    parts = name.lower().split(".")
    if any(w in p for p in parts for w in ATTN_WORDS):
        return "attn"
    if any(w in p for p in parts for w in MLP_WORDS):
        return "mlp"
    return None


def is_lora_module(name: str) -> bool:
    """True for the A/B matrices of a peft LoRA adapter (``...lora_A.<adapter>``)."""
    parts = name.split(".")
    return "lora_A" in parts or "lora_B" in parts


def select_modules(
    model: nn.Module, cfg: CurvatureConfig, below_layer: int | None = None
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules inside transformer blocks that ``cfg`` selects, by name.

    Blocks ``block_start, block_start + block_stride, ...`` below ``block_stop``; of each block the
    attention and/or MLP Linears (``cfg.kinds``); with ``cfg.lora_only`` only LoRA A/B matrices.
    ``below_layer=l`` keeps blocks with index < l: ``hidden_states[l]`` is the output of block
    ``l-1``, so only blocks ``0..l-1`` influence a measurement there. The LM head and the
    embeddings are never selected (they sit outside the blocks).
    """
    n_blocks = len(find_blocks(model))
    stop = n_blocks if cfg.block_stop is None else min(cfg.block_stop, n_blocks)
    if below_layer is not None:
        check_layer(model, below_layer)
        stop = min(stop, below_layer)
    wanted = set(range(cfg.block_start, stop, cfg.block_stride))
    index = block_index_of(model)
    selected: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or index.get(name) not in wanted:
            continue
        if cfg.lora_only and not is_lora_module(name):
            continue
        kind = module_kind(name)
        if cfg.kinds != "both" and kind != cfg.kinds:
            continue
        selected[name] = module
    if not selected:
        why = []
        if below_layer is not None:
            why.append(f"below_layer={below_layer} keeps blocks < {below_layer}")
        why.append(
            f"blocks {cfg.block_start}:{cfg.block_stop}:{cfg.block_stride} of {n_blocks}, kinds={cfg.kinds!r}"
        )
        if cfg.lora_only:
            why.append("lora_only=True (does the model carry a peft LoRA adapter?)")
        raise ValueError(
            "no Linear modules selected for curvature: " + "; ".join(why)
            + ". Widen block_start/block_stop/block_stride or kinds, or use a higher concept layer."
        )
    return selected
