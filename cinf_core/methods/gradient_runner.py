"""Influence Function, Concept Influence and gradient similarity inside a stored run.

Stages, each timed: fit (or load) the EK-FAC factors once per (model, data, modules) — CI only
over blocks below its concept layer — precondition the behaviour gradient of the test queries
once, then stream the training examples' scores to the store in chunks, so a killed run resumes.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from .. import paths
from ..curvature import CurvatureConfig, load_or_fit_factors
from ..data import EncodedExample, encode_dataset
from . import gradient

CHUNK = 128


def curvature_config(cfg) -> CurvatureConfig:
    """The run's EK-FAC settings: ``cfg.curvature`` over the run's batch size and token budget."""
    return CurvatureConfig.from_dict({"max_length": cfg.max_length, "batch_size": cfg.batch_size,
                                      **cfg.curvature})


def prepare(store, cfg, lm, encoded: Sequence[EncodedExample], dataset: dict, model_row: dict,
            concept, queries: list[dict], progress=None, fit=None) -> tuple[gradient.Prepared, dict]:
    """Fit/load factors and precondition the test-query gradient; returns it with timings.

    ``fit`` replaces :func:`load_or_fit_factors` (the distributed runner hands over the factors
    its ranks fitted together).
    """
    timings: dict[str, float] = {}
    ccfg = curvature_config(cfg)
    query_enc, _ = encode_dataset(lm.tokenizer, [q["messages"] for q in queries], cfg.max_length)
    if cfg.method == "grad_sim":
        t = time.perf_counter()
        prepared = gradient.prepare_grad_sim(lm, query_enc, ccfg, batch_size=cfg.batch_size)
        timings["queries_s"] = time.perf_counter() - t
        return prepared, timings
    below = concept.layer if cfg.method == "concept_influence" else None
    seen = 0

    def fit_progress(k: int) -> None:  # the fit makes two passes over the data
        nonlocal seen
        seen += k
        if progress:
            progress("fit EK-FAC", seen / (2 * max(len(encoded), 1)))

    t = time.perf_counter()
    fitter = fit or load_or_fit_factors
    factors = fitter(lm, encoded, ccfg, cache_dir=paths.artifact_dir(store.workspace, paths.FACTORS_DIR),
                     dataset_id=dataset["dataset_id"], below_layer=below,
                     model_id=model_row["model_id"], progress=fit_progress)
    timings["fit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if cfg.method == "influence_function":
        prepared = gradient.prepare_influence_function(lm, query_enc, factors, batch_size=cfg.batch_size)
    else:
        prepared = gradient.prepare_concept_influence(lm, query_enc, factors, concept,
                                                      batch_size=cfg.batch_size,
                                                      window=cfg.concept_window)
    timings["queries_s"] = time.perf_counter() - t
    return prepared, timings


def score_chunks(lm, prepared: gradient.Prepared, encoded: Sequence[EncodedExample],
                 todo: Sequence[int], batch_size: int,
                 stream: Callable[[list[int], np.ndarray], None]) -> float:
    """Score ``todo`` in chunks, handing each chunk's scores to ``stream``; returns seconds."""
    t = time.perf_counter()
    todo = list(todo)
    for s in range(0, len(todo), CHUNK):
        chunk = todo[s:s + CHUNK]
        stream(chunk, gradient.train_scores(lm, prepared, encoded, batch_size=batch_size,
                                            indices=chunk)[:, 0])
    return time.perf_counter() - t


def run_gradient_method(store, cfg, lm, encoded, dataset, model_row, concept, queries, todo,
                        stream, progress) -> dict:
    prepared, timings = prepare(store, cfg, lm, encoded, dataset, model_row, concept, queries,
                                progress)
    timings["score_s"] = score_chunks(lm, prepared, encoded, todo, cfg.batch_size, stream)
    return timings
