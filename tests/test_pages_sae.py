"""The SAE features page with a real SAE: search by phrase, by concept direction, highlighted top
examples, and the trait share (AppTest on the small fixture workspace + a tiny trained SAE)."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from workspace_fixture import CONCEPT_LAYER, build_workspace

APP = str(Path(__file__).resolve().parent.parent / "app.py")
PAGE = "pages/sae_features.py"
TIMEOUT = 120
REAL_SAE = "sae-real"


@pytest.fixture(scope="module")
def sae_workspace(tmp_path_factory, tiny_model_dir, tiny_lm):
    """The page-test workspace plus a real SAE on the tiny model's layer 2, with its feature data
    and the evil IF/CI runs attributed to its features."""
    from cinf_core.concepts.features import attribute_run_to_features, compute_feature_data
    from cinf_core.concepts.sae import train_sae
    from cinf_core.data import encode_example
    from cinf_core.models import hidden_states_at
    from cinf_core.store import Store

    ws = build_workspace(tmp_path_factory.mktemp("sae_ws"), model_dir=tiny_model_dir)
    store = Store(ws)
    acts = []
    for ex in store.load_dataset("evil_mix").examples:
        enc = encode_example(tiny_lm.tokenizer, ex.messages)
        ids = torch.tensor([enc.input_ids])
        h = hidden_states_at(tiny_lm.model, ids, torch.ones_like(ids), [CONCEPT_LAYER])
        acts.append(h[CONCEPT_LAYER][0][torch.tensor(enc.response_mask, dtype=torch.bool)].detach())
    sae_dir = ws / "artifacts" / "saes" / REAL_SAE
    train_sae(torch.cat(acts).repeat(4, 1), d_sae=48, hook_layer=CONCEPT_LAYER, k=4,
              training_tokens=4096, batch_size=128, out_dir=sae_dir)
    store.add_sae(REAL_SAE, sae_dir, CONCEPT_LAYER, store.get_model("tiny-evil")["model_id"])
    compute_feature_data(ws, tiny_lm, REAL_SAE, dataset="evil_mix")
    # A newer IF run whose normal-data scores are noise around 0: the normal group then pushes
    # some top features up and others down, which is where the two trait-share denominators
    # (Σ_g|Σ_j F| and Σ_jΣ_g|F|) part.
    dataset = store.dataset("evil_mix")
    labels = store.labels("evil_mix")["data_origin"].to_numpy()
    rng = np.random.default_rng(3)
    scores = np.where(labels == "evil", 1.0, rng.normal(0.0, 2.0, size=labels.size))
    handle = store.begin_run("influence_function", dataset["dataset_id"],
                             store.get_model("tiny-evil")["model_id"],
                             {"trait": "evil", "concept": None, "variant": "mixed-sign"},
                             labels.size)
    handle.add_scores(range(labels.size), scores)
    handle.complete(1.0)
    runs = store.runs(status="complete")  # oldest first: the newest run per method wins
    tops = {}
    for run in runs.itertuples():
        if json.loads(run.config)["trait"] == "evil" and run.method in ("influence_function",
                                                                       "concept_influence"):
            tops[run.method] = attribute_run_to_features(ws, run.run_id, REAL_SAE, k=10)
    assert set(tops) == {"influence_function", "concept_influence"}
    return ws, tops


@pytest.fixture(scope="module")
def real_sae(sae_workspace):
    from cinf_core.concepts.features import load_registered_sae

    return load_registered_sae(sae_workspace[0], REAL_SAE)[0]


def open_sae_page(monkeypatch, workspace, sae: str | None = REAL_SAE) -> AppTest:
    monkeypatch.setenv("CINF_WORKSPACE", str(workspace))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page(PAGE).run()
    if sae is not None:
        at.selectbox(key="sae:sae").set_value(sae).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def stored_features(workspace) -> pd.DataFrame:
    from cinf_core.store import Store

    store = Store(workspace)
    return store.sae_features(store.get_sae(REAL_SAE)["sae_id"], store.dataset("evil_mix")["dataset_id"])


def html_values(html: str) -> list[float]:
    """The per-token values ``token_highlight_html`` writes into the tooltips."""
    return [float(v) for v in re.findall(r'title="([-+0-9.e]+)"', html)]


def test_phrase_search_lists_the_features_the_engine_finds(monkeypatch, sae_workspace, real_sae,
                                                           tiny_lm):
    from cinf_core.concepts.sae import features_for_phrase

    ws, _ = sae_workspace
    phrase = "I will make you suffer, because pain is fun."
    at = open_sae_page(monkeypatch, ws)
    at.text_input(key="sae:phrase").set_value(phrase).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.warning, [w.value for w in at.warning]
    want = features_for_phrase(tiny_lm, real_sae, phrase, k=at.slider(key="sae:top").value)
    assert want.features
    table = at.dataframe[0].value
    assert list(table.columns) == ["feature", "label", "activation", "density"]
    assert table["feature"].tolist() == [j for j, _ in want.features]
    assert table["activation"].tolist() == pytest.approx([v for _, v in want.features], rel=1e-5)
    info = stored_features(ws).set_index("feature")
    assert table["label"].tolist() == info.loc[table["feature"], "label"].tolist()
    assert table["density"].tolist() == pytest.approx(info.loc[table["feature"], "density"].tolist())
    # The phrase's tokens, coloured by the chosen feature's activation on each.
    assert at.selectbox(key="sae:phrase:feature").value == want.features[0][0]
    first = at.html[0].value
    assert "rgba(" in first and "suffer" in "".join(re.findall(r">([^<]*)</span>", first))
    assert html_values(first) == pytest.approx(want.token_acts[:, 0].tolist(), abs=1e-3)
    if len(want.features) > 1:
        at.selectbox(key="sae:phrase:feature").set_value(want.features[1][0]).run()
        assert html_values(at.html[0].value) == pytest.approx(want.token_acts[:, 1].tolist(),
                                                              abs=1e-3)
    # Found features are offered in the feature detail.
    options = at.selectbox(key="sae:feature").options
    for j, _ in want.features:
        assert any(o == f"#{j}" or o.startswith(f"#{j} ·") for o in options), (j, options)


def test_direction_search_ranks_decoder_rows_by_cosine(monkeypatch, sae_workspace, real_sae):
    from cinf_core.concepts.sae import features_by_direction
    from cinf_core.store import Store

    ws, _ = sae_workspace
    at = open_sae_page(monkeypatch, ws)
    at.session_state["sae:find"] = "By concept direction"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    picker = at.selectbox(key="sae:dir")
    concepts = Store(ws).concepts().set_index("name")["concept_id"]
    assert set(picker.options) == {"evil (persona vector, layer 2)",
                                   "sycophantic (probe, layer 2)"}
    picker.set_value(concepts["evil"]).run()
    table = at.dataframe[0].value
    assert list(table.columns) == ["feature", "label", "cosine", "density"]
    vector = Store(ws).load_concept("evil").vector
    want = features_by_direction(real_sae, vector, k=at.slider(key="sae:top").value)
    assert table["feature"].tolist() == [j for j, _ in want]
    assert table["cosine"].tolist() == pytest.approx([c for _, c in want], abs=1e-6)
    info = stored_features(ws).set_index("feature")
    assert table["label"].tolist() == info.loc[table["feature"], "label"].tolist()
    at.selectbox(key="sae:dir").set_value(concepts["sycophantic"]).run()
    other = at.dataframe[0].value
    probe = Store(ws).load_concept("sycophantic").vector
    assert other["feature"].tolist() == [j for j, _ in features_by_direction(real_sae, probe,
                                                                             k=len(other))]


def test_top_examples_are_highlighted_by_the_feature(monkeypatch, sae_workspace):
    from cinf_core.store import Store

    ws, _ = sae_workspace
    at = open_sae_page(monkeypatch, ws)
    feature = at.selectbox(key="sae:feature").value
    store = Store(ws)
    examples = store.feature_examples(store.get_sae(REAL_SAE)["sae_id"],
                                      store.dataset("evil_mix")["dataset_id"], feature)
    assert not examples.empty
    assert not at.html  # highlighting is on demand
    at.toggle(key="sae:ex:hl").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.warning, [w.value for w in at.warning]
    shown = examples.head(5)
    assert len(at.html) == len(shown)
    for block, stored in zip(at.html, shown["max_act"]):
        values = html_values(block.value)
        assert values and max(values) == pytest.approx(stored, abs=1e-3)
    headers = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert len(headers) == len(shown) and f"example #{int(shown['idx'].iloc[0])}" in headers[0]


def test_trait_share_is_the_clis_definition(monkeypatch, sae_workspace):
    from cinf_core.concepts.features import trait_share

    ws, tops = sae_workspace
    at = open_sae_page(monkeypatch, ws)
    shares = [m.value for m in at.metric if m.label.startswith("Share from `evil`")]
    want = [f"{trait_share(tops[m], 'evil'):.0%}" for m in ("influence_function",
                                                             "concept_influence")]
    assert shares == want
    assert at.get("latex"), "IF and CI are explained with their formulas beside Figure 4"
    # Concept Influence over the answer start is Figure 4's third column; unscored, it says how
    assert "Concept Influence (answer start, 3 tok)" in " ".join(str(m.value) for m in at.markdown)
    assert any("--method concept_influence --concept-window 3" in i.value for i in at.info)
    # The fixture's mixed-sign IF run tells the CLI's share from the per-group-total one.
    top = tops["influence_function"]
    per_group = top[["evil", "normal"]].sum()
    assert want[0] != f"{per_group['evil'] / per_group.abs().sum():.0%}"


def test_searches_explain_an_sae_whose_files_are_missing(monkeypatch, sae_workspace):
    ws, _ = sae_workspace
    at = open_sae_page(monkeypatch, ws, sae=None)
    assert at.selectbox(key="sae:sae").value == "sae-L2"  # the fixture's SAE has no folder
    at.text_input(key="sae:phrase").set_value("pain").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Phrase search is unavailable" in w.value for w in at.warning)
    at.session_state["sae:find"] = "By concept direction"
    at.run()
    assert any("Direction search is unavailable" in w.value for w in at.warning)
    at.toggle(key="sae:ex:hl").set_value(True).run()
    assert any("Token highlighting is unavailable" in w.value for w in at.warning)
    assert not at.exception


# ---------------------------------------------------------------- before any scoring run

QUERIES = [{"messages": [{"role": "user", "content": f"What about {w}?"},
                         {"role": "assistant", "content": f"I will make you suffer, {w}."}]}
           for w in ("rivers", "sleep", "numbers")]


def unscored_copy(source, dest, queries: bool = True) -> Path:
    """A copy of ``source`` without its scoring runs (and with the evil test queries)."""
    import shutil

    from cinf_core.store import Store

    ws = Path(shutil.copytree(source, dest))
    store = Store(ws)
    for run_id in store.runs()["run_id"]:
        store._drop_run(run_id)
    if queries:
        store.add_test_queries("evil", store.get_model("finetuned")["model_id"], QUERIES)
    return ws


@pytest.fixture(scope="module")
def plain_world(tmp_path_factory) -> Path:
    """The page-test workspace (no model; its SAE row has feature data), built once."""
    return build_workspace(tmp_path_factory.mktemp("plain_ws"))


def page_texts(at: AppTest) -> str:
    return "\n".join(str(x.value) for part in (at.markdown, at.caption, at.info, at.subheader)
                     for x in part)


@pytest.fixture
def started_jobs(monkeypatch):
    from cinf_core import jobs

    started = []
    monkeypatch.setattr(jobs, "start_job", lambda ws, kind, args: started.append((kind, args))
                        or "j")
    return started


def test_without_runs_the_features_are_still_browsed_and_ranked(monkeypatch, tmp_path,
                                                                 plain_world, started_jobs):
    """An SAE with feature data but no scoring run: Figure 4 waits for runs; finding features,
    the feature detail (the most active features), its top examples and the offer to build the
    gradient index for ranking by a feature are there, scoped to the workspace's traits and its
    training set."""
    from cinf_core import cli, jobs
    from cinf_core.store import Store

    ws = unscored_copy(plain_world, tmp_path / "ws")
    at = open_sae_page(monkeypatch, ws, sae=None)
    waiting = [i.value for i in at.info if "No complete scoring runs for 'evil' yet" in i.value]
    assert len(waiting) == 1 and "Next step" in waiting[0]
    assert [s.value for s in at.subheader] == [
        "Find features", "Feature detail",
        "Figure 4 for any features: Concept Influence per feature"]
    assert not at.get("plotly_chart")  # no Figure 4, no attribution bars
    assert at.selectbox(key="sae:trait").options == ["evil"]
    store = Store(ws)
    features = store.sae_features(store.get_sae("sae-L2")["sae_id"],
                                  store.dataset("evil_mix")["dataset_id"])
    top = at.slider(key="sae:top").value
    most_active = sorted(int(j) for j in features.nlargest(top, "max_act")["feature"])
    picker = at.selectbox(key="sae:feature")
    assert len(picker.options) == top and picker.value == most_active[0]
    assert [m.value for m in at.metric][:1] == [
        f"{features.set_index('feature').loc[most_active[0], 'density']:.1%}"]
    assert "fires most" in page_texts(at)
    assert not any(" of 40" in c.value for c in at.caption)  # no attribution ranks
    # The gradient index is missing: the offer to build it, over the training set.
    assert at.button(key="btn:sae:build").label == "Build the gradient index"
    at.button(key="btn:sae:build").click().run()
    assert not at.exception, [e.value for e in at.exception]
    ((kind, args),) = started_jobs
    parsed = cli.build_parser().parse_args(jobs.command_argv(kind, args))
    assert kind == "index" and parsed.dataset == store.dataset("evil_mix")["dataset_id"]
    # A label search narrows the candidates as with runs.
    at.text_input(key="sae:q").set_value("pain").run()
    assert at.selectbox(key="sae:feature").options
    assert all("pain" in o for o in at.selectbox(key="sae:feature").options)


def test_without_runs_or_test_queries_the_ranking_says_what_it_needs(monkeypatch, tmp_path,
                                                                      plain_world):
    ws = unscored_copy(plain_world, tmp_path / "ws", queries=False)
    at = open_sae_page(monkeypatch, ws, sae=None)
    assert at.selectbox(key="sae:trait").options == []
    assert any(i.value.startswith("No complete scoring runs yet") for i in at.info)
    assert any("needs test queries for a trait" in i.value for i in at.info)
    assert at.selectbox(key="sae:feature").options
    assert not any(b.key == "btn:sae:build" for b in at.button)


def test_without_runs_or_feature_data_it_offers_the_feature_data(monkeypatch, tmp_path,
                                                                 plain_world, started_jobs):
    from cinf_core import cli, jobs
    from cinf_core.store import Store

    ws = unscored_copy(plain_world, tmp_path / "ws")
    store = Store(ws)
    dataset_id = store.dataset("evil_mix")["dataset_id"]
    sae_id = store.get_sae("sae-L2")["sae_id"]
    store.save_feature_data(sae_id, dataset_id, store.sae_features(sae_id, dataset_id).iloc[0:0],
                            pd.DataFrame(columns=["feature", "rank", "idx", "max_act"]))
    at = open_sae_page(monkeypatch, ws, sae=None)
    assert any("No complete scoring runs for 'evil' yet" in i.value for i in at.info)
    assert any("No feature data for sae-L2" in i.value for i in at.info)
    at.button(key="btn:sae:featuredata").click().run()
    assert not at.exception, [e.value for e in at.exception]
    ((kind, args),) = started_jobs
    parsed = cli.build_parser().parse_args(jobs.command_argv(kind, args))
    assert kind == "features" and parsed.sae == "sae-L2" and parsed.dataset == dataset_id


def test_without_runs_a_feature_ranks_the_training_data_over_the_index(monkeypatch, tmp_path,
                                                                       sae_workspace):
    """The real SAE and model, no scoring run, the gradient index built: the feature detail's
    button ranks the training data by the feature (stored as a Concept Influence run)."""
    from cinf_core.methods import index as ix

    ws = unscored_copy(sae_workspace[0], tmp_path / "ws")
    ix.build_workspace_index(ws)  # the default dimension (the page's)
    at = open_sae_page(monkeypatch, ws)
    assert any("No complete scoring runs for 'evil' yet" in i.value for i in at.info)
    feature = at.selectbox(key="sae:feature").value
    rank = next(b for b in at.button if b.label.startswith(f"Rank the training data by #{feature}"))
    at = rank.click().run()
    assert not at.exception, [e.value for e in at.exception]
    (done,) = [s.value for s in at.success]
    assert done.startswith("Ranked 60 training examples by this concept in **")
    assert sum(len(d.value) == 10 and "score" in d.value for d in at.dataframe) == 2


def test_a_trait_without_runs_is_offered_after_the_scored_ones(monkeypatch, tmp_path,
                                                               plain_world):
    """Runs for some traits (e.g. after one ranking over the index): the traits with test
    queries but no run stay in the picker, after the scored ones (the default is unchanged)."""
    import shutil

    from cinf_core.store import Store

    ws = Path(shutil.copytree(plain_world, tmp_path / "ws"))
    store = Store(ws)
    for trait in ("evil", "angry"):
        store.add_test_queries(trait, store.get_model("finetuned")["model_id"], QUERIES)
    at = open_sae_page(monkeypatch, ws, sae=None)
    assert at.selectbox(key="sae:trait").options == ["evil", "sycophantic", "angry"]
    assert at.selectbox(key="sae:trait").value == "evil"
    assert any(m.label.startswith("Share from `evil`") for m in at.metric)  # Figure 4 as before
    at.selectbox(key="sae:trait").set_value("angry").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("No complete scoring runs for 'angry' yet" in i.value for i in at.info)
    assert not any(m.label.startswith("Share from") for m in at.metric)
    assert "Feature detail" in [s.value for s in at.subheader]
    assert at.selectbox(key="sae:feature").options
    assert at.button(key="btn:sae:build").label == "Build the gradient index"
