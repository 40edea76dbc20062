"""Runs & cost: every scoring run with its settings and timings; what each method costs."""
import plotly.express as px
import streamlit as st

from cinf_core.methods import registry
from cinf_core.store import Store
from cinf_core.views.format import fmt_seconds, newest_with_role
from cinf_core.views.runs import json_dict, method_costs, speedups, timing_breakdown
from pages import _shared as sh

sh.header("Runs & cost", "Every scoring run, its settings and timings — and how much faster the "
          "forward-only methods are than the gradient ones.")


def score_form() -> None:
    """Start a scoring run (``python -m cinf_core score``) as a background job."""
    datasets, models = sh.read(Store.datasets), sh.read(Store.models)
    concepts = sh.read(Store.concepts)
    concept_traits = [json_dict(c).get("info", {}).get("trait")
                      for c in (concepts["config"] if not concepts.empty else [])]
    traits = sorted({*sh.read(Store.traits), *sh.runs_view()["trait"], *concept_traits}
                    - {None, "—"})
    if datasets.empty or models.empty:
        sh.empty_state("Scoring needs a registered dataset and model.",
                       "build the demo world on **Overview**, or run `python -m cinf_core "
                       "add-dataset FILE` and `python -m cinf_core add-model PATH`.")
        return
    with st.form("rc:score"):
        f1, f2, f3 = st.columns(3)
        keys = registry.method_keys()
        # Default: the cheapest method that reads the model (seconds, and it ranks by the concept).
        quick = min((m for m in registry.registered() if m.loads_model), key=lambda m: m.cost)
        method = f1.selectbox("Method", keys, index=keys.index(quick.key),
                              format_func=registry.method_label)
        trait = f2.selectbox("Trait", traits) if traits else f2.text_input("Trait", "evil")
        dataset = f3.selectbox("Training set", list(datasets["name"]),
                               index=newest_with_role(datasets, "train"))
        f4, f5, f6 = st.columns(3)
        model = f4.selectbox("Model", list(models["name"]),
                             index=newest_with_role(models, "finetuned"))
        batch = f5.number_input("Batch size", min_value=1, value=16)
        max_len = f6.number_input("Max tokens per example", min_value=16, value=256, step=16)
        submitted = st.form_submit_button("Prepare scoring run")
    if submitted:
        chosen = registry.get_method(method)
        args = {"method": chosen.name, **chosen.options, "dataset": dataset, "model": model,
                "batch_size": int(batch), "max_length": int(max_len)}
        if chosen.needs_trait:
            args["trait"] = trait
        st.session_state["rc:args"] = args
    args = st.session_state.get("rc:args")
    if args:
        st.caption("Runs are cached by their settings: the same settings return the finished "
                   "run at once, and a killed run resumes where it stopped.")
        key = registry.method_key(args["method"], args)
        sh.job_launcher("rc:score", f"Start scoring: {registry.method_label(key)}"
                        + (f" · {args['trait']}" if "trait" in args else ""), "score", args)


if sh.store() is None:
    sh.no_store_state()
    st.stop()
runs = sh.runs_view()
if runs.empty:
    sh.waiting_state("No scoring runs yet.", "start one below or run "
                     "`python -m cinf_core score --method vector_filter --trait evil`.",
                     sh.SCORING_JOBS, sh.n_complete_runs, besides="rc:score")
    if not sh.read_only():
        st.subheader("Start a scoring run")
        score_form()
    st.stop()
sh.job_progress(sh.SCORING_JOBS, sh.n_complete_runs, besides="rc:score")  # runs finish meanwhile

active = runs[runs["status"] == "running"]
for _, r in active.iterrows():
    st.progress(min(1.0, (r["n_done"] or 0) / max(r["n_total"] or 1, 1)),
                text=f"{r['label']}: {r['n_done']:,} of {r['n_total']:,} examples scored")

view = runs.assign(settings=[", ".join(f"{k}={v}" for k, v in sorted(c.items())
                                       if k not in ("trait", "queries"))
                             for c in runs["config"]])
st.dataframe(view[["method_label", "trait", "dataset", "status", "n_done", "n_total", "wall_s",
                   "examples_per_s", "started_at", "host", "settings", "error", "run_id"]],
             hide_index=True, column_config={
                 "method_label": "method",
                 "wall_s": st.column_config.NumberColumn("wall time (s)", format="%.2f"),
                 "examples_per_s": st.column_config.NumberColumn("examples / s", format="%.1f"),
                 "settings": st.column_config.TextColumn("settings", width="large")})

costs = method_costs(runs)
st.subheader("Cost per method")
if costs.empty:
    sh.empty_state("No finished runs with timings yet.", "wait for a run to complete.")
else:
    left, right = st.columns([3, 2])
    with left:
        fig = px.bar(costs, x="method_label", y="s_per_1k_examples", color="method",
                     color_discrete_map=registry.color_map(costs["method"]), log_y=True,
                     text=[fmt_seconds(v) for v in costs["s_per_1k_examples"]],
                     title="Wall time per 1,000 training examples (median over runs)")
        fig.update_layout(showlegend=False)
        fig.update_xaxes(title=None)
        fig.update_yaxes(title="seconds per 1k examples (log scale)")
        sh.chart(sh.style_fig(fig), key="rc:cost")
    with right:
        ratios = speedups(costs)
        if ratios.empty:
            st.caption("Speed-ups need runs of both a gradient method (IF, CI) and a forward "
                       "method (VF, PD).")
        for r in ratios.itertuples():
            st.metric(f"{r.pair} time per example", f"{r.speedup:,.1f}×",
                      help=f"{registry.method_label(r.slow)} takes this many times as long as "
                           f"{registry.method_label(r.fast)} per example.")
    breakdown = timing_breakdown(runs[runs["status"] == "complete"])
    if not breakdown.empty:
        fig = px.bar(breakdown, x="seconds", y="run", color="stage", orientation="h",
                     title="Where the time goes (per run and stage)")
        fig.update_xaxes(title="seconds")
        fig.update_yaxes(title=None)
        sh.chart(sh.style_fig(fig, 140 + 26 * breakdown["run"].nunique()), key="rc:stages")
sh.method_explainer(runs["method"])

st.subheader("Run settings")
pick = st.selectbox("Run", list(runs["label"]), key="rc:run")
row = runs[runs["label"] == pick].iloc[0]
st.json({"config": row["config"], "timings": row["timings"], "model_id": row["model_id"],
         "concept_id": row["concept_id"], "dataset_id": row["dataset_id"]}, expanded=2)

if not sh.read_only():  # a read-only app shows results only
    st.subheader("Start a scoring run")
    score_form()
