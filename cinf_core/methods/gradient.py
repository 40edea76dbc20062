"""Gradient-based attribution: Influence Function, Concept Influence, gradient similarity.

Sign (DESIGN.md §1): ``score(z_i) > 0`` means upweighting ``z_i`` in training pushes the
behaviour B up. Derivation: training minimises ``R(theta) = (1/N) sum_j L(z_j) + eps L(z_i)``; at
the optimum ``grad R = 0``, so differentiating in ``eps`` gives
``d theta*/d eps = -H^{-1} grad L(z_i)`` (H the Hessian of R, here its damped EK-FAC Fisher), and

    score_i = dB/d eps = grad B^T d theta*/d eps = -grad B^T (H + lambda I)^{-1} grad L(z_i).

* Influence Function: ``B = -(1/Q) sum_q L(q)`` over the test queries, so
  ``score_i = grad L_test^T (H + lambda I)^{-1} grad L(z_i)``.
* Concept Influence: ``B = (1/Q) sum_q f_c(q)`` (``concept.measure`` of ``hidden_states[l]``), so
  ``score_i = -grad f_c^T (H + lambda I)^{-1} grad L(z_i)``; only blocks < l matter.
* Gradient similarity: IF with ``H = I`` (the response to one small SGD step on ``z_i``).

Every method preconditions the behaviour gradient once (``prepare_*`` -> :class:`Prepared`,
``[K, out, in]`` per module, K behaviours), then makes one pass over the training examples
(:func:`train_scores`, which also scores any chunk of indices so a stored run can stream and resume). A training example's gradient of a
Linear is ``G_i = sum_t g_t a_t^T``; its score against a preconditioned ``Q`` is
``<Q, G_i> = sum_t g_t^T Q a_t``, evaluated per token from the captured inputs ``a_t`` and output
gradients ``g_t`` without forming ``G_i`` (one behaviour). With K > 1 behaviours the token form costs
K times the work of forming ``G_i`` once, so ``G_i`` is formed, a block of its rows at a time
(``PRODUCT_CHUNK_BYTES`` for the batch's block: it stays in cache for its product with the K rows
of ``Q``; memory does not grow with the module).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..concepts.base import Concept, check_vector
from ..curvature.config import CurvatureConfig
from ..curvature.ekfac import EKFACFactors, precondition
from ..curvature.lm import check_examples, check_response_head, response_losses
from ..curvature.modules import select_modules
from ..curvature.tape import LinearTape, eval_mode, grad_shape
from ..data import EncodedExample, answer_start_window, collate
from ..models import base_config, block_index_of, check_layer, hidden_states_at
from ..progress import ExamplesDoneFn

PRODUCT_CHUNK_BYTES = 4 * 2**20


@dataclass
class Prepared:
    """Behaviour gradients, preconditioned and signed once, ready to score training examples.

    ``queries[name]``: ``[K, out, in(+1)]`` per tracked module (one row per behaviour: the mean
    test query, each query, or each concept); ``columns`` names the K rows. Stored behaviour-last
    in memory (strides of a contiguous ``[out, in, K]``), so the scoring pass reads any block of
    rows as a contiguous ``[rows*in, K]`` matrix without copying it (a transposed view multiplies
    up to 40% slower on small modules).
    """

    method: str
    modules: dict[str, nn.Linear]
    queries: dict[str, torch.Tensor]
    columns: list[str]

    def __post_init__(self) -> None:
        for name, q in self.queries.items():  # one module at a time: the old layout is freed as it goes
            self.queries[name] = q.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def prepare_influence_function(
    lm, queries: Sequence[EncodedExample], factors: EKFACFactors, *, batch_size: int = 8,
    per_query: bool = False,
) -> Prepared:
    """``(H + lambda I)^{-1} grad L_test`` (IF: ``B = -L_test``): one row, or one per query."""
    check_examples(queries, "test-query")
    modules = factors.tracked_modules(lm.model)
    grads = _loss_gradients(lm, modules, queries, batch_size, per_query)
    columns = [f"query_{q}" for q in range(len(queries))] if per_query else ["test_loss"]
    return Prepared("influence_function", modules,
                    precondition(factors, grads, dtype=_compute_dtype(lm.model)), columns)


def prepare_concept_influence(
    lm, queries: Sequence[EncodedExample], factors: EKFACFactors,
    concepts: Concept | Sequence[Concept], *, batch_size: int = 8, window: int | None = None,
) -> Prepared:
    """``-(H + lambda I)^{-1} grad f_c`` for each concept (CI: ``B = mean_q f_c(q)``).

    ``window``: measure ``f_c`` over the ``window`` positions where each query's answer starts
    (:func:`~cinf_core.data.answer_start_window`) instead of over all its response tokens.
    """
    concept_list = [concepts] if isinstance(concepts, Concept) else list(concepts)
    check_examples(queries, "test-query")
    if window is not None:
        queries = answer_start_window(queries, window)
    _check_concepts(lm.model, concept_list)
    top = max(c.layer for c in concept_list)
    index = block_index_of(lm.model)
    modules = {n: m for n, m in factors.tracked_modules(lm.model).items() if index[n] < top}
    for c in concept_list:
        if not any(index[n] < c.layer for n in modules):
            raise ValueError(
                f"concept {c.name!r} is at layer {c.layer} but the factors track no module in blocks "
                f"< {c.layer}; fit factors with select_modules(below_layer={c.layer})"
            )
    grads = _concept_gradients(lm, modules, queries, concept_list, batch_size)
    pre = {name: -q for name, q in precondition(factors, grads, dtype=_compute_dtype(lm.model)).items()}
    return Prepared("concept_influence", modules, pre, [c.name for c in concept_list])


def prepare_grad_sim(
    lm, queries: Sequence[EncodedExample], cfg: CurvatureConfig, *, batch_size: int = 8,
    per_query: bool = False,
) -> Prepared:
    """``grad L_test`` over ``select_modules(lm.model, cfg)`` (IF with ``H = I``)."""
    check_examples(queries, "test-query")
    modules = select_modules(lm.model, cfg)
    grads = _loss_gradients(lm, modules, queries, batch_size, per_query)
    columns = [f"query_{q}" for q in range(len(queries))] if per_query else ["test_loss"]
    return Prepared("grad_sim", modules, grads, columns)


def influence_function(
    lm,
    train: Sequence[EncodedExample],
    queries: Sequence[EncodedExample],
    factors: EKFACFactors,
    *,
    batch_size: int = 8,
    per_query: bool = False,
    indices: Sequence[int] | None = None,
    progress: ExamplesDoneFn = None,
) -> np.ndarray:
    """IF scores ``grad L_test^T (H + lambda I)^{-1} grad L(z_i)`` (B = minus the test loss).

    ``lm``: a LoadedModel (``model``, ``pad_token_id``). ``L`` is the cross-entropy summed over
    response tokens; ``L_test`` its mean over ``queries``. With ``per_query`` one column per query
    (``L_test = L(q)``). ``indices``: score only these training examples (to resume a run).
    Returns ``[len(indices)]`` or ``[len(indices), n_queries]`` float64, in ``indices`` order.
    """
    prepared = prepare_influence_function(lm, queries, factors, batch_size=batch_size, per_query=per_query)
    scores = train_scores(lm, prepared, train, batch_size=batch_size, indices=indices, progress=progress)
    return scores if per_query else scores[:, 0]


def concept_influence(
    lm,
    train: Sequence[EncodedExample],
    queries: Sequence[EncodedExample],
    factors: EKFACFactors,
    concepts: Concept | Sequence[Concept],
    *,
    batch_size: int = 8,
    window: int | None = None,
    indices: Sequence[int] | None = None,
    progress: ExamplesDoneFn = None,
) -> np.ndarray:
    """CI scores ``-grad f_c^T (H + lambda I)^{-1} grad L(z_i)`` for one or several concepts.

    ``f_c`` = ``concept.measure(hidden_states[concept.layer], response_mask)`` averaged over the test
    queries; the query forward stops at the highest concept layer and only factor modules in
    blocks below a concept's layer carry its gradient. All concepts share one pass over ``train``.
    ``window``: measure over each query's first ``window`` answer positions, from its last prompt
    token (None: every response token, the paper's definition).
    Returns ``[len(indices)]`` for one concept, ``[len(indices), n_concepts]`` for a list.
    """
    prepared = prepare_concept_influence(lm, queries, factors, concepts, batch_size=batch_size,
                                         window=window)
    scores = train_scores(lm, prepared, train, batch_size=batch_size, indices=indices, progress=progress)
    return scores[:, 0] if isinstance(concepts, Concept) else scores


def grad_sim(
    lm,
    train: Sequence[EncodedExample],
    queries: Sequence[EncodedExample],
    cfg: CurvatureConfig,
    *,
    batch_size: int = 8,
    per_query: bool = False,
    indices: Sequence[int] | None = None,
    progress: ExamplesDoneFn = None,
) -> np.ndarray:
    """Gradient similarity ``grad L_test^T grad L(z_i)``: IF with ``H = I``.

    Modules: ``select_modules(lm.model, cfg)``. Shapes and options as :func:`influence_function`.
    """
    prepared = prepare_grad_sim(lm, queries, cfg, batch_size=batch_size, per_query=per_query)
    scores = train_scores(lm, prepared, train, batch_size=batch_size, indices=indices, progress=progress)
    return scores if per_query else scores[:, 0]


# ---------------------------------------------------------------- behaviour gradients


def _loss_gradients(
    lm, modules: dict[str, nn.Linear], queries: Sequence[EncodedExample], batch_size: int, per_query: bool
) -> dict[str, torch.Tensor]:
    """``grad L_test`` per module: ``[1, out, in]`` (mean over queries) or ``[n_queries, out, in]``,
    in the preconditioning dtype (:func:`_compute_dtype`) on the model's device (preconditioning
    runs there too)."""
    n = len(queries)
    rows = n if per_query else 1
    device = _device(lm.model)
    grads = {name: torch.zeros(rows, *grad_shape(m), dtype=_compute_dtype(lm.model), device=device)
             for name, m in modules.items()}
    offset = 0

    def collect(name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        if per_query:
            grads[name][offset: offset + g.shape[0]] += torch.bmm(g.transpose(1, 2), a)
        else:
            _add_token_products(grads[name][0], g, a, 1 / n)

    check_response_head(lm.model, collate(queries[:batch_size], lm.pad_token_id))
    with eval_mode(lm.model), LinearTape(modules, collect, mask_inputs=False, model=lm.model) as tape:
        for start in range(0, n, batch_size):
            batch = collate(queries[start: start + batch_size], lm.pad_token_id)
            offset = start
            tape.start(batch["attention_mask"])
            tape.backward(response_losses(lm.model, batch).sum())
    return grads


def _concept_gradients(
    lm, modules: dict[str, nn.Linear], queries: Sequence[EncodedExample], concepts: list[Concept], batch_size: int
) -> dict[str, torch.Tensor]:
    """``grad f_c`` per module for each concept: ``[n_concepts, out, in]`` (mean over queries), in
    the preconditioning dtype (:func:`_compute_dtype`)."""
    n = len(queries)
    device = _device(lm.model)
    grads = {name: torch.zeros(len(concepts), *grad_shape(m), dtype=_compute_dtype(lm.model), device=device)
             for name, m in modules.items()}
    layers = sorted({c.layer for c in concepts})
    current = 0

    def collect(name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        _add_token_products(grads[name][current], g, a)

    with eval_mode(lm.model), LinearTape(modules, collect, mask_inputs=False, model=lm.model) as tape:
        for start in range(0, n, batch_size):
            batch = collate(queries[start: start + batch_size], lm.pad_token_id)
            tape.start(batch["attention_mask"])
            hidden = hidden_states_at(
                lm.model, batch["input_ids"].to(device), batch["attention_mask"].to(device), layers
            )
            mask = batch["response_mask"].to(device)
            for k, concept in enumerate(concepts):
                current = k
                h = hidden[concept.layer]
                value = concept.measure(h.to(torch.promote_types(h.dtype, torch.float32)), mask).sum() / n
                tape.backward(value, retain_graph=k < len(concepts) - 1)
    return grads


# ---------------------------------------------------------------- training pass


def train_scores(
    lm,
    prepared: Prepared,
    train: Sequence[EncodedExample],
    *,
    batch_size: int = 8,
    indices: Sequence[int] | None = None,
    progress: ExamplesDoneFn = None,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Scores ``<Q_k, grad L(z_i)>`` summed over modules: ``[len(indices), K]`` float64.

    One pass over ``train[indices]`` (all by default; rows in that order) in batches of examples
    of similar length (longest first: little padding; a score does not depend on its batch);
    ``progress(k)`` after each batch. Scoring a chunk of indices at a time lets a long run stream
    and resume. ``timings`` (a dict) receives ``pass_s`` (the whole pass) and ``products_s``
    (the part spent on the gradients: masking and the products with ``Q``).
    """
    modules, queries = prepared.modules, prepared.queries
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(train))) if indices is None else [int(i) for i in indices]
    bad = [i for i in order if not 0 <= i < len(train)]
    if bad:
        raise ValueError(f"indices {bad[:5]} are out of range for {len(train)} training examples")
    check_examples(train, "training")
    k = next(iter(queries.values())).shape[0]
    scores = torch.zeros(len(order), k, dtype=torch.float64)
    q_dev: dict[str, torch.Tensor] = {}
    rows = torch.zeros(0, dtype=torch.long)
    by_length = sorted(range(len(order)), key=lambda r: -len(train[order[r]].input_ids))

    def score(name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        if name not in q_dev:  # Q on the gradients' device and dtype (no copy when they match)
            q_dev[name] = queries[name].to(device=g.device, dtype=g.dtype)
        q = q_dev[name]
        batch, seq, out = g.shape
        if k == 1:
            # sum_t g_t^T Q a_t: [b, t, out] @ [out, in], times a, summed.
            s = ((g @ q[0]) * a).sum(dim=(1, 2)).unsqueeze(1)
        else:
            # G_i = g^T a for a block of output rows of the whole batch (one batched matrix
            # product), then [b, rows*in] @ [rows*in, k] with the same rows of Q (contiguous as
            # Prepared stores it); each block stays in cache for its product and each Q row is
            # read once a batch. On a 1536 x 576 module, 16 examples, 8 behaviours: 28.6 ms
            # against 41 ms formed a few whole examples at a time; contracting token by token
            # took 5x as long over SmolLM2's modules.
            rows_per = max(1, PRODUCT_CHUNK_BYTES // (batch * a.shape[-1] * a.element_size()))
            g_t = g.transpose(1, 2)
            s = sum(torch.bmm(g_t[:, r:r + rows_per], a).reshape(batch, -1) @ q[:, r:r + rows_per].reshape(k, -1).T
                    for r in range(0, out, rows_per))
        scores.index_add_(0, rows, s.double().cpu())

    start_time = time.perf_counter()
    if by_length:
        check_response_head(lm.model, collate([train[order[r]] for r in by_length[:batch_size]],
                                              lm.pad_token_id))
    with eval_mode(lm.model), LinearTape(modules, score, mask_inputs=False, model=lm.model) as tape:
        for start in range(0, len(by_length), batch_size):
            batch_rows = by_length[start: start + batch_size]
            batch = collate([train[order[r]] for r in batch_rows], lm.pad_token_id)
            rows = torch.tensor(batch_rows, dtype=torch.long)
            tape.start(batch["attention_mask"])
            tape.backward(response_losses(lm.model, batch).sum())
            if progress is not None:
                progress(len(batch_rows))
    if timings is not None:
        timings["pass_s"] = timings.get("pass_s", 0.0) + time.perf_counter() - start_time
        timings["products_s"] = timings.get("products_s", 0.0) + tape.seconds
    return scores.numpy()


# ---------------------------------------------------------------- helpers


def _check_concepts(model: nn.Module, concepts: list[Concept]) -> None:
    if not concepts:
        raise ValueError("no concepts given; pass a Concept or a non-empty list of them")
    d_model = int(base_config(model).hidden_size)
    for c in concepts:
        if not isinstance(c, Concept):
            raise TypeError(f"expected a Concept, got {type(c).__name__}")
        check_layer(model, c.layer)
        if c.layer == 0:
            raise ValueError(
                f"concept {c.name!r} is at layer 0 (the embeddings): no transformer block lies below it; "
                "use a layer >= 1"
            )
        check_vector(c.direction(), d_model, f"concept {c.name!r} direction")
        if getattr(c, "w_enc", None) is not None:
            check_vector(c.w_enc, d_model, f"concept {c.name!r} SAE encoder column w_enc")
        b_dec = getattr(c, "b_dec", None)
        if b_dec is not None and (tuple(b_dec.shape) != (d_model,) or not torch.isfinite(b_dec).all()):
            raise ValueError(
                f"concept {c.name!r} SAE decoder bias b_dec has shape {tuple(b_dec.shape)} or non-finite "
                f"values; it must be a finite vector of shape ({d_model},) (an SAE of this model's layer)"
            )


def _add_token_products(out: torch.Tensor, g: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> None:
    """``out += scale * sum_{b,t} g_bt a_bt^T`` as one matrix product accumulated in place (15-20%
    faster than ``einsum`` plus a float64 copy on SmolLM2's modules)."""
    out.addmm_(g.reshape(-1, g.shape[-1]).T.to(out.dtype), a.reshape(-1, a.shape[-1]).to(out.dtype), alpha=scale)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """Preconditioning precision: the model's, at least float32 (float64 for a float64 model)."""
    return torch.promote_types(next(model.parameters()).dtype, torch.float32)

