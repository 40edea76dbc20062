"""Evaluate scored runs: retrieval of labelled trait data (AUC-PR) and agreement between methods."""
from __future__ import annotations

import numpy as np

from ..store import Store
from .metrics import auc_pr, correlation_matrix


def latest_runs(store: Store, trait: str) -> dict[str, str]:
    """``{method: run_id}``: the newest complete run of each method for ``trait``."""
    out: dict[str, str] = {}
    frame = store.runs(status="complete")
    for row in frame.to_dict(orient="records"):
        config = store.run(row["run_id"])["config"]
        if config.get("trait") == trait:
            out[row["method"]] = row["run_id"]  # runs are ordered oldest first
    return out


def evaluate(workspace, traits: list[str] | None = None) -> dict:
    """AUC-PR of each method's scores against ``data_origin == trait`` and correlations between
    methods, per trait (only methods with a complete run over the same dataset)."""
    store = Store(workspace)
    traits = traits or store.traits()
    if not traits:
        raise ValueError("no traits in this workspace; build the demo world or add test queries")
    result: dict = {"auc_pr": {}, "positive_rate": {}, "spearman": {}, "pearson": {}, "runs": {}}
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
        result["spearman"][trait] = correlation_matrix(scores, "spearman")
        result["pearson"][trait] = correlation_matrix(scores, "pearson")
    return result
