"""Methods side by side over the same training set (Figure 3): their scores as one matrix, the
correlations between them, and how well each retrieves the labelled trait data (AUC-PR)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pandas as pd

from ..experiments.metrics import auc_pr, correlation_matrix, precision_recall_curve


def score_matrix(score_frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Columns = runs (keyed by name), rows = example idx present in every run."""
    series = [f.set_index("idx")["score"].rename(name) for name, f in score_frames.items()]
    if not series:
        return pd.DataFrame()
    return pd.concat(series, axis=1, join="inner").sort_index()


def example_labels(scored: pd.DataFrame, index: pd.Index) -> pd.Series:
    """Each example's ``data_origin`` (``unlabelled`` where it has none), in ``index`` order.

    ``scored``: a run's ``scored_examples`` (``idx, data_origin, ...``); ``index``: example idx,
    e.g. the rows of ``score_matrix``.
    """
    labels = scored.set_index("idx")["data_origin"]
    return labels.astype("object").fillna("unlabelled").reindex(index)


def correlation_frame(matrix: pd.DataFrame, kind: str = "pearson") -> pd.DataFrame:
    """Pearson or Spearman correlation between the columns of ``score_matrix`` (engine metric)."""
    corr = correlation_matrix({c: matrix[c].to_numpy() for c in matrix.columns}, kind=kind)
    return pd.DataFrame(corr).loc[list(matrix.columns), list(matrix.columns)]


def pair_frame(matrix: pd.DataFrame, labels: pd.Series, x: str, y: str) -> pd.DataFrame:
    """Two runs' scores per example for a scatter: ``idx, x, y, data_origin``."""
    pair = matrix[[x, y]].set_axis(["x", "y"], axis=1).assign(data_origin=labels)
    return pair.rename_axis("idx").reset_index()


@dataclass(frozen=True)
class Retrieval:
    """How well each run's ranking retrieves the examples of one label."""

    auc_pr: pd.DataFrame
    """``method, AUC-PR, × chance`` per run (column of the score matrix)."""
    curves: pd.DataFrame
    """``recall, precision, method``: each run's precision-recall curve, long format."""
    chance: float
    """Share of the positive label: the AUC-PR and precision of a random ranking."""


def retrieval(matrix: pd.DataFrame, labels: pd.Series, positive: str) -> Retrieval:
    """AUC-PR and precision-recall curves of every run (column of ``score_matrix``) for retrieving
    the examples labelled ``positive``; ``labels`` is aligned with the matrix's rows."""
    is_pos = (labels == positive).to_numpy()
    rate = float(is_pos.mean())
    rows, curves = [], []
    for name in matrix.columns:
        scores = matrix[name].to_numpy()
        ap = auc_pr(scores, is_pos)
        rows.append({"method": name, "AUC-PR": ap, "× chance": ap / rate})
        recall, precision = precision_recall_curve(scores, is_pos)
        curves.append(pd.DataFrame({"recall": recall, "precision": precision, "method": name}))
    return Retrieval(pd.DataFrame(rows, columns=["method", "AUC-PR", "× chance"]),
                     pd.concat(curves, ignore_index=True), rate)
