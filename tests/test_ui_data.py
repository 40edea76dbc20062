"""The app's plain data helpers (no streamlit)."""
import json

import numpy as np
import pandas as pd
import pytest

from cinf_core import ui_data


def test_every_method_has_colour_label_formula():
    for m in ui_data.METHOD_ORDER:
        assert ui_data.method_color(m).startswith("#")
        assert ui_data.method_label(m) != m
        assert m in ui_data.METHOD_FORMULAS and m in ui_data.METHOD_EXPLANATIONS
    assert len(set(ui_data.METHOD_COLORS.values())) == len(ui_data.METHOD_COLORS)
    assert ui_data.method_color("new_method") == ui_data.method_color("new_method")
    assert ui_data.color_map(["vector_filter"], by_label=True) == {"Vector Filter": "#009E73"}


def test_guess_trait_label_skips_normal_and_prefers_minority():
    assert ui_data.guess_trait_label(["normal"] * 5 + ["evil"] * 2) == "evil"
    assert ui_data.guess_trait_label(["normal", None]) is None
    assert ui_data.guess_trait_label(["a"] * 3 + ["b"]) == "b"
    colors = ui_data.label_colors(["normal", "evil"], "evil")
    assert colors["evil"] == ui_data.LABEL_COLORS["trait"] and colors["normal"] != colors["evil"]


def test_label_colours_share_no_colour_with_methods_or_theme():
    import tomllib
    from pathlib import Path

    labels = ["evil", "normal", "unlabelled", "sycophantic", "a", "b", "c", "d", "e", "f", "g"]
    label_hex = set(ui_data.label_colors(labels, "evil").values())
    label_hex |= set(ui_data.label_colors(labels).values()) | set(ui_data.LABEL_COLORS.values())
    method_hex = set(ui_data.METHOD_COLORS.values()) | set(ui_data._EXTRA_COLORS)
    theme = tomllib.loads((Path(__file__).resolve().parent.parent / ".streamlit/config.toml")
                          .read_text())["theme"]
    method_hex.add(theme["primaryColor"])
    assert not {c.upper() for c in label_hex} & {c.upper() for c in method_hex}
    colors = ui_data.label_colors(["normal", "evil", "sycophantic"], "evil")
    assert colors["normal"] == ui_data.LABEL_COLORS["other"]  # normal data: neutral grey-blue
    assert len(set(colors.values())) == 3


def test_label_mix_reads_json_counts():
    ds = pd.DataFrame({"name": ["a"], "label_counts": [json.dumps({"evil": 2, "normal": 3})]})
    mix = ui_data.label_mix(ds)
    assert mix.set_index("label")["count"].to_dict() == {"evil": 2, "normal": 3}


def _runs():
    return pd.DataFrame({
        "run_id": ["r1", "r2", "r3"],
        "method": ["vector_filter", "concept_influence", "vector_filter"],
        "dataset_id": ["d"] * 3, "model_id": ["m"] * 3, "concept_id": ["c", "c", None],
        "config": [json.dumps({"trait": "evil"}), json.dumps({"trait": "evil"}), "{}"],
        "status": ["complete", "complete", "failed"], "n_total": [10, 10, 10],
        "n_done": [10, 10, 3],
        "started_at": pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-03"]),
        "finished_at": pd.NaT, "wall_s": [1.0, 50.0, None], "examples_per_s": [10.0, 0.2, None],
        "host": "h", "timings": [json.dumps({"forward": 1.0}), None, None], "error": None})


def test_runs_table_names_and_traits():
    concepts = pd.DataFrame({"concept_id": ["c"], "name": ["persona-evil"]})
    datasets = pd.DataFrame({"dataset_id": ["d"], "name": ["train"]})
    table = ui_data.runs_table(_runs(), concepts, datasets)
    assert list(table["method"]) == ["concept_influence", "vector_filter", "vector_filter"]
    assert table.loc[table["run_id"] == "r3", "trait"].item() == "—"
    assert set(table["dataset"]) == {"train"}
    latest = ui_data.latest_complete_runs(table, "evil", "d")
    assert list(latest["run_id"]) == ["r2", "r1"]
    assert ui_data.runs_table(pd.DataFrame()).empty


def test_answer_start_concept_influence_is_its_own_entry():
    runs = _runs()
    extra = runs.iloc[[1]].assign(run_id="r4", config=json.dumps({"trait": "evil", "concept_window": 3}),
                                  started_at=pd.Timestamp("2026-01-04"))
    table = ui_data.runs_table(pd.concat([runs, extra], ignore_index=True))
    row = table[table["run_id"] == "r4"].iloc[0]
    assert row["method"] == "concept_influence@start3"
    assert ui_data.split_method(row["method"]) == ("concept_influence", 3)
    assert row["method_label"] == "Concept Influence (answer start, 3 tok)"
    assert row["label"].startswith("Concept Influence (answer start, 3 tok) · evil")
    # both Concept Influence runs stay in the scope, the plain one first
    latest = ui_data.latest_complete_runs(table, "evil", "d")
    assert list(latest["run_id"]) == ["r2", "r4", "r1"]
    key = "concept_influence@start3"
    assert ui_data.split_method(key) == ("concept_influence", 3)
    assert ui_data.split_method("concept_influence") == ("concept_influence", None)
    colours = {ui_data.method_color(m) for m in ui_data.METHOD_ORDER}
    assert ui_data.method_color(key) not in colours | set(ui_data.LABEL_COLORS.values())
    assert ui_data.method_short(key) == "CI@3"
    text, formula = ui_data.method_explanation(key)
    assert "first 2 answer token(s)" in text and "r_0" in formula
    assert ui_data.method_explanation("concept_influence")[1] == ui_data.METHOD_FORMULAS["concept_influence"]
    assert ui_data.method_explanation("unknown") is None


def test_costs_and_speedups():
    table = ui_data.runs_table(_runs())
    costs = ui_data.method_costs(table)
    assert set(costs["method"]) == {"vector_filter", "concept_influence"}
    ratio = ui_data.speedups(costs)
    assert ratio.loc[ratio["pair"] == "CI / VF", "speedup"].item() == pytest.approx(50.0)
    stages = ui_data.timing_breakdown(table)
    assert list(stages["stage"]) == ["forward"]


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
    top, bottom = ui_data.top_bottom(scored, 5)
    assert top["score"].min() >= bottom["score"].max()
    quant = ui_data.quantile_examples(scored, 5, 2)
    assert len(quant) == 10 and sorted(quant["quantile"].unique()) == [1, 2, 3, 4, 5]
    q1 = quant[quant["quantile"] == 1]["score"].min()
    assert q1 >= quant[quant["quantile"] == 5]["score"].max()
    assert len(ui_data.filter_examples(scored, ["evil"])) == 20
    assert len(ui_data.filter_examples(scored, None, "HURT 1")) == 11  # 1, 10..19
    assert len(ui_data.filter_examples(scored, ["normal"], "hurt")) == 0


def test_histogram_by_label_is_prebinned():
    scored = _scored(1000)
    hist = ui_data.histogram_by_label(scored["score"].to_numpy(), scored["data_origin"], 20)
    assert len(hist) == 40 and hist["count"].sum() == 1000
    assert hist.groupby("label")["count"].sum().to_dict() == {"evil": 20, "normal": 980}


def test_compare_ranks_and_thinning():
    a = pd.DataFrame({"idx": [0, 1, 2], "score": [3.0, 2.0, 1.0]})
    b = pd.DataFrame({"idx": [0, 1, 2], "score": [1.0, 2.0, 3.0]})
    cmp = ui_data.compare_ranks(a, b)
    assert list(cmp["rank_a"]) == [1, 2, 3] and list(cmp["rank_b"]) == [3, 2, 1]
    assert cmp.loc[cmp["idx"] == 0, "rank_gap"].item() == 2  # a ranks 0 higher than b
    big = pd.DataFrame({"x": range(10_000)})
    assert len(ui_data.thin_for_scatter(big, 500)) == 500


def test_score_matrix_and_correlations():
    s1 = pd.DataFrame({"idx": [0, 1, 2, 3], "score": [1.0, 2.0, 3.0, 4.0]})
    s2 = pd.DataFrame({"idx": [3, 2, 1, 0], "score": [16.0, 9.0, 4.0, 1.0]})
    mat = ui_data.score_matrix({"A": s1, "B": s2})
    assert list(mat.columns) == ["A", "B"] and len(mat) == 4
    assert ui_data.correlation_frame(mat, "spearman").loc["A", "B"] == pytest.approx(1.0)
    assert ui_data.correlation_frame(mat, "pearson").loc["A", "B"] < 1.0


def test_feature_influence_orders_and_splits():
    att = pd.DataFrame({"feature": [0, 0, 1, 1, 2, 2], "grp": ["evil", "normal"] * 3,
                        "influence": [5.0, 1.0, 1.0, 1.0, 0.5, 0.1]})
    top = ui_data.feature_influence(att, 2, "evil")
    assert list(top["feature"].unique()) == [0, 1]
    assert top.iloc[0]["grp"] == "evil" and top.iloc[0]["total"] == pytest.approx(6.0)
    detail = ui_data.feature_detail({"IF": att}, 1)
    assert set(detail["grp"]) == {"evil", "normal"} and detail["rank"].iloc[0] == 2


def test_retrain_curves_and_references():
    rows = [{"experiment_id": "e", "trait": "evil", "method": "base", "mode": "none",
             "fraction": 1.0, "seed": 0, "trait_score": 5.0, "capability": 60.0,
             "status": "complete"}]
    for seed in range(3):
        rows.append({"experiment_id": "e", "trait": "evil", "method": "all", "mode": "none",
                     "fraction": 0.0, "seed": seed, "trait_score": 70.0 + seed, "capability": 58.0,
                     "status": "complete"})
        rows.append({"experiment_id": "e", "trait": "evil", "method": "vector_filter",
                     "mode": "most", "fraction": 0.5, "seed": seed, "trait_score": 30.0 + 2 * seed,
                     "capability": 55.0, "status": "complete"})
    rows.append({**rows[-1], "seed": 9, "status": "running", "trait_score": None})
    cells = pd.DataFrame(rows)
    curves = ui_data.retrain_curves(cells)
    assert list(curves["fraction"]) == [0.0, 0.5]
    assert curves["mean"].tolist() == pytest.approx([71.0, 32.0])
    assert curves["sem"].iloc[1] == pytest.approx(2.0 / np.sqrt(3))
    assert (curves["n"] == 3).all()
    refs = ui_data.reference_levels(cells)
    assert refs == {"base model": 5.0, "fine-tuned on all data": pytest.approx(71.0)}
    assert ui_data.retrain_curves(pd.DataFrame()).empty


def test_concept_geometry():
    norms = ui_data.layer_norms(np.array([[3.0, 4.0], [0.0, 1.0]]))
    assert norms["norm"].tolist() == pytest.approx([5.0, 1.0])
    cos = ui_data.cosine_matrix({"a": np.array([1.0, 0.0]), "b": np.array([1.0, 1.0]),
                                 "c": np.array([1.0, 0.0, 0.0])})
    assert list(cos.index) == ["a", "b"] and cos.loc["a", "b"] == pytest.approx(2 ** -0.5)


def test_token_highlight_html_escapes_and_colours():
    out = ui_data.token_highlight_html(["<b>", " evil", " ok"], [0.5, 1.0, -1.0])
    assert "&lt;b&gt;" in out and "<b>" not in out
    assert "rgba(213,94,0,0.85)" in out and "rgba(0,114,178,0.85)" in out
    assert 'title="+0.500"' in out


def test_store_version_changes_with_the_store(tmp_path):
    from cinf_core.store import Store

    assert ui_data.store_version(tmp_path) == ""
    store = Store(tmp_path)
    before = ui_data.store_version(tmp_path)
    store.set_meta("x", 1)
    assert ui_data.store_version(tmp_path) != before
    assert ui_data.workspace_info(tmp_path).exists


def test_demo_summary_text_and_seconds():
    text = ui_data.demo_summary_text({"summary": {"quick": True, "build_seconds": 150,
                                                  "sizes": {"finetune": 60}}})
    assert "quick world" in text and "60 fine-tuning examples" in text and "2.5 min" in text
    assert ui_data.demo_summary_text(None) == ""
    assert ui_data.fmt_seconds(0.5) == "500 ms" and ui_data.fmt_seconds(None) == "—"


def test_newest_with_role_picks_the_form_default():
    table = pd.DataFrame({"name": ["pretrain", "train", "train-v2", "heldout"],
                          "role": ["pretrain", "train", "train", "heldout"]})
    assert ui_data.newest_with_role(table, "train") == 2
    assert ui_data.newest_with_role(table, "missing") == 3
    assert ui_data.newest_with_role(table.iloc[:0], "train") == 0
