"""Overview: what cinf does and what this workspace holds; builds the demo world when missing."""
from pathlib import Path

import plotly.express as px
import streamlit as st

from cinf_core import jobs
from cinf_core.experiments.evaluate import results_status
from cinf_core.store import Store
from cinf_core.views.format import demo_summary_text
from cinf_core.views.labels import guess_trait_label, label_colors, label_mix
from cinf_core.views.results import results_offer
from cinf_core.views.runs import json_dict
from pages import _shared as sh

sh.header("Concept Influence explorer",
          "Which training examples made my fine-tuned model pick up this trait?")
st.markdown(
    "cinf attributes a fine-tuned model's unwanted trait (*evil*, *sycophantic*, …) to its "
    "training examples by scoring each example's effect on a **concept direction** inside the "
    "model — a persona vector, a probe or an SAE feature — instead of on the test loss. "
    "Rank the data, look at the examples behind the trait, compare methods, and check by "
    "filtering and retraining that removing the top examples removes the trait.")



@st.cache_data(show_spinner=False, max_entries=8)
def _results_status(ws: str, ver: str) -> dict:
    return results_status(sh.store())


store = sh.store()
datasets = sh.read(Store.datasets)
summary = sh.meta("demo_world")

if store is None or (datasets.empty and not summary):
    sh.empty_state(
        f"This workspace (`{sh.workspace()}`) is empty.",
        "build the embedded demo world (a tiny model fine-tuned on data with injected *evil* "
        "and *sycophantic* examples) — it runs in the background and takes a few minutes, "
        "then this page offers to score it with every method; or register your own data with "
        "`python -m cinf_core add-dataset FILE`.")
    if not sh.read_only():
        quick = st.toggle("Quick world (small, about a minute)", value=True, key="demo_quick")
        sh.job_launcher("overview:demo", "Build the demo world", "demo", {"quick": quick})
else:
    if summary:
        st.caption("This workspace holds " + demo_summary_text(summary))
    offer = results_offer(_results_status(sh.workspace(), sh.version()),
                          sh.read(Store.retrain_cells))
    if offer.have:
        st.markdown(offer.have)
    if offer.button and sh.running_job(("demo", "results")) is None:  # not while one computes
        if offer.fresh:
            st.info(offer.todo, icon=":material/pending:")
        else:
            st.caption(offer.todo)
        sh.job_launcher("overview:results", offer.button, "results", {},
                        button_type="primary" if offer.fresh else "secondary")
    runs = sh.runs_view()
    concepts = sh.read(Store.concepts)
    models = sh.read(Store.models)
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Datasets", len(datasets))
    c2.metric("Models", len(models))
    c3.metric("Concepts", len(concepts))
    c4.metric("Complete runs", int((runs["status"] == "complete").sum()) if not runs.empty else 0)

    left, right = st.columns([3, 2])
    with left:
        st.subheader("Datasets")
        if datasets.empty:
            sh.empty_state("No datasets yet.", "`python -m cinf_core add-dataset FILE.jsonl`.")
        else:
            st.dataframe(datasets[["name", "role", "n_examples", "path", "created_at"]],
                         hide_index=True)
            mix = label_mix(datasets)
            if not mix.empty:
                trait = guess_trait_label(mix["label"])
                fig = px.bar(mix, x="count", y="dataset", color="label", orientation="h",
                             color_discrete_map=label_colors(mix["label"], trait),
                             title="Label mix (data_origin)")
                fig.update_xaxes(title="examples (count)")
                fig.update_yaxes(title=None)
                sh.chart(sh.style_fig(fig, height=120 + 40 * len(datasets)), key="label_mix")
    with right:
        st.subheader("Models")
        if models.empty:
            sh.empty_state("No models registered.",
                           "`python -m cinf_core add-model BASE --adapter ADAPTER`.")
        else:
            rows = []
            for _, m in models.iterrows():
                spec = json_dict(m["spec"])
                rows.append({"name": m["name"], "role": m["role"],
                             "base": Path(spec.get("path") or "—").name,
                             "adapter": Path(spec["adapter"]).name if spec.get("adapter") else "—",
                             "path": spec.get("adapter") or spec.get("path")})
            st.dataframe(rows, hide_index=True,
                         column_config={"path": st.column_config.TextColumn("full path")})
        st.subheader("Concepts")
        if concepts.empty:
            sh.empty_state("No concepts yet.", "create one on the **Concepts** page.")
        else:
            st.dataframe(concepts[["name", "kind", "layer"]], hide_index=True)

    st.subheader("Scoring runs")
    if runs.empty and sh.running_job(sh.SCORING_JOBS) is not None:
        st.info("No scoring runs yet: a background job is computing them (its progress is under "
                "**Background jobs** below).", icon=":material/hourglass_top:")
    elif runs.empty:
        sh.empty_state("No scoring runs yet.", "start one on **Runs & cost** or with "
                       "`python -m cinf_core score ...`.")
    else:
        st.dataframe(runs[["method_label", "trait", "dataset", "status", "n_done", "n_total",
                           "wall_s"]].rename(columns={"method_label": "method",
                                                      "wall_s": "wall time (s)"}),
                     hide_index=True)
    sh.job_panel("overview:demo")

st.subheader("Background jobs")


def jobs_table(polling: bool) -> None:
    all_jobs = sh.read(Store.jobs)
    if polling and not all_jobs["status"].isin(jobs.ACTIVE).any():
        st.rerun()  # the last job ended: a full rerun refreshes the page and stops polling
    if all_jobs.empty:
        st.caption("No jobs have run in this workspace.")
        return
    view = all_jobs.head(10).assign(kind=[jobs.JOB_KINDS[k].title if k in jobs.JOB_KINDS else k
                                          for k in all_jobs.head(10)["kind"]])
    st.dataframe(view[["kind", "status", "progress", "message", "created_at", "error"]],
                 hide_index=True,
                 column_config={"progress": st.column_config.ProgressColumn(
                     "progress", min_value=0.0, max_value=1.0, format="percent")})


# Poll while any job runs (started here, on another page or from the CLI); static otherwise.
running = sh.read(Store.jobs)
active = not running.empty and running["status"].isin(jobs.ACTIVE).any()
st.fragment(run_every=2.0 if active else None)(jobs_table)(bool(active))
