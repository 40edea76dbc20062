"""Scored examples as the app lists them: top and bottom, score quantiles, filters, histograms by
label, and one run's ranks against another's."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


def top_bottom(scored: pd.DataFrame, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Top-k (highest score) and bottom-k rows of a ``scored_examples`` frame."""
    top = scored.nlargest(k, "score")
    bottom = scored.nsmallest(k, "score")
    return top, bottom


def quantile_examples(scored: pd.DataFrame, n_bins: int = 5, per_bin: int = 2,
                      seed: int = 0) -> pd.DataFrame:
    """``per_bin`` examples from each score quantile (bin 1 = highest scores)."""
    if scored.empty:
        return scored.assign(quantile=pd.Series(dtype="int64"))
    n_bins = max(1, min(n_bins, len(scored)))
    order = scored["score"].rank(method="first", ascending=False).to_numpy()
    bins = np.ceil(order * n_bins / len(scored)).astype(int).clip(1, n_bins)
    rng = np.random.default_rng(seed)
    picks = []
    for b in range(1, n_bins + 1):
        where = np.flatnonzero(bins == b)
        take = rng.choice(where, size=min(per_bin, len(where)), replace=False)
        picks.extend(sorted(take, key=lambda i: order[i]))
    return scored.iloc[picks].assign(quantile=bins[picks])


def filter_examples(scored: pd.DataFrame, labels: Sequence[str] | None = None,
                    text: str = "") -> pd.DataFrame:
    """Rows whose label is in ``labels`` (all when None) and whose prompt or response contains
    ``text`` (case-insensitive, plain substring)."""
    mask = np.ones(len(scored), dtype=bool)
    if labels is not None:
        origin = scored["data_origin"].astype("object").fillna("unlabelled")
        mask &= origin.isin(list(labels)).to_numpy()
    if text:
        needle = text.lower()
        hit = (scored["prompt"].str.lower().str.contains(needle, regex=False, na=False)
               | scored["response"].str.lower().str.contains(needle, regex=False, na=False))
        mask &= hit.to_numpy()
    return scored[mask]


def histogram_by_label(scores: np.ndarray, labels: Sequence[str | None],
                       n_bins: int = 40) -> pd.DataFrame:
    """Counts per (score bin, label) — pre-binned so 100k scores draw as a few dozen bars.

    Returns ``label, bin_left, bin_right, bin_mid, count``.
    """
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(["unlabelled" if x is None else str(x) for x in labels], dtype=object)
    if scores.size == 0:
        return pd.DataFrame(columns=["label", "bin_left", "bin_right", "bin_mid", "count"])
    lo, hi = float(scores.min()), float(scores.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, n_bins + 1)
    rows = []
    for label in sorted(set(labels)):
        counts, _ = np.histogram(scores[labels == label], bins=edges)
        rows.append(pd.DataFrame({"label": label, "bin_left": edges[:-1], "bin_right": edges[1:],
                                  "bin_mid": (edges[:-1] + edges[1:]) / 2, "count": counts}))
    return pd.concat(rows, ignore_index=True)


def compare_ranks(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Join two runs' ``idx, score`` on idx: ranks (1 = top), rank percentiles and their gap.

    ``rank_gap`` > 0 means run *a* ranks the example higher than run *b*.
    """
    merged = a[["idx", "score"]].merge(b[["idx", "score"]], on="idx", suffixes=("_a", "_b"))
    n = max(len(merged), 1)
    rank_a = merged["score_a"].rank(ascending=False, method="min")
    rank_b = merged["score_b"].rank(ascending=False, method="min")
    return merged.assign(rank_a=rank_a.astype(int), rank_b=rank_b.astype(int),
                         pct_a=100.0 * (rank_a - 1) / n, pct_b=100.0 * (rank_b - 1) / n,
                         rank_gap=(rank_b - rank_a).astype(int))


def thin_for_scatter(frame: pd.DataFrame, max_points: int = 5000, seed: int = 0) -> pd.DataFrame:
    """A random subset of at most ``max_points`` rows so big scatters stay responsive."""
    if len(frame) <= max_points:
        return frame
    return frame.sample(n=max_points, random_state=seed)


def rank_correlation(compared: pd.DataFrame) -> float:
    """Spearman correlation of two runs' rankings: Pearson over ``compare_ranks``'s ``rank_a`` and
    ``rank_b`` (NaN below two examples)."""
    if len(compared) < 2:
        return float("nan")
    return float(np.corrcoef(compared["rank_a"], compared["rank_b"])[0, 1])
