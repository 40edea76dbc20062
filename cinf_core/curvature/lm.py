"""The language-model training loss the curvature and the gradient methods differentiate."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..data import ChatExample, EncodedExample, encode_dataset

IGNORE = -100


def response_losses(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    sample_seeds: Sequence[int] | None = None,
    sample_cache: dict | None = None,
) -> torch.Tensor:
    """Per-example training loss ``L(z)``: cross-entropy summed over the response tokens.

    ``batch`` as :func:`cinf_core.data.collate` (``input_ids``, ``attention_mask``, ``labels``, all
    ``[batch, seq]``). With ``sample_seeds`` (one per example) the labels at response positions are
    drawn from the model's own predictive distribution (true Fisher) with a generator seeded per
    example, so the draw does not depend on how examples are batched. ``sample_cache`` (a dict,
    keyed by seed) keeps each example's draw, so a second pass over the same examples reuses it
    instead of drawing again from the same distribution. Returns ``[batch]``.
    """
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    logits = logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = batch["labels"][:, 1:].to(device)
    if sample_seeds is not None:
        targets = _sample_targets(logits.detach(), targets, sample_seeds, sample_cache)
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return token_loss.view(targets.shape).sum(dim=1)


def _sample_targets(logits: torch.Tensor, targets: torch.Tensor, seeds: Sequence[int],
                    cache: dict | None = None) -> torch.Tensor:
    sampled = targets.clone()
    for b, seed in enumerate(seeds):
        positions = (targets[b] != IGNORE).nonzero(as_tuple=True)[0]
        if positions.numel() == 0:
            continue
        drawn = None if cache is None else cache.get(int(seed))
        if drawn is None or drawn.shape[0] != positions.numel():
            probs = torch.softmax(logits[b, positions].double(), dim=-1).cpu()
            gen = torch.Generator().manual_seed(int(seed))
            drawn = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            if cache is not None:
                cache[int(seed)] = drawn
        sampled[b, positions] = drawn.to(device=targets.device, dtype=sampled.dtype)
    return sampled


def as_encoded(
    tokenizer, examples: Sequence[ChatExample | EncodedExample | Sequence[dict]], max_length: int | None
) -> list[EncodedExample]:
    """Encoded examples, encoding chats with ``max_length`` (already encoded ones pass through)."""
    if all(isinstance(e, EncodedExample) for e in examples):
        return list(examples)
    if any(isinstance(e, EncodedExample) for e in examples):
        raise ValueError("mix of encoded and raw chat examples; pass one kind")
    encoded, _ = encode_dataset(tokenizer, examples, max_length)
    return encoded


def check_examples(encoded: Sequence[EncodedExample], what: str) -> None:
    """Every example must have at least one response token that a position predicts."""
    if len(encoded) == 0:
        raise ValueError(f"the {what} set is empty; pass at least one example")
    for i, e in enumerate(encoded):
        if not any(e.response_mask[1:]):
            raise ValueError(
                f"{what} example {i} has no predicted response token (response_mask={e.response_mask}); "
                "each example needs a prompt and a non-empty response"
            )
