"""SAE features (Figure 4): which SAE features carry a trait's influence, under IF and under CI."""
import plotly.graph_objects as go
import streamlit as st

from cinf_core import ui_data
from pages import _shared as sh

FIG4_METHODS = ("influence_function", "concept_influence")

sh.header("SAE features", "Figure 4: the SAE features through which the training data drives "
          "the trait — Influence Function beside Concept Influence.")
with st.expander("How feature influence is defined", expanded=False):
    st.latex(ui_data.FEATURE_DEFINITION)
    st.markdown("Groups *g* are the `data_origin` labels (trait data vs normal data); features "
                "are ranked by the total Σ_g F_j^g. **The paper's exact procedure is not public; "
                "this is our definition.**")

store = sh.store()
if store is None:
    sh.no_store_state()
    st.stop()
saes = sh.read("saes")
runs = sh.runs_view()
if saes.empty:
    sh.empty_state("No SAE in this workspace.",
                   "build the demo world on **Overview** (it trains an SAE at the concept "
                   "layer), or register an sae-lens folder with `Store.add_sae`.")
    st.stop()
if runs.empty or not (runs["status"] == "complete").any():
    sh.empty_state("No complete scoring runs yet.",
                   "score the training set with `influence_function` and `concept_influence` on "
                   "**Runs & cost**, then attribute them to features.")
    st.stop()

c1, c2, c3 = st.columns(3)
trait, dataset_id, scope = sh.pick_scope(runs, "sae", container=c1)
sae_name = c2.selectbox("SAE", list(saes["name"]), key="sae:sae")
sae = saes[saes["name"] == sae_name].iloc[-1]
top_n = c3.slider("Top features", 5, 30, 10, key="sae:top")

by_method = {}
for method in FIG4_METHODS:
    row = scope[scope["method"] == method]
    if not row.empty:
        by_method[method] = sh.read("feature_attributions", row.iloc[0]["run_id"], sae["sae_id"])
have = {m: f for m, f in by_method.items() if not f.empty}
features = sh.read("sae_features", sae["sae_id"], dataset_id)
names = dict(zip(features["feature"], features["label"])) if not features.empty else {}
labels = sorted({g for f in have.values() for g in f["grp"].unique()})
trait_label = trait if trait in labels else ui_data.guess_trait_label(labels)
colors = ui_data.label_colors(labels, trait_label)


def feature_name(j: int) -> str:
    label = names.get(j)
    return f"#{j} · {label[:28]}" if isinstance(label, str) and label else f"#{j}"


def figure4() -> None:
    """IF beside CI: the top features by influence, each bar split by data group."""
    cols = st.columns(len(FIG4_METHODS))
    for col, method in zip(cols, FIG4_METHODS):
        with col:
            st.markdown(f"**{ui_data.method_label(method)}**")
            if method not in have:
                sh.empty_state(f"No {ui_data.method_label(method)} attributions for this trait.",
                               f"score with `{method}`, then run `python -m cinf_core features`.")
                continue
            top = ui_data.feature_influence(have[method], top_n, trait_label)
            order = [feature_name(j) for j in top.drop_duplicates("feature")["feature"]]
            fig = go.Figure()
            for grp in labels:
                part = top[top["grp"] == grp]
                fig.add_bar(y=[feature_name(j) for j in part["feature"]], x=part["influence"],
                            name=f"from {grp} data", orientation="h", marker_color=colors[grp])
            fig.update_layout(barmode="relative", title=f"Top {top_n} features — "
                              f"{ui_data.METHOD_SHORT[method]}")
            fig.update_yaxes(categoryorder="array", categoryarray=order[::-1], title=None)
            fig.update_xaxes(title="feature influence F_j (score × activation, a.u.)")
            sh.chart(sh.style_fig(fig, 120 + 28 * top_n), key=f"sae:bars:{method}")
            totals = top.groupby("grp")["influence"].sum()
            if trait_label in totals and totals.abs().sum() > 0:
                st.metric(f"Share from `{trait_label}` data (top {top_n})",
                          f"{totals[trait_label] / totals.abs().sum():.0%}",
                          help="Σ_j F_j^trait / Σ_j Σ_g |F_j^g| over the top features: groups can "
                               "push a feature either way, so the denominator counts both.")


if have:
    figure4()
else:
    missing = [ui_data.method_label(m) for m in FIG4_METHODS if m not in by_method]
    sh.empty_state(
        f"No feature attributions for '{trait}' with this SAE yet."
        + (f" Missing runs: {', '.join(missing)}." if missing else ""),
        "score the trait with `influence_function` and `concept_influence`, then compute the "
        f"SAE feature data and attributions: `python -m cinf_core features --sae {sae_name} "
        f"--trait {trait}`, or start it here.")
    sh.job_launcher("sae:features", "Compute feature data and attributions", "features",
                    {"sae": sae_name, "trait": trait})
    if features.empty:
        st.stop()

st.subheader("Feature detail")
d1, d2 = st.columns(2)
query = d1.text_input("Search feature labels (top tokens)", key="sae:q", placeholder="e.g. pain")
candidates = sorted({int(j) for f in have.values()
                     for j in ui_data.feature_influence(f, top_n, trait_label)["feature"]})
if not candidates and not features.empty:  # no attributions yet: the most active features
    candidates = [int(j) for j in features.nlargest(top_n, "max_act")["feature"]]
if query and not features.empty:
    hits = features[features["label"].str.contains(query, case=False, regex=False, na=False)]
    candidates = [int(j) for j in hits["feature"]][:200]
    d1.caption(f"{len(hits)} features match.")
if not candidates:
    st.caption("No feature matches.")
    st.stop()
feature = d2.selectbox("Feature", candidates, format_func=feature_name, key="sae:feature")
detail = ui_data.feature_detail({ui_data.method_label(m): f for m, f in have.items()}, feature)
info = features[features["feature"] == feature]
m1, m2, m3 = st.columns(3)
if not info.empty:
    m1.metric("Density (share of tokens firing)", f"{info['density'].iloc[0]:.1%}")
    m2.metric("Mean activation", f"{info['mean_act'].iloc[0]:.3g}")
    m3.metric("Max activation", f"{info['max_act'].iloc[0]:.3g}")
if not detail.empty:
    ranks = detail.drop_duplicates("method")
    st.caption(" · ".join(f"{r.method}: rank {r.rank} of {r.n_features}"
                          for r in ranks.itertuples()))
    fig = go.Figure()
    for grp in labels:
        part = detail[detail["grp"] == grp]
        fig.add_bar(x=part["method"], y=part["influence"], name=f"from {grp} data",
                    marker_color=colors[grp])
    fig.update_layout(barmode="relative", title=f"Influence through {feature_name(feature)}")
    fig.update_yaxes(title="F_j (a.u.)")
    sh.chart(sh.style_fig(fig, 300), key="sae:detail")
examples = sh.read("feature_examples", sae["sae_id"], dataset_id, feature)
if examples.empty:
    st.caption("No top-activating examples stored for this feature.")
else:
    st.markdown("**Training examples where the feature fires most**")
    st.dataframe(examples[["rank", "max_act", "data_origin", "prompt", "response"]],
                 hide_index=True, column_config={
                     "max_act": st.column_config.NumberColumn("max activation", format="%.3g"),
                     "response": st.column_config.TextColumn("response", width="large")})
