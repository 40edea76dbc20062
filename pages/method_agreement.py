"""Method agreement (Figure 3): do the methods rank the training data the same way?"""
import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from cinf_core.methods import registry
from cinf_core.store import Store
from cinf_core.views.agreement import (TWO_SIDED_COLUMNS, correlation_frame, example_labels,
                                       pair_frame, retrieval, score_matrix, two_sided)
from cinf_core.views.examples import thin_for_scatter
from cinf_core.views.labels import guess_trait_label, label_colors
from pages import _shared as sh


# Keyed by workspace, store version and runs: the reads inside are cached by the same version.
@st.cache_data(show_spinner=False, max_entries=8)
def _scores(ws: str, ver: str, runs: tuple[tuple[str, str], ...]):
    """Scores side by side (examples × methods) and each example's label."""
    matrix = score_matrix({label: sh.read(Store.scores, run_id) for label, run_id in runs})
    return matrix, example_labels(sh.read_big(Store.scored_examples, runs[0][1]), matrix.index)


@st.cache_data(show_spinner=False, max_entries=16)
def _correlation(ws: str, ver: str, runs: tuple[tuple[str, str], ...], kind: str):
    return correlation_frame(_scores(ws, ver, runs)[0], kind)


@st.cache_data(show_spinner=False, max_entries=16)
def _retrieval(ws: str, ver: str, runs: tuple[tuple[str, str], ...], positive: str):
    """AUC-PR per method and the precision-recall curves for one positive label."""
    return retrieval(*_scores(ws, ver, runs), positive)


@st.cache_data(show_spinner=False, max_entries=16)
def _two_sided(ws: str, ver: str, runs: tuple[tuple[str, str], ...], positive: str,
               signed: tuple[str, ...]):
    """The two-sidedness diagnostic of the signed runs (their labels) for one positive label."""
    matrix, origins = _scores(ws, ver, runs)
    return two_sided(matrix[list(signed)], origins, positive)


sh.header("Method agreement", "Figure 3: correlation between the methods' scores over the same "
          "training set, and how well each retrieves the labelled trait data.")

if sh.store() is None:
    sh.no_store_state()
    st.stop()
runs = sh.runs_view()
if runs.empty or not (runs["status"] == "complete").any():
    sh.waiting_state("No complete scoring runs yet.",
                     "score the training set with two or more methods on **Runs & cost**.",
                     sh.SCORING_JOBS, sh.n_complete_runs)
    st.stop()

c1, c2 = st.columns([2, 1])
trait, dataset_id, scope = sh.pick_scope(runs, "ma", container=c1)
kind = c2.radio("Correlation", ["spearman", "pearson"], horizontal=True, key="ma:kind",
                format_func=str.capitalize,
                help="Spearman compares rankings (what filtering uses); Pearson compares values.")
if len(scope) < 2:
    sh.waiting_state(f"Only {len(scope)} method has scored '{trait}' on this dataset.",
                     "score it with another method on **Runs & cost**.",
                     sh.SCORING_JOBS, sh.n_complete_runs)
    st.stop()
sh.job_progress(sh.SCORING_JOBS, sh.n_complete_runs)  # more methods arrive while it runs


labels_of = dict(zip(scope["method"], scope["method_label"]))
key = tuple(zip(scope["method_label"], scope["run_id"]))
matrix, origins = _scores(sh.workspace(), sh.version(), key)
corr = _correlation(sh.workspace(), sh.version(), key, kind)
left, right = st.columns([3, 2])
with left:
    z = corr.to_numpy()
    fig = go.Figure(go.Heatmap(z=z, x=corr.columns, y=corr.index, zmin=-1, zmax=1,
                               colorscale="RdBu_r", text=np.round(z, 2), texttemplate="%{text}",
                               colorbar=dict(title=f"{kind} r")))
    fig.update_layout(title=f"{kind.capitalize()} correlation of scores — {trait} "
                            f"({len(matrix):,} examples)")
    fig.update_yaxes(autorange="reversed")
    sh.chart(sh.style_fig(fig, 460), key="ma:heat")
with right:
    st.markdown("**Pick a pair to compare**")
    methods = list(scope["method"])
    first = methods.index("concept_influence") if "concept_influence" in methods else 0
    a = st.selectbox("x axis", methods, format_func=registry.method_label, key="ma:a",
                     index=first)
    rest = [m for m in methods if m != a]
    b = st.selectbox("y axis", rest, format_func=registry.method_label, key="ma:b",
                     index=rest.index("vector_filter") if "vector_filter" in rest else 0)
    st.metric(f"{kind.capitalize()} r", f"{corr.loc[labels_of[a], labels_of[b]]:.3f}")
    st.caption("Heatmap cells are not clickable; choose the pair here.")
sh.method_explainer(methods)

label_values = sorted(origins.unique())
trait_label = trait if trait in label_values else guess_trait_label(label_values)
pair = pair_frame(matrix, origins, labels_of[a], labels_of[b])
pts = thin_for_scatter(pair)
fig = px.scatter(pts, x="x", y="y", color="data_origin", opacity=0.7,
                 color_discrete_map=label_colors(label_values, trait_label),
                 hover_data={"idx": True}, title=f"{labels_of[a]} vs {labels_of[b]} scores")
fig.update_xaxes(title=f"{labels_of[a]} score (a.u.)")
fig.update_yaxes(title=f"{labels_of[b]} score (a.u.)")
sh.chart(sh.style_fig(fig, 420), key="ma:scatter")
if len(pts) < len(pair):
    st.caption(f"Showing a random {len(pts):,} of {len(pair):,} examples.")

st.subheader("Retrieval of labelled trait data (AUC-PR)")
if label_values == ["unlabelled"] or len(label_values) < 2:
    sh.empty_state("This dataset has no `data_origin` labels to retrieve.",
                   "AUC-PR needs a labelled dataset (rows with a `data_origin` field).")
    st.stop()
default = label_values.index(trait_label) if trait_label in label_values else 0
positive = st.selectbox("Positive label", label_values, key="ma:pos", index=default)
found = _retrieval(sh.workspace(), sh.version(), key, positive)
t1, t2 = st.columns([2, 3])
t1.dataframe(found.auc_pr.sort_values("AUC-PR", ascending=False), hide_index=True,
             column_config={"AUC-PR": st.column_config.NumberColumn(format="%.3f"),
                            "× chance": st.column_config.NumberColumn(format="%.1f×")})
t1.caption(f"Chance level (share of `{positive}`) = {found.chance:.3f}.")
fig = px.line(found.curves, x="recall", y="precision", color="method",
              color_discrete_map=registry.color_map(scope["method"], by_label=True),
              title=f"Precision-recall for retrieving `{positive}` examples")
fig.add_hline(y=found.chance, line_dash="dot", line_color="#7F7F7F", annotation_text="chance")
fig.update_xaxes(title="recall (share of labelled examples found)", range=[0, 1])
fig.update_yaxes(title="precision (share of retrieved that are labelled)", range=[0, 1.02])
with t2:
    sh.chart(sh.style_fig(fig, 380), key="ma:pr")

st.subheader("Both ends of the ranking (signed methods)")
st.caption("A signed score (" + registry.SIGN_CONVENTION.split(";")[0] + ") can put the "
           "labelled rows at the top, at the bottom, or at both ends, where ranking by |score| can "
           "retrieve them better than the score. |score| counts from zero, which means no "
           "effect for a gradient method but is an arbitrary point for a raw projection such as "
           "Vector Filter: read its tenths rather than its |score|. Random and other unsigned "
           "baselines are left out.")
signed = tuple(labels_of[m] for m in scope["method"] if registry.is_signed(m))
if not signed:
    sh.empty_state("None of these methods gives a signed score.",
                   "score the trait with a signed method (Concept Influence, Vector Filter, ...) "
                   "on **Runs & cost**.")
    st.stop()
sides = _two_sided(sh.workspace(), sh.version(), key, positive, signed)
share = st.radio("Bars show", ["share of trait rows", "share labelled"], horizontal=True,
                 key="ma:ends",
                 help=f"Share of the label's rows that fall in each tenth (chance: "
                      f"{sides.tail:.0%}), or share of the tenth's rows that carry the label "
                      f"(chance: the label's share, {sides.positive_rate:.1%}).")
chance = sides.tail if share == "share of trait rows" else sides.positive_rate
fig = px.bar(sides.bars, x="method", y=share, color="end", barmode="group",
             color_discrete_map={"top tenth": "#D55E00", "bottom tenth": "#0072B2"},
             title=f"{positive} rows at the top and the bottom tenth of each ranking "
                   f"(dashed: chance, {chance:.0%})")
fig.add_hline(y=chance, line_dash="dash", line_color="#7F7F7F")
fig.update_yaxes(tickformat=".0%", rangemode="tozero")
fig.update_xaxes(title=None)
sh.chart(sh.style_fig(fig, 380), key="ma:ends-chart")
percent = [t for t in TWO_SIDED_COLUMNS.values() if not t.startswith("AUC")]
st.dataframe(sides.table.assign(**{t: 100 * sides.table[t] for t in percent}), hide_index=True,
             column_config={t: st.column_config.NumberColumn(
                 format="%.3f" if t.startswith("AUC") else "%.1f%%")
                 for t in TWO_SIDED_COLUMNS.values()})
st.caption(f"Each tenth is {sides.tail:.0%} of the examples; `{positive}` is "
           f"{sides.positive_rate:.1%} of them. *Trait rows in ... tenth*: share of the "
           f"`{positive}` rows that land there (chance {sides.tail:.0%}); *... tenth labelled*: "
           f"share of the tenth that is `{positive}` (chance {sides.positive_rate:.1%}).")
