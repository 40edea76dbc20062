"""Forward-only methods: Vector Filter, Projection Difference, and the random baseline.

Vector Filter       score_i = a_l(x_i, y_i) . v_hat
Projection Diff.    score_i = [a_l(x_i, y_i) - a_l(x_i, y'_i)] . v_hat,  y'_i the model's own response

a_l is the response-mean activation at layer l (response tokens only, never prompt or padding),
v_hat the concept's unit direction. Both need one truncated forward pass per example (stopping at
layer l); examples are batched by length so batches carry little padding.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..concepts.base import Concept, check_vector
from ..data import EncodedExample, collate
from ..models import LoadedModel, check_layer, hidden_states_at, response_mean


def length_batches(encoded: Sequence[EncodedExample], indices: Sequence[int],
                   batch_size: int) -> list[list[int]]:
    """Split ``indices`` into batches of similar length (longest first), preserving each index."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(indices, key=lambda i: -len(encoded[i].input_ids))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _check_concept(lm: LoadedModel, concept: Concept) -> torch.Tensor:
    check_layer(lm.model, concept.layer)
    direction = concept.direction()
    check_vector(direction, lm.hidden_size, f"concept {concept.name!r}")
    return direction


@torch.no_grad()
def projections(lm: LoadedModel, encoded: Sequence[EncodedExample], indices: Sequence[int],
                concept: Concept, batch_size: int = 32,
                on_batch: Callable[[list[int], np.ndarray], None] | None = None) -> np.ndarray:
    """``a_l . v_hat`` for ``encoded[i]``, i in ``indices``; returns scores in ``indices`` order.

    ``on_batch(batch_indices, batch_scores)`` is called after each batch (to stream to the store).
    """
    direction = _check_concept(lm, concept).to(lm.device)
    out = {}
    for batch_idx in length_batches(encoded, indices, batch_size):
        batch = collate([encoded[i] for i in batch_idx], lm.pad_token_id)
        hidden = hidden_states_at(lm.model, batch["input_ids"].to(lm.device),
                                  batch["attention_mask"].to(lm.device), [concept.layer])[concept.layer]
        means = response_mean(hidden.float(), batch["response_mask"].to(lm.device))
        values = (means @ direction.to(means.dtype)).cpu().numpy().astype(np.float64)
        out.update(zip(batch_idx, values))
        if on_batch is not None:
            on_batch(batch_idx, values)
    return np.array([out[i] for i in indices], dtype=np.float64)


def vector_filter(lm: LoadedModel, encoded: Sequence[EncodedExample], concept: Concept,
                  indices: Sequence[int] | None = None, batch_size: int = 32,
                  on_batch=None) -> np.ndarray:
    """Vector Filter scores ``[len(indices)]`` (default: all examples)."""
    indices = list(range(len(encoded))) if indices is None else list(indices)
    return projections(lm, encoded, indices, concept, batch_size, on_batch)


def projection_difference(lm: LoadedModel, encoded: Sequence[EncodedExample],
                          encoded_own: Sequence[EncodedExample], concept: Concept,
                          indices: Sequence[int] | None = None, batch_size: int = 32,
                          on_batch=None) -> np.ndarray:
    """Projection Difference: projection of the data's response minus that of the model's own.

    ``encoded_own[i]`` is example i's prompt with the model's generated response y'_i.
    """
    if len(encoded_own) != len(encoded):
        raise ValueError(f"{len(encoded_own)} generated responses for {len(encoded)} examples; "
                         "generate one response per training prompt")
    indices = list(range(len(encoded))) if indices is None else list(indices)
    results = {}
    for batch_idx in length_batches(encoded, indices, batch_size):
        mine = projections(lm, encoded, batch_idx, concept, len(batch_idx))
        own = projections(lm, encoded_own, batch_idx, concept, len(batch_idx))
        results.update(zip(batch_idx, mine - own))
        if on_batch is not None:
            on_batch(batch_idx, mine - own)
    return np.array([results[i] for i in indices], dtype=np.float64)


def random_scores(n: int, seed: int, indices: Sequence[int] | None = None) -> np.ndarray:
    """Seeded standard-normal scores; example i always gets the same score for a seed."""
    scores = np.random.default_rng(seed).standard_normal(n)
    return scores if indices is None else scores[list(indices)]


@torch.no_grad()
def forward_throughput_batches(lm: LoadedModel, encoded: Sequence[EncodedExample],
                               batch_size: int = 32) -> int:
    """Plain full-model batched forward over all examples (the forward-only speed limit).

    Same length batching as the methods; returns the number of examples processed.
    """
    n = 0
    for batch_idx in length_batches(encoded, range(len(encoded)), batch_size):
        batch = collate([encoded[i] for i in batch_idx], lm.pad_token_id)
        lm.model(input_ids=batch["input_ids"].to(lm.device),
                 attention_mask=batch["attention_mask"].to(lm.device), use_cache=False)
        n += len(batch_idx)
    return n
