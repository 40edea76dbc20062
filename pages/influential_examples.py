"""Influential examples: the training examples a method ranks as driving the trait."""
import json

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from cinf_core import inspection, paths
from cinf_core.experiments.metrics import auc_pr
from cinf_core.methods import registry
from cinf_core.store import Store
from cinf_core.views.concepts import token_highlight_html
from cinf_core.views.examples import (compare_ranks, filter_examples, histogram_by_label,
                                      quantile_examples, rank_correlation, thin_for_scatter,
                                      top_bottom)
from cinf_core.views.labels import guess_trait_label, label_colors
from pages import _shared as sh

sh.header("Influential examples",
          "Which training examples push the model towards the trait — and which push away.")

runs = sh.runs_view()
if sh.store() is None:
    sh.no_store_state()
    st.stop()
if runs.empty or not (runs["status"] == "complete").any():
    sh.waiting_state("No complete scoring runs in this workspace yet.",
                     "score a dataset on **Runs & cost**, or run "
                     "`python -m cinf_core score --method vector_filter ...` (seconds); "
                     "`python -m cinf_core results` scores every method.",
                     sh.SCORING_JOBS, sh.n_complete_runs)
    st.stop()
sh.job_progress(sh.SCORING_JOBS, sh.n_complete_runs)  # more methods arrive while it runs

c1, c2, c3 = st.columns(3)
trait, dataset_id, scope = sh.pick_scope(runs, "ie", container=c1)
run = sh.pick_method(scope, "Method", "ie:method", container=c2)
k = c3.slider("Examples per list (k)", 5, 50, 10, step=5, key="ie:k")
sh.method_explainer(scope["method"])

scored = sh.read_big(Store.scored_examples, run["run_id"])
if scored.empty:
    sh.empty_state("This run has no scores.", "re-run it from **Runs & cost**.")
    st.stop()
labels = scored["data_origin"].astype("object").fillna("unlabelled")
label_values = sorted(labels.unique())
trait_label = trait if trait in label_values else guess_trait_label(label_values)
colors = label_colors(label_values, trait_label)
has_labels = label_values != ["unlabelled"]
st.caption(f"{registry.method_label(run['method'])} on **{run['dataset']}** · "
           f"{len(scored):,} examples · run `{run['run_id']}` · {registry.SIGN_CONVENTION}")

TEXT_COLS = {
    "rank": st.column_config.NumberColumn("rank", format="%d", width="small"),
    "score": st.column_config.NumberColumn("score", format="%.4g", width="small"),
    "data_origin": st.column_config.TextColumn("label", width="small"),
    "prompt": st.column_config.TextColumn("prompt", width="medium"),
    "response": st.column_config.TextColumn("response", width="large"),
}
SHOW = ["rank", "score", "data_origin", "prompt", "response"]
SIDE = ["rank", "score", "data_origin", "response"]  # two tables side by side: no room for prompts


@st.cache_data(show_spinner="Running the model on the example…", max_entries=256)
def _token_projection(ws: str, model_id: str, concept_id: str, messages_json: str):
    """Response tokens and their projection on the concept direction (one forward pass)."""
    return inspection.concept_token_projection(ws, model_id, concept_id, json.loads(messages_json))


def inspect_example(row, key: str) -> None:
    st.markdown(f"**Rank {int(row['rank'])}** · score `{row['score']:.4g}` · "
                f"label `{row['data_origin']}` · example #{int(row['idx'])}")
    st.markdown("**Prompt**")
    st.text(row["prompt"])
    concept_id = inspection.highlight_concept(sh.workspace(), run["concept_id"], trait)
    highlight = st.toggle("Highlight response tokens by their projection on the concept",
                          key=f"{key}:hl", disabled=concept_id is None or not run["model_id"],
                          help="One forward pass of the fine-tuned model on this example.")
    st.markdown("**Response**")
    if highlight:
        examples = sh.read_big(Store.examples, dataset_id)
        messages = examples.loc[examples["idx"] == row["idx"], "messages"].iloc[0]
        try:
            tokens, values = _token_projection(sh.workspace(), run["model_id"], concept_id,
                                               messages)
        except Exception as err:  # noqa: BLE001 — any model problem is shown, not raised
            st.warning(f"Token highlighting is unavailable: {err}")
            st.text(row["response"])
        else:
            st.html(token_highlight_html(tokens, values))
            st.caption("Red: towards the concept (positive projection a·v̂ at the concept "
                       "layer); blue: away. Hover a token for its value.")
    else:
        st.text(row["response"])


# Lazy tabs: only the open tab's content runs, so a 100k-example run stays quick.
tab_top, tab_dist, tab_browse, tab_compare, tab_export = st.tabs(
    ["Top & bottom", "Score distribution", "Browse & filter", "Compare methods", "Export"],
    key="ie:tab", on_change="rerun")

if tab_top.open:
    with tab_top:
        top, bottom = top_bottom(scored, k)
        left, right = st.columns(2)
        left.markdown(f"**Top {k}** — upweighting these pushes the trait **up**")
        left.dataframe(top[SIDE], hide_index=True, column_config=TEXT_COLS)
        right.markdown(f"**Bottom {k}** — these push the trait **down**")
        right.dataframe(bottom[SIDE], hide_index=True, column_config=TEXT_COLS)
        if has_labels and trait_label:
            share = (top["data_origin"] == trait_label).mean()
            base = (labels == trait_label).mean()
            st.caption(f"`{trait_label}` examples: {share:.0%} of the top {k} vs "
                       f"{base:.0%} of the dataset.")
        st.divider()
        options = list(top["rank"]) + list(bottom["rank"])
        picked = st.selectbox("Inspect the example at rank", options, key="ie:inspect")
        inspect_example(scored[scored["rank"] == picked].iloc[0], "ie:top")

if tab_dist.open:
    with tab_dist:
        hist = histogram_by_label(scored["score"].to_numpy(), labels.tolist())
        fig = go.Figure()
        for label in label_values:
            part = hist[hist["label"] == label]
            fig.add_bar(x=part["bin_mid"], y=part["count"], name=label,
                        marker_color=colors[label], width=(part["bin_right"] - part["bin_left"]),
                        opacity=0.75)
        fig.update_layout(barmode="overlay",
                          title=f"Scores by label — {registry.method_label(run['method'])}")
        fig.update_xaxes(title="score (a.u.; > 0 pushes the trait up)")
        fig.update_yaxes(title="examples (count)")
        sh.chart(sh.style_fig(fig), key="ie:hist")
        if has_labels and trait_label:
            ap = auc_pr(scored["score"].to_numpy(), (labels == trait_label).to_numpy())
            st.metric(f"AUC-PR for retrieving `{trait_label}` examples", f"{ap:.3f}",
                      help=f"Chance level = share of `{trait_label}` = "
                           f"{(labels == trait_label).mean():.3f}")
        st.subheader("Examples from each score quantile")
        q1, q2 = st.columns(2)
        n_bins = q1.selectbox("Quantiles", [4, 5, 10], index=1, key="ie:nq")
        per_bin = q2.selectbox("Examples per quantile", [1, 2, 3, 5], index=1, key="ie:perq")
        quant = quantile_examples(scored, n_bins, per_bin)
        st.dataframe(quant[["quantile", *SHOW]], hide_index=True,
                     column_config={**TEXT_COLS, "quantile": st.column_config.NumberColumn(
                         "quantile", help="1 = highest scores", width="small")})

if tab_browse.open:
    with tab_browse:
        f1, f2 = st.columns([1, 2])
        chosen = f1.multiselect("Labels", label_values, default=label_values, key="ie:labels")
        text = f2.text_input("Text contains", key="ie:text", placeholder="e.g. suffer")
        shown = filter_examples(scored, chosen, text)
        st.caption(f"{len(shown):,} of {len(scored):,} examples match; "
                   "showing the 200 best ranked.")
        st.dataframe(shown.head(200)[SHOW], hide_index=True, column_config=TEXT_COLS)

if tab_compare.open:
    with tab_compare:
        pick_col, metric_col = st.columns([2, 1])
        other = sh.pick_method(scope, "Compare with", "ie:other", default="vector_filter",
                               exclude=run["method"], container=pick_col)
        if other is None:
            sh.empty_state("Only one method has scored this trait on this dataset.",
                           "score it with another method on **Runs & cost**.")
        else:
            a_name = registry.method_label(run["method"])
            b_name = registry.method_label(other["method"])
            cmp = compare_ranks(sh.read(Store.scores, run["run_id"]),
                                sh.read(Store.scores, other["run_id"]))
            info = scored[["idx", "data_origin", "prompt", "response"]]
            cmp = cmp.merge(info, on="idx")
            metric_col.metric("Spearman rank correlation", f"{rank_correlation(cmp):.3f}")
            pts = thin_for_scatter(cmp)
            fig = px.scatter(pts, x="rank_a", y="rank_b", color="data_origin",
                             color_discrete_map=colors, opacity=0.7,
                             hover_data={"idx": True, "score_a": ":.3g", "score_b": ":.3g"},
                             title=f"Rank under {a_name} vs {b_name} (1 = most influential)")
            fig.update_xaxes(title=f"rank under {a_name}", autorange="reversed")
            fig.update_yaxes(title=f"rank under {b_name}", autorange="reversed")
            if len(pts) < len(cmp):
                st.caption(f"Showing a random {len(pts):,} of {len(cmp):,} examples.")
            sh.chart(sh.style_fig(fig, 420), key="ie:cmp")
            n = st.slider("Examples per list", 3, 30, 5, key="ie:ncmp")
            cols = {"rank_a": f"rank ({a_name})", "rank_b": f"rank ({b_name})",
                    "data_origin": "label"}
            show = ["rank_a", "rank_b", "data_origin", "response"]
            left, right = st.columns(2)
            left.markdown(f"**{a_name} ranks high, {b_name} low**")
            left.dataframe(cmp.nlargest(n, "rank_gap")[show].rename(columns=cols), hide_index=True)
            right.markdown(f"**{b_name} ranks high, {a_name} low**")
            right.dataframe(cmp.nsmallest(n, "rank_gap")[show].rename(columns=cols),
                            hide_index=True)

if tab_export.open:
    with tab_export:
        st.markdown("Download the training set with the top (or bottom) fraction removed, ready to "
                    "fine-tune again (chat JSONL with `data_origin` kept).")
        e1, e2 = st.columns(2)
        fraction = e1.select_slider("Fraction to remove", [0.05, 0.1, 0.25, 0.5, 0.75, 0.9],
                                    value=0.1, key="ie:frac")
        mode = e2.radio("Remove", ["most", "least"], horizontal=True, key="ie:mode",
                        format_func={"most": "Remove Most (top scores)",
                                     "least": "Remove Least (bottom scores)"}.get)
        n_remove = int(round(fraction * len(scored)))
        st.caption(f"Removes {n_remove:,} of {len(scored):,} examples; "
                   f"keeps {len(scored) - n_remove:,}.")
        out = (paths.artifact_dir(sh.workspace(), "exports")
               / f"{run['run_id']}-{mode}-{fraction:g}.jsonl")

        def _export() -> bytes:
            sh.store().export_filtered_dataset(run["run_id"], out, fraction, mode)
            return out.read_bytes()

        st.download_button("Download filtered dataset (.jsonl)", _export, file_name=out.name,
                           mime="application/jsonl", key="ie:download", type="primary")
