"""'Rank the training data by this concept': the gradient-index panel of the SAE features and
Concepts pages. With the workspace's gradient index built, a concept's Concept Influence over
every training example takes seconds (one backward pass on the test queries and one matrix
product, in the engine: ``cinf_core.methods.index_runs``); without it the panel offers to build
the index as a background job (``python -m cinf_core index``). Each ranking is stored as an
ordinary Concept Influence run (method key ``concept_influence@index<k>``), so the other pages
show it too."""
from __future__ import annotations

import time

import plotly.graph_objects as go
import streamlit as st

from cinf_core.methods import index_runs, registry
from cinf_core.store import Store
from cinf_core.views.index import group_influence, index_caption
from cinf_core.views.labels import guess_trait_label, label_colors
from pages import _shared as sh

MODEL = "finetuned"
SHOWN = 10


def index_ready(slot: str, dataset_id: str, offer: bool = True) -> bool:
    """Say what the workspace's gradient index is; offer to build it when it is missing or
    unfinished (``offer``; else one line pointing up the page). True when a query can run now."""
    status = index_runs.index_status(sh.workspace(), MODEL, dataset_id)
    ready = bool(status) and status["status"] == "complete" and not status.get("stale")
    if not offer:
        if not ready:
            st.caption("Needs the gradient index (build it above).")
        return ready
    method = registry.method_label(f"concept_influence@index{index_runs.DEFAULT_DIM}")
    st.caption(index_caption(status) + " Ranking by a concept over the index takes seconds; "
               f"each ranking is stored as a run ({method}).")
    if ready or sh.read_only():
        return ready
    job = sh.running_job(("index",), besides=f"{slot}:build")
    if job is not None:
        st.info("The gradient index is being built in the background; this panel works as soon "
                "as it is done.", icon=":material/hourglass_top:")
        sh.job_progress(("index",), besides=f"{slot}:build")
        return False
    sh.empty_state("This workspace has no complete gradient index for this model and dataset.",
                   "build it once: one pass over the training data (about one Concept Influence "
                   "run; `python -m cinf_core index`), then every concept ranks in seconds.")
    sh.job_launcher(f"{slot}:build", "Build the gradient index", "index",
                    {"dataset": dataset_id, "model": MODEL})
    return False


def rank_button(slot: str, label: str, trait: str, dataset_id: str, make_concepts,
                help: str | None = None) -> dict | None:
    """A button that ranks the training data by the concepts ``make_concepts()`` returns (ids;
    called on click), measured on ``trait``'s test queries; returns the last result of this
    slot (kept across reruns), with ``elapsed_s`` measured around the whole call."""
    key = f"rank:{slot}"
    if st.button(label, key=f"btn:{key}", type="primary", help=help):
        start = time.perf_counter()
        try:
            with st.spinner("Ranking over the gradient index…"):
                concepts = make_concepts()
                result = index_runs.rank_concepts(sh.workspace(), concepts, trait,
                                                  model=MODEL, dataset=dataset_id)
        except Exception as err:  # noqa: BLE001 — a refusal or a missing input is shown
            st.session_state.pop(key, None)
            st.error(f"Could not rank: {err}")
            return None
        result["elapsed_s"] = time.perf_counter() - start
        st.session_state[key] = result
    return st.session_state.get(key)


def elapsed_line(result: dict) -> str:
    n = result["index"]["n_examples"]
    t = result["timings"]
    query = t.get("queries_s", 0.0) + t.get("score_s", 0.0)
    k = len(result["runs"])
    what = "this concept" if k == 1 else f"{k} concepts"
    cached = " (stored before; read back)" if all(r["cached"] for r in result["runs"]) else ""
    return (f"Ranked {n} training examples by {what} in **{result['elapsed_s']:.1f} s** "
            f"(the query itself: {query:.2f} s over the gradient index){cached}.")


def show_ranking(result: dict, run: dict) -> None:
    """The run's top and bottom training examples."""
    scored = sh.read(Store.scored_examples, run["run_id"])
    if scored.empty:
        st.caption("The ranking is not in the store (yet).")
        return
    cols = ["rank", "score", "data_origin", "prompt", "response"]
    config = {"score": st.column_config.NumberColumn("CI score", format="%.3g"),
              "response": st.column_config.TextColumn("response", width="large")}
    left, right = st.columns(2)
    with left:
        st.markdown(f"**Top {SHOWN}**: upweighting them pushes *{run['concept']}* up")
        st.dataframe(scored.head(SHOWN)[cols], hide_index=True, column_config=config)
    with right:
        st.markdown(f"**Bottom {SHOWN}**: upweighting them pushes it down")
        st.dataframe(scored.tail(SHOWN).iloc[::-1][cols], hide_index=True, column_config=config)
    st.caption(f"Run `{run['run_id']}` (Concept Influence over the gradient index, test queries "
               f"of '{result['trait']}'): also on **Influential examples**.")


def feature_influence_chart(result: dict, names: dict[str, str], key: str) -> None:
    """Figure 4 over the index: each concept's Concept Influence summed per data group."""
    scored = {names.get(r["concept_id"], r["concept"]): sh.read(Store.scored_examples, r["run_id"])
              for r in result["runs"]}
    bars = group_influence(scored)
    if bars.empty:
        st.caption("Nothing to draw.")
        return
    labels = sorted(bars["grp"].unique())
    trait_label = result["trait"] if result["trait"] in labels else guess_trait_label(labels)
    colors = label_colors(labels, trait_label)
    order = list(dict.fromkeys(bars["concept"]))
    fig = go.Figure()
    for grp in labels:
        part = bars[bars["grp"] == grp]
        fig.add_bar(y=part["concept"], x=part["influence"], name=f"from {grp} data",
                    orientation="h", marker_color=colors[grp])
    fig.update_layout(barmode="relative", title=f"Concept Influence of each feature on "
                                                f"'{result['trait']}' test queries")
    fig.update_yaxes(categoryorder="array", categoryarray=order[::-1], title=None)
    fig.update_xaxes(title="Σ CI score over the group's training examples")
    sh.chart(sh.style_fig(fig, 140 + 30 * len(order)), key=key)
