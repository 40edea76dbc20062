"""Evaluate scored runs: retrieval of labelled trait data (AUC-PR) and agreement between methods."""
from __future__ import annotations

import numpy as np

from ..methods.registry import figure4_keys, is_signed, method_key, method_keys, method_label
from ..store import Store
from .metrics import auc_pr, correlation_matrix, two_sidedness
from .retrain import cells_missing, grid_size, results_grid, retrain_unavailable, run_grid


def result_methods() -> list[str]:
    """Method keys the results job scores for every trait: every registered method (Concept
    Influence over the answer-start window has its own key, ``concept_influence@start3``),
    cheapest first so the pages fill in while the gradient methods run."""
    return method_keys(results_order=True)


def latest_runs(store: Store, trait: str) -> dict[str, str]:
    """``{method key: run_id}``: the newest complete run of each method for ``trait``; Concept
    Influence over an answer-start window has its own key (``concept_influence@start3``)."""
    out: dict[str, str] = {}
    frame = store.runs(status="complete")
    for row in frame.to_dict(orient="records"):
        config = store.run(row["run_id"])["config"]
        if config.get("trait") == trait:
            out[method_key(row["method"], config)] = row["run_id"]  # runs are ordered oldest first
    return out


def ensure_runs(workspace, traits: list[str] | None = None, methods: tuple[str, ...] | None = None,
                progress=None) -> dict[str, dict[str, str]]:
    """Score every (trait, method key) that has no complete run yet (default: every key of
    :func:`result_methods`); ``{trait: {method key: run_id}}``."""
    from ..methods.runner import ScoreConfig, score

    store = Store(workspace)
    out = {trait: latest_runs(store, trait) for trait in traits or store.traits()}
    todo = [(trait, key) for trait, have in out.items() for key in methods or result_methods()
            if key not in have]
    for k, (trait, key) in enumerate(todo, start=1):
        out[trait][key] = score(workspace, ScoreConfig(method=key, trait=trait),
                                progress=_within(progress, f"{method_label(key)} for {trait} "
                                                           f"({k} of {len(todo)})"))["run_id"]
    return out


def _within(progress, step: str):
    """``progress`` with every stage named inside ``step``, so a job's message says which run of
    the whole job it is at (``Vector Filter for evil (3 of 16) · score vector_filter``)."""
    if progress is None:
        return None
    return lambda stage, fraction: progress(f"{step} · {stage}", fraction)


def evaluate(workspace, traits: list[str] | None = None) -> dict:
    """AUC-PR of each method's scores against ``data_origin == trait`` and correlations between
    methods, per trait (only methods with a complete run over the same dataset); for each signed
    method (:attr:`Method.signed`) the two-sidedness diagnostic under ``two_sided`` (the trait's
    share of the top and bottom tenths, AUC-PR of the score and of its magnitude; see
    :func:`~cinf_core.experiments.metrics.two_sidedness`)."""
    store = Store(workspace)
    traits = traits or store.traits()
    if not traits:
        raise ValueError("no traits in this workspace; build the demo world or add test queries")
    result: dict = {"auc_pr": {}, "positive_rate": {}, "spearman": {}, "pearson": {}, "runs": {},
                    "two_sided": {}}
    for trait in traits:
        runs = latest_runs(store, trait)
        if not runs:
            continue
        scores, labels = {}, None
        for method, run_id in sorted(runs.items()):
            frame = store.scored_examples(run_id).sort_values("idx")
            scores[method] = frame["score"].to_numpy()
            labels = (frame["data_origin"] == trait).to_numpy() if labels is None else labels
        lengths = {len(v) for v in scores.values()}
        if len(lengths) > 1:
            raise ValueError(f"runs for trait {trait!r} cover different datasets; rescore them")
        result["runs"][trait] = runs
        result["positive_rate"][trait] = float(np.mean(labels))
        if labels.any():
            result["auc_pr"][trait] = {m: auc_pr(s, labels) for m, s in scores.items()}
            result["two_sided"][trait] = {m: two_sidedness(s, labels) for m, s in scores.items()
                                          if is_signed(m)}
        result["spearman"][trait] = correlation_matrix(scores, "spearman")
        result["pearson"][trait] = correlation_matrix(scores, "pearson")
    return result


def compute_results(workspace, progress=None, retrain_grid=results_grid, workers: int = 1) -> dict:
    """Everything the pages show for a workspace: every method scored for every trait, the SAE
    feature data and Figure 4 attributions (when an SAE is registered), the evaluation (stored in
    meta ``evaluation``), then a filter-and-retrain grid per trait (Figure 2), the longest step,
    last. ``retrain_grid(trait)`` gives each trait's grid (default :func:`results_grid`; None
    skips retraining); ``workers`` processes share its cells. A workspace without a retraining
    recipe or judge skips it and says why under ``retrain``."""
    from ..concepts.features import (attribute_run_to_features, compute_feature_data,
                                     sae_model_spec, trait_share)
    from ..models import cached_model

    store = Store(workspace)
    runs = ensure_runs(workspace, progress=progress)
    figure4: dict = {}
    saes = store.saes()
    if not saes.empty:
        sae = saes["sae_id"].iloc[-1]
        lm = cached_model(sae_model_spec(workspace, sae))
        compute_feature_data(workspace, lm, sae, dataset="train", progress=progress)
        for trait, by_method in runs.items():
            for method in figure4_keys():
                top = attribute_run_to_features(workspace, by_method[method], sae, k=10)
                figure4.setdefault(trait, {})[method] = {
                    "trait_share_top10": trait_share(top, trait),
                    "top_features": top["feature"].astype(int).tolist()}
    result = {**evaluate(workspace), "figure4": figure4}
    store.set_meta("evaluation", result)
    return {**result, "retrain": _retrain_all(workspace, store, list(runs), retrain_grid,
                                              progress, workers)}


def _retrain_all(workspace, store: Store, traits: list[str], retrain_grid, progress,
                 workers: int) -> dict:
    """``{trait: grid summary}``, or ``{"skipped": why}`` when the workspace cannot retrain."""
    if retrain_grid is None:
        return {"skipped": "no grid asked for"}
    why = retrain_unavailable(store)
    if why is not None:
        return {"skipped": why}
    return {trait: run_grid(workspace, retrain_grid(trait), progress=progress, workers=workers)
            for trait in traits}


def results_status(store: Store, retrain_grid=results_grid) -> dict:
    """What :func:`compute_results` has and still lacks in ``store``'s workspace (reads only).

    ``traits``: ``{trait: {"scored": [method keys with a complete run], "unscored": [keys of
    :func:`result_methods` without one], "grid_missing": cells of ``retrain_grid(trait)``
    (references included) not finished}}``; ``grid``: that grid's ``methods``, ``modes``,
    ``fractions``, ``seeds`` and ``cells`` a trait (None without traits or grid);
    ``retrain_unavailable``: why the workspace cannot retrain (then ``grid_missing`` is 0), or
    None; ``sae``: whether an SAE is registered (the job then recomputes its feature views).
    """
    why = None if retrain_grid is None else retrain_unavailable(store)
    traits, grid = {}, None
    for trait in store.traits():
        have = latest_runs(store, trait)
        cfg = retrain_grid(trait) if retrain_grid is not None else None
        if cfg is not None and grid is None:
            grid = {"methods": list(cfg.methods), "modes": list(cfg.modes),
                    "fractions": [float(f) for f in cfg.fractions],
                    "seeds": [int(s) for s in cfg.seeds], "cells": grid_size(cfg)}
        traits[trait] = {
            "scored": [k for k in method_keys() if k in have],
            "unscored": [k for k in result_methods() if k not in have],
            "grid_missing": cells_missing(store, cfg) if cfg is not None and why is None else 0}
    return {"traits": traits, "grid": grid, "retrain_unavailable": why,
            "sae": not store.saes().empty}


def results_missing(store: Store, retrain_grid=results_grid) -> list[str]:
    """What :func:`compute_results` would still compute in ``store``'s workspace (reads only),
    one phrase per trait and part (``"evil: 3 scoring runs"``, ``"evil: 19 retrain cells"``);
    empty when nothing."""
    return missing_phrases(results_status(store, retrain_grid))


def missing_phrases(status: dict) -> list[str]:
    """:func:`results_missing`'s phrases from a :func:`results_status`."""
    out = []
    for trait, part in status["traits"].items():
        runs, cells = len(part["unscored"]), part["grid_missing"]
        if runs:
            out.append(f"{trait}: {runs} scoring run{'s' * (runs > 1)}")
        if cells:
            out.append(f"{trait}: {cells} retrain cell{'s' * (cells > 1)}")
    return out
