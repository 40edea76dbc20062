"""Methods side by side: score matrix, correlations, pairs, retrieval of labelled data, and where
each signed run puts the labelled data (two-sidedness)."""
import numpy as np
import pandas as pd
import pytest

from cinf_core.experiments.metrics import auc_pr, two_sidedness
from cinf_core.views.agreement import (TWO_SIDED_COLUMNS, correlation_frame, example_labels,
                                       pair_frame, retrieval, score_matrix, two_sided)


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


def _both_ends(n=200, n_pos=20, seed=0):
    """Half the positives above every negative, half below: negatives in [-1, 1], positives at
    +-(2..3). Shuffled, so the order of the rows says nothing."""
    rng = np.random.default_rng(seed)
    half = n_pos // 2
    scores = np.concatenate([rng.uniform(2, 3, half), -rng.uniform(2, 3, n_pos - half),
                             rng.uniform(-1, 1, n - n_pos)])
    labels = np.arange(n) < n_pos
    perm = rng.permutation(n)
    return scores[perm], labels[perm]


def test_two_sidedness_finds_positives_at_both_ends():
    scores, labels = _both_ends()
    got = two_sidedness(scores, labels)
    assert got["n_tail"] == 20 and got["tail"] == pytest.approx(0.1)
    assert got["positive_rate"] == pytest.approx(0.1)
    # each tenth holds 10 of the 20 positives, and 10 negatives
    assert got["top_recall"] == pytest.approx(0.5) and got["bottom_recall"] == pytest.approx(0.5)
    assert got["top_label_share"] == pytest.approx(0.5)
    assert got["bottom_label_share"] == pytest.approx(0.5)
    # |score| ranks all 20 positives first; the score finds 10 at the top, 10 at the very bottom
    assert got["auc_pr_abs"] == pytest.approx(1.0)
    want = (10 + sum((10 + j) / (190 + j) for j in range(1, 11))) / 20
    assert got["auc_pr"] == pytest.approx(want) and 0.5 < got["auc_pr"] < 0.55
    assert got["auc_pr"] == pytest.approx(auc_pr(scores, labels))


def test_two_sidedness_of_a_one_sided_score_and_its_negation():
    rng = np.random.default_rng(1)
    labels = np.arange(100) < 10
    scores = rng.uniform(0, 1, 100) + 5 * labels  # the positives are the top tenth
    up, down = two_sidedness(scores, labels), two_sidedness(-scores, labels)
    assert (up["top_recall"], up["bottom_recall"]) == (1.0, 0.0)
    assert (up["top_label_share"], up["bottom_label_share"]) == (1.0, 0.0)
    assert up["auc_pr"] == pytest.approx(1.0) and up["auc_pr_abs"] == pytest.approx(1.0)
    assert (down["top_recall"], down["bottom_recall"]) == (0.0, 1.0)
    assert down["auc_pr"] < 0.2 and down["auc_pr_abs"] == pytest.approx(1.0)


def test_two_sidedness_shares_ties_at_the_cut_and_checks_its_input():
    labels = np.arange(50) < 10
    flat = two_sidedness(np.zeros(50), labels)  # one big tie: every tail gets the chance level
    assert flat["n_tail"] == 5
    assert flat["top_label_share"] == pytest.approx(0.2) == flat["bottom_label_share"]
    assert flat["top_recall"] == pytest.approx(0.1) == flat["bottom_recall"]
    # a tie across the cut: 4 examples above it, 2 of the 4 tied at the cut are positive
    scores = np.array([9.0] * 4 + [5.0] * 4 + [0.0] * 42)
    tied = np.zeros(50, bool)
    tied[[0, 4, 5]] = True
    got = two_sidedness(scores, tied)
    assert got["top_label_share"] == pytest.approx((1 + 1 * 2 / 4) / 5)
    assert two_sidedness(np.arange(95.0), np.arange(95) >= 90)["n_tail"] == 10  # 9.5 rounds up
    with pytest.raises(ValueError, match="no positive"):
        two_sidedness(np.ones(5), np.zeros(5, bool))
    with pytest.raises(ValueError, match="labels"):
        two_sidedness(np.ones(5), np.ones(4, bool))
    with pytest.raises(ValueError, match="tail"):
        two_sidedness(np.ones(5), np.ones(5, bool), tail=0.7)


def test_two_sided_view_tabulates_each_run_and_its_two_ends():
    both, labels = _both_ends()
    rng = np.random.default_rng(2)
    matrix = pd.DataFrame({"Both": both, "Top": rng.normal(size=200) + 4 * labels})
    origins = pd.Series(np.where(labels, "evil", "normal"), index=matrix.index)
    sides = two_sided(matrix, origins, "evil")
    assert sides.positive_rate == pytest.approx(0.1) and sides.tail == pytest.approx(0.1)
    table = sides.table.set_index("method")
    assert list(table.index) == ["Both", "Top"]
    assert list(table.columns) == list(TWO_SIDED_COLUMNS.values())
    for run in ("Both", "Top"):
        want = two_sidedness(matrix[run].to_numpy(), labels)
        for key, title in TWO_SIDED_COLUMNS.items():
            assert table.loc[run, title] == pytest.approx(want[key])
    assert table.loc["Both", "AUC-PR |score|"] > table.loc["Both", "AUC-PR"] + 0.4
    bars = sides.bars.set_index(["method", "end"])
    assert len(bars) == 4
    assert bars.loc[("Both", "bottom tenth"), "share of trait rows"] == pytest.approx(0.5)
    assert bars.loc[("Top", "top tenth"), "share labelled"] == pytest.approx(
        table.loc["Top", "top tenth labelled"])
