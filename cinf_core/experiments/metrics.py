"""Retrieval and agreement metrics: AUC-PR against labels, Pearson/Spearman between methods."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def auc_pr(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the precision-recall curve (average precision), higher score = more positive.

    Ties are broken against the positives (the pessimistic order), so a constant score gets the
    positive rate, the value of a random ranking.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.shape[0]} scores but {y.shape[0]} labels")
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("no positive labels: AUC-PR is undefined")
    order = np.lexsort((y, -s))  # by score descending, negatives first within ties
    hits = y[order]
    ranks = np.arange(1, len(hits) + 1)
    precision_at_hits = np.cumsum(hits)[hits] / ranks[hits]
    return float(precision_at_hits.sum() / n_pos)


def _tail_hits(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    """Positives among the ``k`` highest scores; ties at the cut are shared out at random (their
    expected count), so a constant score puts the positive rate in every tail."""
    cut = np.partition(scores, len(scores) - k)[len(scores) - k]  # the k-th highest score
    above, at = scores > cut, scores == cut
    return float(positives[above].sum() + (k - above.sum()) * positives[at].sum() / at.sum())


def two_sidedness(scores: Sequence[float], positives: Sequence[bool], tail: float = 0.1) -> dict:
    """Where a signed score puts the positives: at the top, at the bottom, or at both ends.

    The top and bottom tails are the ``tail`` share of examples (rounded, at least one) with the
    highest and the lowest scores. Returns

    - ``top_label_share`` / ``bottom_label_share``: share of the tail's examples that are
      positive (precision at that end; a random ranking gives ``positive_rate``);
    - ``top_recall`` / ``bottom_recall``: share of the positives that fall in the tail (a random
      ranking gives ``tail``);
    - ``auc_pr``: AUC-PR of the score; ``auc_pr_abs``: AUC-PR of ``|score|``, which ranks both
      ends first (higher than ``auc_pr`` when the positives sit at both ends);
    - ``positive_rate``, ``tail`` (the share actually taken, ``n_tail / n``) and ``n_tail``.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.shape[0]} scores but {y.shape[0]} labels")
    if not 0 < tail <= 0.5:
        raise ValueError(f"tail must be a share in (0, 0.5], got {tail}")
    n, n_pos = len(s), int(y.sum())
    if n_pos == 0:
        raise ValueError("no positive labels: the tails' label shares are undefined")
    k = max(1, int(np.floor(tail * n + 0.5)))
    top, bottom = _tail_hits(s, y, k), _tail_hits(-s, y, k)
    return {"top_label_share": top / k, "bottom_label_share": bottom / k,
            "top_recall": top / n_pos, "bottom_recall": bottom / n_pos,
            "auc_pr": auc_pr(s, y), "auc_pr_abs": auc_pr(np.abs(s), y),
            "positive_rate": n_pos / n, "tail": k / n, "n_tail": k}


def precision_recall_curve(scores: Sequence[float], positives: Sequence[bool],
                           n_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """``(recall, precision)`` along the ranking, subsampled to at most ``n_points``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives, dtype=bool)
    order = np.lexsort((y, -s))
    tp = np.cumsum(y[order])
    ranks = np.arange(1, len(s) + 1)
    recall = tp / max(int(y.sum()), 1)
    precision = tp / ranks
    keep = np.unique(np.linspace(0, len(s) - 1, min(n_points, len(s))).astype(int))
    return recall[keep], precision[keep]


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank (``scipy.stats.rankdata``'s default), in numpy:
    importing scipy.stats costs the Method agreement page most of a second on its first visit."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    new_group = np.concatenate(([True], sorted_x[1:] != sorted_x[:-1]))
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], len(x))
    mean_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def correlation_matrix(scores: Mapping[str, Sequence[float]], kind: str = "spearman") -> dict:
    """``{method: {method: r}}`` over the same examples; ``kind`` is pearson or spearman."""
    if kind not in ("pearson", "spearman"):
        raise ValueError(f"kind must be 'pearson' or 'spearman', got {kind!r}")
    names = list(scores)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) > 1:
        raise ValueError(f"methods scored different numbers of examples: {sorted(lengths)}")
    if kind == "spearman":
        arrays = {k: _rank(a) for k, a in arrays.items()}
    out: dict[str, dict[str, float]] = {}
    for a in names:
        out[a] = {}
        for b in names:
            x, y = arrays[a], arrays[b]
            if x.std() == 0 or y.std() == 0:
                out[a][b] = float("nan")
            else:
                out[a][b] = float(np.corrcoef(x, y)[0, 1])
    return out
