"""Scored examples: top and bottom, quantiles, filters, histograms, rank comparisons."""
import numpy as np
import pandas as pd
import pytest

from cinf_core.views.examples import (compare_ranks, filter_examples, histogram_by_label,
                                      quantile_examples, rank_correlation, thin_for_scatter,
                                      top_bottom)


def _scored(n=100, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.where(np.arange(n) < 20, "evil", "normal")
    scores = rng.normal(size=n) + 3 * (labels == "evil")
    frame = pd.DataFrame({"idx": np.arange(n), "score": scores, "data_origin": labels,
                          "prompt": [f"p{i}" for i in range(n)],
                          "response": [("I will hurt" if l == "evil" else "Hello") + f" {i}"
                                       for i, l in enumerate(labels)]})
    frame["rank"] = frame["score"].rank(ascending=False, method="min").astype(int)
    return frame.sort_values("rank")


def test_top_bottom_quantiles_filter():
    scored = _scored()
    top, bottom = top_bottom(scored, 5)
    assert top["score"].min() >= bottom["score"].max()
    quant = quantile_examples(scored, 5, 2)
    assert len(quant) == 10 and sorted(quant["quantile"].unique()) == [1, 2, 3, 4, 5]
    q1 = quant[quant["quantile"] == 1]["score"].min()
    assert q1 >= quant[quant["quantile"] == 5]["score"].max()
    assert len(filter_examples(scored, ["evil"])) == 20
    assert len(filter_examples(scored, None, "HURT 1")) == 11  # 1, 10..19
    assert len(filter_examples(scored, ["normal"], "hurt")) == 0


def test_histogram_by_label_is_prebinned():
    scored = _scored(1000)
    hist = histogram_by_label(scored["score"].to_numpy(), scored["data_origin"], 20)
    assert len(hist) == 40 and hist["count"].sum() == 1000
    assert hist.groupby("label")["count"].sum().to_dict() == {"evil": 20, "normal": 980}


def test_compare_ranks_and_thinning():
    a = pd.DataFrame({"idx": [0, 1, 2], "score": [3.0, 2.0, 1.0]})
    b = pd.DataFrame({"idx": [0, 1, 2], "score": [1.0, 2.0, 3.0]})
    cmp = compare_ranks(a, b)
    assert list(cmp["rank_a"]) == [1, 2, 3] and list(cmp["rank_b"]) == [3, 2, 1]
    assert cmp.loc[cmp["idx"] == 0, "rank_gap"].item() == 2  # a ranks 0 higher than b
    big = pd.DataFrame({"x": range(10_000)})
    assert len(thin_for_scatter(big, 500)) == 500


def test_rank_correlation_of_two_runs():
    a = pd.DataFrame({"idx": [0, 1, 2, 3], "score": [4.0, 3.0, 2.0, 1.0]})
    b = pd.DataFrame({"idx": [3, 2, 1, 0], "score": [1.0, 8.0, 27.0, 64.0]})  # same order
    assert rank_correlation(compare_ranks(a, b)) == pytest.approx(1.0)
    assert rank_correlation(compare_ranks(a, b.assign(score=-b["score"]))) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation(compare_ranks(a.iloc[:1], b)))
