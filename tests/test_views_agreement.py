"""Methods side by side: score matrix, correlations, pairs, retrieval of labelled data."""
import numpy as np
import pandas as pd
import pytest

from cinf_core.experiments.metrics import auc_pr
from cinf_core.views.agreement import (correlation_frame, example_labels, pair_frame, retrieval,
                                       score_matrix)


def test_score_matrix_and_correlations():
    s1 = pd.DataFrame({"idx": [0, 1, 2, 3], "score": [1.0, 2.0, 3.0, 4.0]})
    s2 = pd.DataFrame({"idx": [3, 2, 1, 0], "score": [16.0, 9.0, 4.0, 1.0]})
    mat = score_matrix({"A": s1, "B": s2})
    assert list(mat.columns) == ["A", "B"] and len(mat) == 4
    assert correlation_frame(mat, "spearman").loc["A", "B"] == pytest.approx(1.0)
    assert correlation_frame(mat, "pearson").loc["A", "B"] < 1.0


def _world(n=200, seed=0):
    """Two runs over ``n`` examples (the first 40 labelled evil): A separates them, B is noise;
    B misses example 0."""
    rng = np.random.default_rng(seed)
    evil = np.arange(n) < 40
    a = pd.DataFrame({"idx": np.arange(n), "score": rng.normal(size=n) + 3 * evil})
    b = pd.DataFrame({"idx": np.arange(1, n), "score": rng.normal(size=n - 1)})
    scored = pd.DataFrame({"idx": np.arange(n)[::-1], "score": 0.0,
                           "data_origin": np.where(evil, "evil", None)[::-1]})
    return score_matrix({"A": a, "B": b}), scored, evil


def test_labels_follow_the_matrix_rows_and_pairs_keep_them():
    matrix, scored, evil = _world()
    labels = example_labels(scored, matrix.index)
    assert list(labels.index) == list(range(1, 200))
    assert labels.tolist() == np.where(evil[1:], "evil", "unlabelled").tolist()
    pair = pair_frame(matrix, labels, "B", "A")
    assert list(pair.columns) == ["idx", "x", "y", "data_origin"]
    assert pair["x"].tolist() == matrix["B"].tolist() and pair["y"].tolist() == matrix["A"].tolist()
    assert pair["data_origin"].tolist() == labels.tolist()


def test_retrieval_is_auc_pr_per_run_against_chance():
    matrix, scored, evil = _world()
    labels = example_labels(scored, matrix.index)
    found = retrieval(matrix, labels, "evil")
    assert found.chance == pytest.approx(39 / 199)
    table = found.auc_pr.set_index("method")
    assert list(table.index) == ["A", "B"]
    for run in ("A", "B"):
        want = auc_pr(matrix[run].to_numpy(), evil[1:])
        assert table.loc[run, "AUC-PR"] == pytest.approx(want)
        assert table.loc[run, "× chance"] == pytest.approx(want / found.chance)
    assert table.loc["A", "× chance"] > 3 > table.loc["B", "× chance"]
    curves = found.curves
    assert set(curves["method"]) == {"A", "B"} and list(curves.columns) == ["recall", "precision",
                                                                             "method"]
    a = curves[curves["method"] == "A"]
    assert a["recall"].is_monotonic_increasing and a["recall"].iloc[-1] == pytest.approx(1.0)
    assert a["precision"].iloc[-1] == pytest.approx(found.chance)
