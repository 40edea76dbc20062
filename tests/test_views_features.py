"""SAE features as the app shows them: top features by influence, one feature's detail, the
trait share, direction choices and search hits."""
import numpy as np
import pandas as pd
import pytest

from cinf_core.views.features import (feature_choices, feature_detail, feature_hits,
                                      feature_trait_share, sae_direction_choices,
                                      top_feature_bars)


def test_top_feature_bars_orders_and_splits():
    att = pd.DataFrame({"feature": [0, 0, 1, 1, 2, 2], "grp": ["evil", "normal"] * 3,
                        "influence": [5.0, 1.0, 1.0, 1.0, 0.5, 0.1]})
    top = top_feature_bars(att, 2, "evil")
    assert list(top["feature"].unique()) == [0, 1]
    assert top.iloc[0]["grp"] == "evil" and top.iloc[0]["total"] == pytest.approx(6.0)
    detail = feature_detail({"IF": att}, 1)
    assert set(detail["grp"]) == {"evil", "normal"} and detail["rank"].iloc[0] == 2


def test_feature_trait_share_uses_the_sum_of_absolute_parts():
    from cinf_core.concepts.features import trait_share

    top = pd.DataFrame({"feature": [1, 1, 2, 2, 3], "grp": ["evil", "normal", "evil", "normal",
                                                            "evil"],
                        "influence": [3.0, -2.0, 1.0, 1.0, 0.5]})
    share = feature_trait_share(top, "evil")
    assert share == pytest.approx(4.5 / 7.5)
    wide = pd.DataFrame({"feature": [1, 2, 3], "total": [1.0, 2.0, 0.5], "evil": [3.0, 1.0, 0.5],
                         "normal": [-2.0, 1.0, 0.0]})
    assert share == pytest.approx(trait_share(wide, "evil"))
    totals = top.groupby("grp")["influence"].sum()  # the old, different denominator
    assert share != pytest.approx(totals["evil"] / totals.abs().sum())
    assert np.isnan(feature_trait_share(top, "sycophantic"))
    assert np.isnan(feature_trait_share(top, None))
    assert np.isnan(feature_trait_share(top.iloc[:0], "evil"))


def test_direction_choices_and_feature_hits():
    concepts = pd.DataFrame({
        "concept_id": ["a", "b", "c", "d", "e"],
        "name": ["evil", "probe-L1", "sae #3", "upload", "persona-L1"],
        "kind": ["persona_vector", "probe", "sae_feature", "uploaded", "persona_vector"],
        "layer": [2, 1, 2, 2, 1]})
    choices = sae_direction_choices(concepts, 2)
    assert choices["concept_id"].tolist() == ["a", "d", "e"]
    assert choices["choice"].tolist()[0] == "evil (persona vector, layer 2)"
    assert "layer-2 row" in choices["choice"].tolist()[2]
    assert sae_direction_choices(pd.DataFrame(), 2).empty

    features = pd.DataFrame({"feature": np.arange(4, dtype=np.int32), "density": [.1, .2, .3, .4],
                             "mean_act": 0.0, "max_act": 1.0, "label": ["a", "b", "c", "d"]})
    hits = pd.DataFrame({"feature": [3, 0, 9], "cosine": [0.9, 0.5, 0.1]})
    out = feature_hits(hits, features)
    assert list(out.columns) == ["feature", "label", "cosine", "density"]
    assert out["feature"].tolist() == [3, 0, 9] and out["label"].tolist()[:2] == ["d", "a"]
    assert out["density"].tolist()[:2] == [0.4, 0.1] and np.isnan(out["density"].iloc[2])
    bare = feature_hits(hits, pd.DataFrame())
    assert bare["label"].isna().all() and bare["feature"].tolist() == [3, 0, 9]


def test_feature_choices_offer_top_features_search_hits_or_label_matches():
    att = pd.DataFrame({"feature": [0, 0, 1, 1, 2, 2], "grp": ["evil", "normal"] * 3,
                        "influence": [5.0, 1.0, 1.0, 1.0, 0.5, 0.1]})
    features = pd.DataFrame({"feature": np.arange(4), "density": 0.1, "mean_act": 0.0,
                             "max_act": [0.5, 3.0, 2.0, 1.0],
                             "label": ["pain, hurt", "sleep", "Pain", None]})
    assert feature_choices({"IF": att}, features, 2, "evil") == ([0, 1], None)
    assert feature_choices({"IF": att}, features, 2, "evil", found=[3, 0]) == ([0, 1, 3], None)
    # no attributions yet: the most active features
    assert feature_choices({}, features, 2) == ([1, 2], None)
    assert feature_choices({}, features, 2, query="pain") == ([0, 2], 2)
    assert feature_choices({"IF": att}, pd.DataFrame(), 1, query="pain") == ([0], None)
