import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import average_precision_score

from cinf_core.experiments.metrics import auc_pr, correlation_matrix, precision_recall_curve


def test_auc_pr_matches_sklearn_without_ties():
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.2
    s = rng.standard_normal(500) + 1.5 * y
    assert auc_pr(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_auc_pr_extremes_and_ties():
    y = np.array([1, 0, 1, 0, 0], dtype=bool)
    assert auc_pr([5, 1, 4, 0, 0], y) == 1.0
    assert auc_pr(np.zeros(5), y) == pytest.approx(sum([1 / 4, 2 / 5]) / 2)  # pessimistic ties
    with pytest.raises(ValueError, match="no positive"):
        auc_pr([1, 2], [False, False])
    recall, precision = precision_recall_curve([5, 1, 4, 0, 0], y)
    assert recall[-1] == 1.0 and precision[0] == 1.0


def test_correlations_match_scipy():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(100)
    b = a + rng.standard_normal(100)
    m = correlation_matrix({"a": a, "b": b}, "pearson")
    assert m["a"]["b"] == pytest.approx(pearsonr(a, b)[0])
    m = correlation_matrix({"a": a, "b": b}, "spearman")
    assert m["a"]["b"] == pytest.approx(spearmanr(a, b)[0]) and m["a"]["a"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different numbers"):
        correlation_matrix({"a": a, "b": b[:5]})


def test_rank_equals_scipy_rankdata_with_ties():
    from scipy.stats import rankdata

    from cinf_core.experiments.metrics import _rank

    rng = np.random.default_rng(0)
    for x in (rng.integers(0, 5, 200).astype(float), rng.standard_normal(50), np.array([3.0]),
              np.array([1.0, 1.0, 1.0]), np.array([2.0, np.inf, -np.inf, 2.0])):
        np.testing.assert_array_equal(_rank(x), rankdata(x))
