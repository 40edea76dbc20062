"""Methods side by side over the same training set (Figure 3): their scores as one matrix, the
correlations between them, how well each retrieves the labelled trait data (AUC-PR), and where
each signed method puts that data (top, bottom or both ends of its ranking)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pandas as pd

from ..experiments.metrics import (auc_pr, correlation_matrix, precision_recall_curve,
                                   two_sidedness)


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


TWO_SIDED_COLUMNS = {"top_recall": "trait rows in top tenth", "bottom_recall":
                     "trait rows in bottom tenth", "top_label_share": "top tenth labelled",
                     "bottom_label_share": "bottom tenth labelled", "auc_pr": "AUC-PR",
                     "auc_pr_abs": "AUC-PR |score|"}
"""The two-sidedness table's columns, from :func:`~cinf_core.experiments.metrics.two_sidedness`'s
keys: ``trait rows in ... tenth`` is the share of the label's rows that fall there (chance: the
tail, 10%); ``... tenth labelled`` is the share of the tenth's rows that carry the label
(chance: the label's share of the data)."""


@dataclass(frozen=True)
class TwoSided:
    """Where each signed run puts the examples of one label: top, bottom or both ends."""

    table: pd.DataFrame
    """``method`` and the :data:`TWO_SIDED_COLUMNS` per run."""
    bars: pd.DataFrame
    """``method, end (top tenth / bottom tenth), share of trait rows, share labelled``: one row
    per run and end, for grouped bars."""
    positive_rate: float
    """The label's share of the examples (the chance level of the ``labelled`` shares)."""
    tail: float
    """The share of examples in each end (chance level of the ``trait rows`` shares)."""


def two_sided(matrix: pd.DataFrame, labels: pd.Series, positive: str,
              tail: float = 0.1) -> TwoSided:
    """The two-sidedness diagnostic of every run (column of ``score_matrix``; pass the signed
    runs only) for the examples labelled ``positive``; ``labels`` is aligned with the rows."""
    is_pos = (labels == positive).to_numpy()
    found = {name: two_sidedness(matrix[name].to_numpy(), is_pos, tail) for name in matrix.columns}
    table = pd.DataFrame([{"method": name, **{title: got[key]
                                              for key, title in TWO_SIDED_COLUMNS.items()}}
                          for name, got in found.items()],
                         columns=["method", *TWO_SIDED_COLUMNS.values()])
    bars = pd.DataFrame([{"method": name, "end": f"{end} tenth",
                          "share of trait rows": got[f"{end}_recall"],
                          "share labelled": got[f"{end}_label_share"]}
                         for name, got in found.items() for end in ("top", "bottom")],
                        columns=["method", "end", "share of trait rows", "share labelled"])
    any_run = next(iter(found.values()), None)
    return TwoSided(table, bars, float(is_pos.mean()) if len(is_pos) else float("nan"),
                    any_run["tail"] if any_run else tail)
