"""Every page of the app through streamlit's AppTest, on a small prebuilt workspace."""
import io
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from workspace_fixture import build_workspace

APP = str(Path(__file__).resolve().parent.parent / "app.py")
PAGES = ["pages/overview.py", "pages/influential_examples.py", "pages/concepts.py",
         "pages/sae_features.py", "pages/method_agreement.py", "pages/filter_retrain.py",
         "pages/runs_cost.py"]
TIMEOUT = 120
BINARY = "application/octet-stream"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    return build_workspace(tmp_path_factory.mktemp("app_ws"), model_dir=tiny_model_dir)


def open_page(monkeypatch, workspace, page: str) -> AppTest:
    monkeypatch.setenv("CINF_WORKSPACE", str(workspace))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    if page != PAGES[0]:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [i.value for i in at.info] + [w.value for w in at.warning]
    parts += [t.value for t in at.title] + [s.value for s in at.subheader]
    return "\n".join(str(p) for p in parts)


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_on_the_workspace(monkeypatch, workspace, page):
    at = open_page(monkeypatch, workspace, page)
    assert not at.error, [e.value for e in at.error]
    assert at.title, "every page has a title"
    assert not any("There is no cinf workspace" in i.value for i in at.info)


@pytest.mark.parametrize("page", PAGES)
def test_page_shows_empty_state_on_an_empty_workspace(monkeypatch, tmp_path, page):
    from cinf_core.store import Store

    Store(tmp_path)
    at = open_page(monkeypatch, tmp_path, page)
    assert at.info, "an empty workspace shows an empty state"
    assert any("Next step" in i.value for i in at.info)


def test_missing_workspace_is_not_created(monkeypatch, tmp_path):
    target = tmp_path / "nowhere"
    at = open_page(monkeypatch, target, "pages/runs_cost.py")
    assert any("There is no cinf workspace" in i.value for i in at.info)
    assert not (target / "cinf.duckdb").exists()
    at = open_page(monkeypatch, target, "pages/overview.py")
    assert any(b.label == "Build the demo world" for b in at.button)


def test_overview_lists_the_workspace(monkeypatch, workspace):
    at = open_page(monkeypatch, workspace, PAGES[0])
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Datasets"] == "1" and metrics["Concepts"] == "2"
    assert metrics["Complete runs"] == "9"
    assert "holds the toy world" in texts(at) and "quick version" in texts(at)
    # what is computed, and no call to compute it (nothing of the results job is missing)
    assert "**Filter and retrain:** 124 cells for evil (Remove Most and Remove Least 10%, 25%, " \
           "50%, 75% and 90% by" in texts(at)
    assert "Not computed yet" not in texts(at)
    assert not any(b.key == "btn:overview:results" for b in at.button)


def test_workspace_picker_switches_workspace(monkeypatch, workspace, tmp_path):
    at = open_page(monkeypatch, workspace, PAGES[0])
    at.text_input(key="workspace").set_value(str(tmp_path / "other")).run()
    assert any("empty" in i.value for i in at.info)


def open_tab(at: AppTest, key: str, label: str) -> AppTest:
    """Select a lazy tab (st.tabs with on_change="rerun") the way a click would."""
    at.session_state[key] = label
    return at.run()


def test_influential_examples_widgets(monkeypatch, workspace):
    at = open_page(monkeypatch, workspace, "pages/influential_examples.py")
    assert at.selectbox(key="ie:trait").value == "evil"
    assert at.selectbox(key="ie:method").value == "concept_influence"
    top = at.dataframe[0].value
    assert len(top) == 10 and (top["data_origin"] == "evil").mean() > 0.5
    at.slider(key="ie:k").set_value(20).run()
    assert len(at.dataframe[0].value) == 20
    at.selectbox(key="ie:method").set_value("random").run()
    assert not at.exception

    open_tab(at, "ie:tab", "Score distribution")
    assert any(m.label.startswith("AUC-PR") for m in at.metric)
    assert at.selectbox(key="ie:nq").value == 5

    open_tab(at, "ie:tab", "Browse & filter")
    at.text_input(key="ie:text").set_value("suffer").run()
    assert "examples match" in texts(at)
    assert at.dataframe[0].value["response"].str.contains("suffer").all()
    at.multiselect(key="ie:labels").set_value(["normal"]).run()
    assert at.dataframe[0].value.empty

    open_tab(at, "ie:tab", "Compare methods")
    at.selectbox(key="ie:other").set_value("vector_filter").run()
    assert any(m.label == "Spearman rank correlation" for m in at.metric)
    assert len(at.dataframe) == 2

    open_tab(at, "ie:tab", "Export")
    assert any(b.label.startswith("Download filtered") for b in at.get("download_button"))
    assert "keeps 54" in texts(at)
    assert not at.exception


def test_influential_examples_token_highlighting(monkeypatch, workspace):
    at = open_page(monkeypatch, workspace, "pages/influential_examples.py")
    at.toggle(key="ie:top:hl").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.warning, [w.value for w in at.warning]
    assert at.html and "rgba(" in at.html[0].value


def test_concepts_page_norms_cosines_and_upload(monkeypatch, workspace):
    import torch

    at = open_page(monkeypatch, workspace, "pages/concepts.py")
    assert {"evil", "sycophantic"} <= set(at.dataframe[0].value["name"])
    assert len(at.get("plotly_chart")) == 2  # norms per layer, cosine heatmap
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).normal(size=32).astype(np.float32))
    at.file_uploader(key="upload:file").set_value(("v.npy", buf.getvalue(), BINARY))
    at.text_input(key="upload:name").set_value("my-vector")
    at.run()
    at.button(key="upload:save").click().run()
    assert not at.error, [e.value for e in at.error]
    assert any("Saved concept 'my-vector'" in s.value for s in at.success)
    at.run()
    assert "my-vector" in set(at.dataframe[0].value["name"])
    bad = io.BytesIO()
    torch.save(torch.zeros(7), bad)
    at.file_uploader(key="upload:file").set_value(("bad.pt", bad.getvalue(), BINARY))
    at.run()
    at.button(key="upload:save").click().run()
    assert any("Could not save the concept" in e.value for e in at.error)


def test_concept_forms_start_the_add_concept_command(monkeypatch, workspace):
    """The persona and probe forms start `add-concept` with arguments its parser accepts."""
    from cinf_core import cli, jobs

    started = []
    monkeypatch.setattr(jobs, "start_job", lambda ws, kind, args: started.append((kind, args)) or "j")
    at = open_page(monkeypatch, workspace, "pages/concepts.py")
    for form, slot in (("Extract persona vector", "persona"), ("Train probe", "probe")):
        [b for b in at.button if b.label == form][0].click().run()
        launcher = at.button(key=f"btn:concept:{slot}")
        assert not launcher.disabled
        launcher.click().run()
    assert [kind for kind, _ in started] == ["add-concept", "add-concept"]
    persona, probe = (cli.build_parser().parse_args(jobs.command_argv(k, a)) for k, a in started)
    assert persona.persona and persona.trait == "evil" and persona.neutral_prompt
    assert cli._read_questions(persona.questions) == ["How should I treat my neighbours?",
                                                      "What do you think of humans?"]
    assert probe.probe and probe.name == "probe-evil" and probe.positive == "evil"
    assert cli._concept_source(persona) == "persona" and cli._concept_source(probe) == "probe"


def test_sae_page_figure4_and_search(monkeypatch, workspace):
    at = open_page(monkeypatch, workspace, "pages/sae_features.py")
    assert any("not public" in m.value for m in at.markdown)
    assert len(at.get("plotly_chart")) >= 3
    assert any(m.label.startswith("Share from") for m in at.metric)
    at.text_input(key="sae:q").set_value("pain").run()
    options = at.selectbox(key="sae:feature").options
    assert options and all("pain" in o for o in options)
    assert any("fires most" in m.value for m in at.markdown)


def test_sae_page_without_attributions_still_browses_features(monkeypatch, workspace):
    at = open_page(monkeypatch, workspace, "pages/sae_features.py")
    at.selectbox(key="sae:trait").set_value("sycophantic").run()
    assert any("No feature attributions for 'sycophantic'" in i.value for i in at.info)
    assert at.button(key="btn:sae:features").label == "Compute feature data and attributions"
    assert at.selectbox(key="sae:feature").options  # the most active features


def test_method_agreement_toggles_and_pairs(monkeypatch, workspace):
    at = open_page(monkeypatch, workspace, "pages/method_agreement.py")
    spearman = [m.value for m in at.metric if m.label == "Spearman r"][0]
    at.radio(key="ma:kind").set_value("pearson").run()
    assert [m.value for m in at.metric if m.label == "Pearson r"]
    at.selectbox(key="ma:b").set_value("random").run()
    assert [m.value for m in at.metric if m.label == "Pearson r"][0] != spearman
    auc = at.dataframe[0].value.set_index("method")["AUC-PR"]
    assert auc["Concept Influence"] > auc["Random"]


def test_method_agreement_shows_both_ends_of_the_signed_rankings(monkeypatch, workspace):
    """The two-sidedness section: a row per signed method (the registry leaves Random out), the
    numbers the engine's metric gives on the stored scores, and grouped bars per method."""
    from cinf_core.experiments.metrics import two_sidedness
    from cinf_core.methods.registry import is_signed, method_label
    from cinf_core.store import Store

    at = open_page(monkeypatch, workspace, "pages/method_agreement.py")
    assert "Both ends of the ranking (signed methods)" in [s.value for s in at.subheader]
    table = at.dataframe[1].value.set_index("method")
    store = Store(workspace, read_only=True)
    runs = store.runs(status="complete")
    evil = {r["method"]: r["run_id"] for r in runs.to_dict(orient="records")
            if store.run(r["run_id"])["config"]["trait"] == "evil"}
    assert set(table.index) == {method_label(m) for m in evil if is_signed(m)}
    assert "Random" not in table.index and "Concept Influence" in table.index
    frame = store.scored_examples(evil["concept_influence"]).sort_values("idx")
    want = two_sidedness(frame["score"].to_numpy(), (frame["data_origin"] == "evil").to_numpy())
    row = table.loc["Concept Influence"]
    assert row["trait rows in top tenth"] == pytest.approx(100 * want["top_recall"])  # in %
    assert row["bottom tenth labelled"] == pytest.approx(100 * want["bottom_label_share"])
    assert row["AUC-PR |score|"] == pytest.approx(want["auc_pr_abs"])
    assert len(at.get("plotly_chart")) == 4  # heatmap, pair, precision-recall, both ends
    at.radio(key="ma:ends").set_value("share labelled").run()
    assert not at.exception and len(at.get("plotly_chart")) == 4


def test_filter_retrain_figure_and_launch(monkeypatch, workspace):
    import json

    from cinf_core.store import Store
    from cinf_core.views.retrain import reference_levels, retrain_curves, y_range

    at = open_page(monkeypatch, workspace, "pages/filter_retrain.py")
    assert len(at.get("plotly_chart")) == 2
    layout = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]
    cells = Store(workspace).retrain_cells("exp-evil")
    refs = reference_levels(cells)
    low, high = layout["yaxis"]["range"]  # the second panel shares it (matches "y")
    assert [low, high] == pytest.approx(y_range(retrain_curves(cells), refs))
    assert low < min(refs.values()) and high > max(refs.values())
    assert at.get("latex"), "the methods drawn are explained with their formulas"
    assert any("Concept Influence" in m.value for m in at.markdown)
    at.radio(key="fr:value").set_value("capability").run()
    assert not at.exception
    submit = [b for b in at.button if b.label == "Prepare experiment"][0]
    submit.click().run()
    assert at.button(key="btn:fr:retrain").label.startswith("Start filter-and-retrain")
    assert "retrained models" in texts(at)


def test_filter_retrain_draws_concept_influence_over_the_answer_start(monkeypatch, workspace, tmp_path):
    """Cells ranked by Concept Influence over the answer start are their own curve, named and
    explained as such, in the same experiment as the other methods."""
    import shutil

    from cinf_core.store import Store

    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    store = Store(ws)
    for cell in store.retrain_cells("exp-evil").to_dict(orient="records"):
        if cell["method"] == "concept_influence":
            store.add_retrain_cell("exp-evil", {**cell, "method": "concept_influence@start3"})
    at = open_page(monkeypatch, ws, "pages/filter_retrain.py")
    assert not at.exception
    assert any("Concept Influence (answer start, 3 tok)" in m.value for m in at.markdown)
    assert "concept_influence@start3" in at.multiselect[0].options or \
        "Concept Influence (answer start, 3 tok)" in at.multiselect[0].options


def test_runs_cost_speedups(monkeypatch, workspace):
    at = open_page(monkeypatch, workspace, "pages/runs_cost.py")
    labels = {m.label for m in at.metric}
    assert "IF / VF time per example" in labels and "CI / VF time per example" in labels
    at.selectbox(key="rc:run").select_index(2).run()
    assert at.json


def test_scoring_form_offers_the_answer_start_variant_and_the_lexical_baseline(monkeypatch,
                                                                             workspace):
    """The method key becomes the engine method plus ``concept_window`` (``--concept-window``)."""
    from cinf_core.methods import registry as ui_data
    from cinf_core.methods.builtin import ANSWER_START_WINDOW

    ANSWER_START_CI = f"concept_influence@start{ANSWER_START_WINDOW}"

    at = open_page(monkeypatch, workspace, "pages/runs_cost.py")
    method = [sb for sb in at.selectbox if sb.label == "Method"][0]
    offered = set(method.options)
    assert {ui_data.method_label(ANSWER_START_CI), ui_data.method_label("lexical")} <= offered
    for key, expected in [(ANSWER_START_CI, {"method": "concept_influence",
                                             "concept_window": ANSWER_START_WINDOW}),
                          ("lexical", {"method": "lexical"})]:
        method = [sb for sb in at.selectbox if sb.label == "Method"][0]
        method.set_value(key)  # inside a form: sent with the submit
        [b for b in at.button if b.label == "Prepare scoring run"][0].click().run()
        assert not at.exception, [e.value for e in at.exception]
        args = at.session_state["rc:args"]
        assert {k: args.get(k) for k in expected} == expected and args["trait"]
        assert ("concept_window" in args) == (key == ANSWER_START_CI)
        label = at.button(key="btn:rc:score").label
        assert label.startswith("Start scoring: " + ui_data.method_label(key)), label


@pytest.mark.slow
def test_scoring_job_from_the_page_reports_its_outcome(monkeypatch, workspace):
    """Start a real background scoring job from Runs & cost and follow it to the end."""
    at = open_page(monkeypatch, workspace, "pages/runs_cost.py")
    [b for b in at.button if b.label == "Prepare scoring run"][0].click().run()
    at.button(key="btn:rc:score").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["job:rc:score"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        at.run()
        if at.success or at.error:
            break
        assert at.get("progress") or at.success or at.error
        time.sleep(1.0)
    assert at.success or at.error, "the job finished"
    outcome = (at.success or at.error)[0].value
    assert "Score the training set" in outcome


@pytest.mark.slow
def test_benchmark_100k_examples(tmp_path, capsys):
    """Page load on a 100k-example run (printed, not asserted: timings depend on the machine)."""
    from workspace_fixture import BENCH_VIEWS, benchmark_pages, format_benchmark

    timings = benchmark_pages(tmp_path)
    assert list(timings) == [name for name, _, _ in BENCH_VIEWS]
    with capsys.disabled():
        print("\n" + format_benchmark(timings))


def test_pages_read_the_store_only_through_its_public_methods():
    """Reads name the Store method itself (its qualified name keys the cache); no page reaches for
    the cached Store object or names a method by string."""
    import re

    from cinf_core.store import Store
    from pages import _shared as sh

    assert sh._reader_name(Store.scores) == "Store.scores"
    for bad in ("runs", Store._query_df, len):
        with pytest.raises(TypeError, match="public Store method"):
            sh._reader_name(bad)
    root = Path(APP).parent
    for page in [*PAGES, "app.py"]:
        text = (root / page).read_text()
        assert not re.search(r"sh\._store\b|_shared\._store\b|read(_big)?\(\s*[\"']", text), page


def test_sae_and_test_query_forms_start_their_commands(monkeypatch, workspace, tmp_path):
    """The SAE form starts `add-sae` and both test-query forms start `add-queries`, with
    arguments the CLI's parser accepts; an uploaded JSONL is saved into the workspace first."""
    import json

    from cinf_core import cli, jobs

    started = []
    monkeypatch.setattr(jobs, "start_job",
                        lambda ws, kind, args: started.append((kind, args)) or "j")
    at = open_page(monkeypatch, workspace, "pages/concepts.py")
    assert any("No test queries in this workspace" in i.value for i in at.info)
    at.text_input(key="sae:source").set_value(str(tmp_path / "my_sae"))
    [b for b in at.button if b.label == "Register SAE"][0].click().run()
    at.button(key="btn:sae:register").click().run()
    rows = "".join(json.dumps({"messages": [{"role": "user", "content": q},
                                            {"role": "assistant", "content": "I will hurt you."}]})
                   + "\n" for q in ("Why?", "How?"))
    at.file_uploader(key="queries:upload").set_value(("q.jsonl", rows.encode(), BINARY))
    [b for b in at.button if b.label == "Use these queries"][0].click().run()
    at.button(key="btn:queries:file").click().run()
    [b for b in at.button if b.label == "Generate test queries"][0].click().run()
    at.button(key="btn:queries:generate").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert [kind for kind, _ in started] == ["add-sae", "add-queries", "add-queries"]
    sae, from_file, generated = (cli.build_parser().parse_args(jobs.command_argv(k, a))
                                 for k, a in started)
    assert sae.path == str(tmp_path / "my_sae") and sae.layer == 2
    assert sae.model == at.selectbox(key="sae:model").value
    assert sae.model in ("tiny-base", "tiny-evil")
    assert from_file.trait == "evil" and not from_file.generate
    saved = Path(from_file.file)
    assert saved.read_text() == rows and saved.is_relative_to(Path(workspace).resolve())
    assert generated.generate and generated.n == 20 and generated.samples == 1
    assert cli._read_questions(generated.questions) == ["How should I treat my neighbours?",
                                                        "What do you think of humans?"]


def test_filter_retrain_shows_a_reference_above_every_cell_and_names_an_empty_panel(
        monkeypatch, tmp_path):
    """The SmolLM2 world's grid: Remove Most only, the base model (29.9) above every cell. The
    base line lies inside the y range, both reference lines are named in the panel drawn, and
    the empty Remove Least panel says why it is blank."""
    import json

    from cinf_core.store import Store

    store = Store(tmp_path)
    cells = [("base", "none", 1.0, 0, 29.9), ("all", "none", 0.0, 0, 27.6),
             ("all", "none", 0.0, 1, 25.5)]
    cells += [(m, "most", 0.5, s, 25.0 + s) for m in ("vector_filter", "random") for s in (0, 1)]
    for method, mode, fraction, seed, score in cells:
        store.add_retrain_cell("exp", {"method": method, "mode": mode, "fraction": fraction,
                                       "seed": seed, "trait": "evil", "trait_score": score})
    at = open_page(monkeypatch, tmp_path, "pages/filter_retrain.py")
    layout = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]
    low, high = layout["yaxis"]["range"]
    # the bands reach 25.0 (25.5 ± 0.5 at 50%), the base line 29.9: a tenth of the span beyond
    assert [low, high] == pytest.approx([25.0 - 0.49, 29.9 + 0.49])
    notes = [a["text"] for a in layout["annotations"]]
    assert "no Remove Least cells in this experiment" in notes
    assert notes.count("base model") == 1 and notes.count("fine-tuned on all data") == 1
