"""SAE features (Figure 4): which SAE features carry a trait's influence, under IF and under CI."""
import json
import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cinf_core import inspection
from cinf_core.methods import registry
from cinf_core.store import Store
from cinf_core.views.concepts import token_highlight_html
from cinf_core.views.features import (FEATURE_DEFINITION, feature_choices, feature_detail,
                                      feature_hits, feature_trait_share, sae_direction_choices,
                                      top_feature_bars)
from cinf_core.views.labels import guess_trait_label, label_colors
from pages import _rank
from pages import _shared as sh

# The paper's layout: the methods without a concept (the influence function) first, beside the
# concept-based ones.
FIG4_METHODS = sorted(registry.figure4_keys(), key=lambda k: registry.get_method(k).needs_concept)
HIGHLIGHT_EXAMPLES = 5  # top examples highlighted token by token (one forward pass each)

sh.header("SAE features", "Figure 4: the SAE features through which the training data drives "
          "the trait — Influence Function beside Concept Influence.")
with st.expander("How feature influence is defined", expanded=False):
    st.latex(FEATURE_DEFINITION)
    st.markdown("Groups *g* are the `data_origin` labels (trait data vs normal data); features "
                "are ranked by the total Σ_g F_j^g. **The paper's exact procedure is not public; "
                "this is our definition.**")

store = sh.store()
if store is None:
    sh.no_store_state()
    st.stop()
saes = sh.read(Store.saes)
runs = sh.runs_view()
if saes.empty:
    sh.waiting_state("No SAE in this workspace.",
                     "build the demo world on **Overview** (it trains an SAE at the concept "
                     "layer), or register an sae-lens folder on **Concepts** "
                     "(`python -m cinf_core add-sae`).", ("demo", "add-sae"))
    st.stop()

c1, c2, c3 = st.columns(3)
# Figure 4 needs scoring runs; the feature search, the feature detail (with its ranking over the
# gradient index) and the top-activating examples need only the SAE and its feature data, so a
# trait with test queries but no run (yet) is offered too.
trait, dataset_id, scope = sh.pick_scope(runs, "sae", container=c1, unscored=True)
sae_name = c2.selectbox("SAE", list(saes["name"]), key="sae:sae")
sae = saes[saes["name"] == sae_name].iloc[-1]
top_n = c3.slider("Top features", 5, 30, 10, key="sae:top")

by_method = {}
for method in FIG4_METHODS:
    row = scope[scope["method"] == method]
    if not row.empty:
        by_method[method] = sh.read(Store.feature_attributions, row.iloc[0]["run_id"],
                                    sae["sae_id"])
have = {m: f for m, f in by_method.items() if not f.empty}


def attributions_stored() -> tuple:
    """What the page waits for while a job runs: more runs, or attributions of these runs."""
    return sh.n_complete_runs(), *(
        len(sh.read(Store.feature_attributions, run_id, sae["sae_id"]))
        for run_id in scope[scope["method"].isin(FIG4_METHODS)]["run_id"])
features = sh.read(Store.sae_features, sae["sae_id"], dataset_id)
names = dict(zip(features["feature"], features["label"])) if not features.empty else {}
labels = sorted({g for f in have.values() for g in f["grp"].unique()})
trait_label = trait if trait in labels else guess_trait_label(labels)
colors = label_colors(labels, trait_label)


def feature_name(j: int) -> str:
    label = names.get(j)
    return f"#{j} · {label[:28]}" if isinstance(label, str) and label else f"#{j}"


@st.cache_data(show_spinner="Running the model on the phrase…", max_entries=64)
def _phrase_features(ws: str, sae_id: str, text: str, k: int):
    """The phrase's tokens, its top features ``[(feature, activation)]`` and their per-token
    activations ``[n_tokens][k]`` (model forward to the SAE's layer, then the SAE)."""
    return inspection.phrase_features(ws, sae_id, text, k)


@st.cache_data(show_spinner="Comparing decoder rows with the concept…", max_entries=64)
def _direction_features(ws: str, sae_id: str, concept_id: str, k: int):
    return inspection.sae_features_near_concept(ws, sae_id, concept_id, k)


@st.cache_data(show_spinner="Highlighting the activating tokens…", max_entries=64)
def _example_tokens(ws: str, sae_id: str, feature: int, messages: tuple[str, ...]):
    """Each example's response tokens and the feature's activation on each."""
    return inspection.feature_tokens(ws, sae_id, feature, [json.loads(m) for m in messages])


def figure4() -> None:
    """IF beside CI: the top features by influence, each bar split by data group."""
    cols = st.columns(len(FIG4_METHODS))
    for col, method in zip(cols, FIG4_METHODS):
        with col:
            st.markdown(f"**{registry.method_label(method)}**")
            if method not in have:
                sh.empty_state(f"No {registry.method_label(method)} attributions for this trait.",
                               f"score with `{registry.score_flags(method)}`, then run "
                               "`python -m cinf_core features`.")
                continue
            top = top_feature_bars(have[method], top_n, trait_label)
            order = [feature_name(j) for j in top.drop_duplicates("feature")["feature"]]
            fig = go.Figure()
            for grp in labels:
                part = top[top["grp"] == grp]
                fig.add_bar(y=[feature_name(j) for j in part["feature"]], x=part["influence"],
                            name=f"from {grp} data", orientation="h", marker_color=colors[grp])
            fig.update_layout(barmode="relative", title=f"Top {top_n} features — "
                              f"{registry.method_short(method)}")
            fig.update_yaxes(categoryorder="array", categoryarray=order[::-1], title=None)
            fig.update_xaxes(title="feature influence F_j (score × activation, a.u.)")
            sh.chart(sh.style_fig(fig, 120 + 28 * top_n), key=f"sae:bars:{method}")
            share = feature_trait_share(top, trait_label)
            if not math.isnan(share):
                st.metric(f"Share from `{trait_label}` data (top {top_n})", f"{share:.0%}",
                          help="Σ_j F_j^trait / Σ_j Σ_g |F_j^g| over the top features: groups can "
                               "push a feature either way, so the denominator counts both (the "
                               "share `python -m cinf_core features` reports).")


if have:
    figure4()
    sh.method_explainer(FIG4_METHODS)
elif scope.empty:
    waiting = sh.waiting_state(
        f"No complete scoring runs{f' for {trait!r}' if trait else ''} yet: Figure 4 needs them.",
        "score the training set with `influence_function` and `concept_influence` on **Runs & "
        "cost**, then attribute them to features. Finding features, their top-activating "
        "examples and ranking the training data by a feature (below) need no run.",
        sh.SCORING_JOBS, sh.n_complete_runs)
    if features.empty:
        if waiting is None and dataset_id is not None:
            sh.empty_state(f"No feature data for {sae_name} yet.",
                           "compute its feature labels, densities and top-activating examples "
                           f"over the training set: `python -m cinf_core features --sae "
                           f"{sae_name}`, or start it here.")
            sh.job_launcher("sae:featuredata", "Compute the SAE's feature data", "features",
                            {"sae": sae_name, "dataset": dataset_id})
        elif waiting is None:
            sh.empty_state("This workspace has no training dataset.",
                           "register one (`python -m cinf_core add-dataset FILE`), or build the "
                           "demo world on **Overview**.")
        st.stop()
else:
    missing = [registry.method_label(m) for m in FIG4_METHODS if m not in by_method]
    waiting = sh.waiting_state(
        f"No feature attributions for '{trait}' with this SAE yet."
        + (f" Missing runs: {', '.join(missing)}." if missing else ""),
        "score the trait with `influence_function` and `concept_influence`, then compute the "
        f"SAE feature data and attributions: `python -m cinf_core features --sae {sae_name} "
        f"--trait {trait}`, or start it here.", sh.FEATURE_JOBS, attributions_stored)
    if waiting is None:
        sh.job_launcher("sae:features", "Compute feature data and attributions", "features",
                        {"sae": sae_name, "trait": trait})
    if features.empty:
        st.stop()

found: list[int] = []  # features the searches below turn up (offered in the feature detail)
st.subheader("Find features")
# Lazy tabs: the model and the SAE load only when a search runs.
tab_text, tab_dir = st.tabs(["By phrase", "By concept direction"], key="sae:find",
                            on_change="rerun")
if tab_text.open:
    with tab_text:
        phrase = st.text_input("Which features fire on this phrase?", key="sae:phrase",
                               max_chars=500, placeholder="e.g. I will make you suffer",
                               help="Read as an assistant response: the model the SAE was "
                                    f"trained on runs up to layer {sae['layer']}, then the SAE "
                                    "encodes every token; features are ranked by their largest "
                                    "activation on the phrase.")
        if phrase.strip():
            try:
                tokens, hits, token_acts = _phrase_features(sh.workspace(), sae["sae_id"],
                                                            phrase, top_n)
            except Exception as err:  # noqa: BLE001 — a missing model or SAE is shown, not raised
                st.warning(f"Phrase search is unavailable: {err}")
            else:
                if not hits:
                    st.caption("No feature fires on this phrase.")
                else:
                    found += [j for j, _ in hits]
                    table = feature_hits(
                        pd.DataFrame(hits, columns=["feature", "activation"]), features)
                    st.dataframe(table, hide_index=True, column_config={
                        "activation": st.column_config.NumberColumn("max activation",
                                                                    format="%.3g"),
                        "density": st.column_config.NumberColumn("density", format="percent"),
                        "label": st.column_config.TextColumn("label (top tokens)",
                                                             width="large")})
                    ids = [j for j, _ in hits]
                    chosen = st.selectbox("Highlight the phrase by feature", ids,
                                          format_func=feature_name, key="sae:phrase:feature")
                    col = ids.index(chosen)
                    st.html(token_highlight_html(tokens, [row[col] for row in token_acts]))
                    st.caption(f"Activation of {feature_name(chosen)} on each token of the "
                               "phrase (darker = stronger). Hover a token for its value.")
if tab_dir.open:
    with tab_dir:
        choices = sae_direction_choices(sh.read(Store.concepts), int(sae["layer"]))
        if choices.empty:
            sh.empty_state(f"No direction concept at layer {sae['layer']} to compare with.",
                           "build a persona vector or a probe on **Concepts**, or upload a "
                           "vector for this layer.")
        else:
            text = dict(zip(choices["concept_id"], choices["choice"]))
            concept_id = st.selectbox("Concept direction", list(choices["concept_id"]),
                                      format_func=text.get, key="sae:dir",
                                      help="Features ranked by the cosine of their decoder row "
                                           "with the concept's vector at the SAE's layer.")
            try:
                near = _direction_features(sh.workspace(), sae["sae_id"], concept_id, top_n)
            except Exception as err:  # noqa: BLE001 — a missing SAE or bad vector is shown
                st.warning(f"Direction search is unavailable: {err}")
            else:
                found += [int(j) for j in near["feature"]]
                st.dataframe(feature_hits(near, features), hide_index=True,
                             column_config={
                                 "cosine": st.column_config.NumberColumn("cosine", format="%.3f"),
                                 "density": st.column_config.NumberColumn("density",
                                                                          format="percent"),
                                 "label": st.column_config.TextColumn("label (top tokens)",
                                                                      width="large")})
                st.caption("The SAE features behind the trait: cosine of each feature's decoder "
                           "row (its direction in the residual stream) with the concept vector.")

st.subheader("Feature detail")
d1, d2 = st.columns(2)
query = d1.text_input("Search feature labels (top tokens)", key="sae:q", placeholder="e.g. pain")
candidates, n_matching = feature_choices(have, features, top_n, trait_label, found, query)
if n_matching is not None:
    d1.caption(f"{n_matching} features match.")
if not candidates:
    st.caption("No feature matches.")
    st.stop()
feature = d2.selectbox("Feature", candidates, format_func=feature_name, key="sae:feature")
detail = feature_detail({registry.method_label(m): f for m, f in have.items()}, feature)
info = features[features["feature"] == feature]
m1, m2, m3 = st.columns(3)
if not info.empty:
    m1.metric("Density (share of tokens firing)", f"{info['density'].iloc[0]:.1%}")
    m2.metric("Mean activation", f"{info['mean_act'].iloc[0]:.3g}")
    m3.metric("Max activation", f"{info['max_act'].iloc[0]:.3g}")
st.markdown(f"**Rank the training data by {feature_name(feature)}**: its Concept Influence "
            f"(f_c = the feature's pre-activation on the test queries of '{trait or '…'}') over "
            "every training example, from the gradient index.")
if trait is None:
    sh.empty_state("Ranking by a feature needs test queries for a trait.",
                   "register them (`python -m cinf_core add-queries`, or on **Concepts**), or "
                   "build the demo world on **Overview**.")
elif _rank.index_ready("sae", dataset_id) and not sh.read_only():
    ranked = _rank.rank_button(
        f"sae:one:{sae['sae_id']}:{int(feature)}:{trait}",
        f"Rank the training data by {feature_name(feature)}", trait, dataset_id,
        lambda: _rank.index_runs.sae_feature_concepts(sh.workspace(), sae["name"], [int(feature)]),
        help="Saves the feature as a concept (once), then one backward pass on the test queries "
             "and one matrix product with the gradient index.")
    if ranked:
        st.success(_rank.elapsed_line(ranked), icon=":material/timer:")
        _rank.show_ranking(ranked, ranked["runs"][0])
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
examples = sh.read(Store.feature_examples, sae["sae_id"], dataset_id, feature)
if examples.empty:
    st.caption("No top-activating examples stored for this feature.")
else:
    st.markdown("**Training examples where the feature fires most**")
    st.dataframe(examples[["rank", "max_act", "data_origin", "prompt", "response"]],
                 hide_index=True, column_config={
                     "max_act": st.column_config.NumberColumn("max activation", format="%.3g"),
                     "response": st.column_config.TextColumn("response", width="large")})
    shown = examples.head(HIGHLIGHT_EXAMPLES)
    if st.toggle(f"Highlight the activating tokens of the top {len(shown)} examples",
                 key="sae:ex:hl", help="One forward pass per example: the model the SAE was "
                                       "trained on, up to the SAE's layer, then the SAE."):
        try:
            per_example = _example_tokens(sh.workspace(), sae["sae_id"], int(feature),
                                          tuple(shown["messages"]))
        except Exception as err:  # noqa: BLE001 — any model or SAE problem is shown, not raised
            st.warning(f"Token highlighting is unavailable: {err}")
        else:
            scale = float(info["max_act"].iloc[0]) if not info.empty else None
            for row, (tokens, values) in zip(shown.itertuples(), per_example):
                st.markdown(f"**#{row.rank}** · max activation `{row.max_act:.3g}` · "
                            f"label `{row.data_origin}` · example #{row.idx}")
                st.html(token_highlight_html(tokens, values, scale=scale))
            st.caption(f"Response tokens coloured by the activation of {feature_name(feature)} "
                       "(full colour = its largest activation on the dataset). Hover a token "
                       "for its value.")

st.subheader("Figure 4 for any features: Concept Influence per feature")
st.caption("For each chosen feature j, Concept Influence with f_c = feature j's pre-activation on "
           f"the test queries of '{trait}', summed over the training examples of each data group: "
           "which data pushes each feature up. All features in one query over the gradient index "
           "(one backward pass each, one matrix product).")
if trait is None:
    st.caption("Needs test queries for a trait (see above).")
elif _rank.index_ready("sae:fig4", dataset_id, offer=False) and not sh.read_only():
    n_features = int(features["feature"].max()) + 1 if not features.empty else 0
    chosen = st.multiselect("Features", list(range(n_features)), default=candidates[:6],
                            format_func=feature_name, key="sae:fig4:features", max_selections=40)
    if chosen:
        result = _rank.rank_button(
            f"sae:fig4:{sae['sae_id']}:{trait}:{','.join(map(str, sorted(chosen)))}",
            f"Compute Concept Influence for {len(chosen)} feature(s)", trait, dataset_id,
            lambda: _rank.index_runs.sae_feature_concepts(sh.workspace(), sae["name"],
                                                          sorted(int(j) for j in chosen)))
        if result:
            st.success(_rank.elapsed_line(result), icon=":material/timer:")
            names = {r["concept_id"]: feature_name(j) for r, j in
                     zip(result["runs"], sorted(int(j) for j in chosen))}
            _rank.feature_influence_chart(result, names, key="sae:fig4:chart")
