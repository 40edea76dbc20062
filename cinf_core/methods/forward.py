"""Forward-only methods: Vector Filter, Projection Difference, and the random baseline.

Vector Filter       score_i = a_l(x_i, y_i) . v_hat
Projection Diff.    score_i = [a_l(x_i, y_i) - a_l(x_i, y'_i)] . v_hat,  y'_i the model's own response

a_l is the response-mean activation at layer l (response tokens only, never prompt or padding),
v_hat the concept's unit direction. Both need one truncated forward pass per example (stopping at
layer l); examples are batched by length so batches carry little padding.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from ..concepts.base import Concept, check_vector
from ..data import EncodedExample, collate
from ..models import LoadedModel, capture_layers, check_layer, find_blocks, hidden_states_at
from ..models import _StopForward as StopForward


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


def _directions(lm: LoadedModel, concepts: Sequence[Concept]) -> dict[int, tuple[list[int], torch.Tensor]]:
    """``{layer: (columns, V [d, k])}``: the unit directions of the concepts at each layer, as
    float32 columns on the model's device, and which output columns they fill."""
    if not concepts:
        raise ValueError("no concepts given; pass at least one")
    by_layer: dict[int, list[int]] = {}
    units = [_check_concept(lm, c) for c in concepts]
    for k, c in enumerate(concepts):
        by_layer.setdefault(c.layer, []).append(k)
    return {layer: (cols, torch.stack([units[k] for k in cols], dim=1).to(lm.device, torch.float32))
            for layer, cols in sorted(by_layer.items())}


@torch.no_grad()
def project(lm: LoadedModel, encoded: Sequence[EncodedExample], indices: Sequence[int],
            concepts: Sequence[Concept], batch_size: int = 32,
            on_batch: Callable[[list[int], np.ndarray], None] | None = None,
            directions: dict | None = None) -> np.ndarray:
    """``a_l . v_hat_k`` for ``encoded[i]``, i in ``indices``, and every concept k: ``[len(indices), K]``
    in ``indices`` order, from one forward per batch that stops at the highest concept layer.

    Each token's hidden state is projected on the K directions first, then averaged over the
    response tokens (equal to projecting the response mean; cheaper than forming it).
    ``on_batch(batch_indices, batch_scores [n, K])`` is called after each batch. ``directions``:
    ``_directions(lm, concepts)`` computed once by a caller that projects many chunks.
    """
    directions = _directions(lm, concepts) if directions is None else directions
    layers = list(directions)
    out = np.empty((len(indices), len(concepts)), dtype=np.float64)
    row_of = {i: r for r, i in enumerate(indices)}
    if len(row_of) != len(indices):
        raise ValueError("indices repeat an example; pass each index once")
    n_blocks = len(find_blocks(lm.model))  # the layers were checked by _directions
    for batch_idx in length_batches(encoded, indices, batch_size):
        batch = collate([encoded[i] for i in batch_idx], lm.pad_token_id)
        mask = batch["response_mask"].to(lm.device, torch.float32)
        hidden = hidden_states_at(lm.model, batch["input_ids"].to(lm.device),
                                  batch["attention_mask"].to(lm.device), layers, n_blocks=n_blocks)
        weights = (mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)).unsqueeze(1)  # [b, 1, t]
        values = torch.empty(len(batch_idx), len(concepts), dtype=torch.float32, device=lm.device)
        for layer, (cols, unit) in directions.items():
            per_token = hidden[layer].float() @ unit  # [b, t, k]
            values[:, cols] = torch.bmm(weights, per_token).squeeze(1)
        values_np = values.cpu().numpy().astype(np.float64)
        out[[row_of[i] for i in batch_idx]] = values_np
        if on_batch is not None:
            on_batch(batch_idx, values_np)
    return out


def projections(lm: LoadedModel, encoded: Sequence[EncodedExample], indices: Sequence[int],
                concept: Concept, batch_size: int = 32,
                on_batch: Callable[[list[int], np.ndarray], None] | None = None) -> np.ndarray:
    """``a_l . v_hat`` for ``encoded[i]``, i in ``indices``; returns scores in ``indices`` order.

    ``on_batch(batch_indices, batch_scores)`` is called after each batch (to stream to the store).
    """
    hook = None if on_batch is None else (lambda idx, values: on_batch(idx, values[:, 0]))
    return project(lm, encoded, indices, [concept], batch_size, hook)[:, 0]


def vector_filter(lm: LoadedModel, encoded: Sequence[EncodedExample], concept: Concept | Sequence[Concept],
                  indices: Sequence[int] | None = None, batch_size: int = 32,
                  on_batch=None) -> np.ndarray:
    """Vector Filter scores ``[len(indices)]`` (default: all examples); for a list of concepts
    ``[len(indices), K]``, all from the same forward passes."""
    indices = list(range(len(encoded))) if indices is None else list(indices)
    if isinstance(concept, Concept):
        return projections(lm, encoded, indices, concept, batch_size, on_batch)
    return project(lm, encoded, indices, list(concept), batch_size, on_batch)


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
def truncated_forward_seconds(lm: LoadedModel, encoded: Sequence[EncodedExample], layer: int,
                              batch_size: int = 32) -> tuple[int, float]:
    """The forward-only speed limit of a method that reads ``hidden_states[layer]``: the model
    truncated there (blocks above never run), over the same length batches, collated and on the
    device before the clock starts, with nothing done per example. Returns ``(n, seconds)``."""
    check_layer(lm.model, layer)
    ready = [collate([encoded[i] for i in b], lm.pad_token_id)
             for b in length_batches(encoded, range(len(encoded)), batch_size)]
    ready = [(b["input_ids"].to(lm.device), b["attention_mask"].to(lm.device)) for b in ready]
    n_blocks = len(find_blocks(lm.model))
    start = time.perf_counter()
    if layer == n_blocks:  # the last layer: the whole stack and its final norm, no LM head
        inner = lm.model.get_base_model() if hasattr(lm.model, "get_base_model") else lm.model
        body = inner.get_decoder() if hasattr(inner, "get_decoder") else inner.model
        for ids, attn in ready:
            body(input_ids=ids, attention_mask=attn, use_cache=False)
    else:
        with capture_layers(lm.model, [layer]):
            for ids, attn in ready:
                try:
                    lm.model(input_ids=ids, attention_mask=attn, use_cache=False)
                except StopForward:
                    pass
    return len(encoded), time.perf_counter() - start


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
