"""The language-model training loss the curvature and the gradient methods differentiate."""
from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..data import ChatExample, EncodedExample, encode_dataset

IGNORE = -100


_HEAD_OK: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _decoder_and_head(model: nn.Module):
    """``(decoder, output layer)`` of a causal LM (PEFT unwrapped), or None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return None if decoder is None or head is None else (decoder, head)


@torch.no_grad()
def check_response_head(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether :func:`response_losses` may apply the output layer to the response positions
    only on ``model``: its decoder followed by its output layer gives the model's own logits on
    ``batch`` (False for a model that caps or scales its logits after the output layer, e.g.
    Gemma 2, which then keeps the model's own forward). Checked once per model object, in eval
    mode; call it outside any :class:`~cinf_core.curvature.tape.LinearTape` (it runs the model).
    """
    if model in _HEAD_OK:
        return _HEAD_OK[model]
    parts = _decoder_and_head(model)
    ok = False
    if parts is not None:
        from .tape import eval_mode

        decoder, head = parts
        device = next(model.parameters()).device
        ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with eval_mode(model):
            own = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
            fast = head(decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state)
        ok = own.shape == fast.shape and torch.allclose(fast.float(), own.float(), rtol=1e-4, atol=1e-5)
    _HEAD_OK[model] = ok
    return ok


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

    On a model :func:`check_response_head` accepted, the output layer (vocabulary projection,
    softmax and their backward) runs on the response positions only; prompt and padding
    positions are about half of a chat's tokens.
    """
    device = next(model.parameters()).device
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    targets = batch["labels"][:, 1:].to(device)
    keep = targets != IGNORE  # [batch, seq - 1]: the positions that predict a response token
    if _HEAD_OK.get(model):
        decoder, head = _decoder_and_head(model)
        hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    else:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1][keep]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # [n_response, vocab]
    rows = targets[keep]
    counts = keep.sum(dim=1).tolist()
    if sample_seeds is not None:
        rows = _sample_rows(logits.detach(), rows, counts, sample_seeds, sample_cache)
    token_loss = F.cross_entropy(logits, rows, reduction="none")
    owner = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                    torch.tensor(counts, device=device))
    return torch.zeros(len(counts), dtype=token_loss.dtype, device=device).index_add_(0, owner, token_loss)


def _sample_rows(logits: torch.Tensor, rows: torch.Tensor, counts: list[int], seeds: Sequence[int],
                 cache: dict | None = None) -> torch.Tensor:
    """Labels drawn from ``softmax(logits)`` per example (``counts[b]`` consecutive rows each),
    with a generator seeded by ``seeds[b]``; ``cache`` (by seed) keeps and reuses a draw."""
    sampled = rows.clone()
    start = 0
    for n, seed in zip(counts, seeds):
        if n:
            drawn = None if cache is None else cache.get(int(seed))
            if drawn is None or drawn.shape[0] != n:
                probs = torch.softmax(logits[start:start + n].double(), dim=-1).cpu()
                gen = torch.Generator().manual_seed(int(seed))
                drawn = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                if cache is not None:
                    cache[int(seed)] = drawn
            sampled[start:start + n] = drawn.to(device=rows.device, dtype=rows.dtype)
        start += n
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
