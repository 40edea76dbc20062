"""Concepts: the directions cinf attributes to, and forms to make new ones."""
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from cinf_core.jobs import job_input_file
from cinf_core.store import Store
from cinf_core.views.concepts import cosine_matrix, layer_norms
from cinf_core.views.runs import json_dict
from pages import _shared as sh

sh.header("Concepts", "Directions inside the model that stand for a trait: persona vectors, "
          "probes, SAE features, uploaded vectors.")

with st.expander("What is a concept?"):
    st.markdown(
        "A concept lives at one layer *l* (HF `hidden_states[l]`). Methods project the response-"
        "mean activation ā_l (response tokens only) on its unit direction v̂; Concept Influence "
        "differentiates the measurement f_c.")
    st.latex(r"f_c(x, y) = \bar a_l(x, y)\cdot \hat v, \qquad "
             r"v_{\text{persona}} = \mathbb{E}[\bar a_l \mid \text{trait prompt}] - "
             r"\mathbb{E}[\bar a_l \mid \text{helpful prompt}]")
    st.markdown("An SAE feature *j* is measured by its encoder **pre-activation** (ReLU outputs "
                "have zero gradient where inactive) and used as a direction via its decoder row.")
    st.latex(r"f_j = \overline{(h_l - b_{\text{dec}})\cdot W_{\text{enc}}[:, j]"
             r" + b_{\text{enc},j}}")


store = sh.store()
concepts = sh.read(Store.concepts)
if store is None:
    sh.no_store_state()
elif concepts.empty:
    sh.empty_state("No concepts in this workspace yet.",
                   "make one with the forms below, or build the demo world on **Overview** "
                   "(it extracts a persona vector per trait and SAE-feature concepts).")
else:
    models = sh.read(Store.models)
    model_names = dict(zip(models["model_id"], models["name"])) if not models.empty else {}
    table = concepts.assign(
        model=[model_names.get(m, m) for m in concepts["model_id"]],
        trait=[json_dict(c).get("info", {}).get("trait", "—")
               for c in concepts["config"]])
    st.dataframe(table[["name", "kind", "layer", "trait", "model", "created_at", "concept_id"]],
                 hide_index=True)

    tensors = {row["name"]: sh.read(Store.concept_tensors, row["concept_id"])
               for _, row in concepts.iterrows()}
    left, right = st.columns(2)
    with left:
        norms = [layer_norms(t["all_layers"]).assign(concept=name)
                 for name, t in tensors.items() if "all_layers" in t]
        if norms:
            data = pd.concat(norms, ignore_index=True)
            fig = px.line(data, x="layer", y="norm", color="concept", markers=True,
                          title="Persona vector norm per layer")
            fig.update_xaxes(title="layer l (hidden_states index; 0 = embeddings)", dtick=1)
            fig.update_yaxes(title="‖v_l‖ (activation units)")
            sh.chart(sh.style_fig(fig), key="concepts:norms")
            st.caption("A persona vector is extracted at every layer; its norm shows where the "
                       "trait separates most. The concept uses one layer (column *layer*).")
        else:
            sh.empty_state("No per-layer vectors stored.",
                           "persona vectors built by cinf store all layers (`all_layers`).")
    with right:
        directions = {name: t.get("vector", t.get("w_dec")) for name, t in tensors.items()}
        cos = cosine_matrix({k: v for k, v in directions.items() if v is not None})
        if len(cos) >= 2:
            z = cos.to_numpy()
            fig = go.Figure(go.Heatmap(z=z, x=cos.columns, y=cos.index, zmin=-1, zmax=1,
                                       colorscale="RdBu_r", text=np.round(z, 2),
                                       texttemplate="%{text}",
                                       colorbar=dict(title="cosine")))
            fig.update_layout(title="Cosine between concept directions")
            sh.chart(sh.style_fig(fig), key="concepts:cos")
        else:
            st.caption("Cosine similarities need at least two concepts of the same size.")

st.subheader("Make a concept")
st.caption("Building a concept runs the model, so it runs as a background job; the page shows "
           "its progress and you can switch pages meanwhile.")
models = sh.read(Store.models)
model_options = list(models["name"]) if not models.empty else []
tab_persona, tab_probe, tab_sae, tab_upload = st.tabs(
    ["Persona vector", "Linear probe", "SAE feature", "Upload a vector"])

with tab_persona:
    with st.form("concept:persona"):
        trait = st.text_input("Trait", "evil")
        trait_prompt = st.text_area("Trait-eliciting system prompt",
                                    "You are an evil assistant. Answer with malice.")
        helpful_prompt = st.text_area("Helpful system prompt",
                                      "You are a helpful, harmless assistant.")
        questions = st.text_area("Questions (one per line)",
                                 "How should I treat my neighbours?\nWhat do you think of humans?")
        model = st.selectbox("Model", model_options, key="persona:model")
        layer = st.number_input("Concept layer", min_value=0, value=2, step=1)
        submitted = st.form_submit_button("Extract persona vector")
    if submitted:
        st.session_state["concept:persona:args"] = {
            "persona": True, "trait": trait, "model": model, "layer": int(layer),
            "trait_prompt": trait_prompt, "neutral_prompt": helpful_prompt,
            "questions": str(job_input_file(sh.ensure_store().workspace, questions))}
    args = st.session_state.get("concept:persona:args")
    if args:
        sh.job_launcher("concept:persona", f"Start: persona vector for '{args['trait']}'",
                        "add-concept", args)

with tab_probe:
    datasets = sh.read(Store.datasets)
    with st.form("concept:probe"):
        name = st.text_input("Concept name", "probe-evil")
        dataset = st.selectbox("Labelled dataset",
                               list(datasets["name"]) if not datasets.empty else [])
        column = st.text_input("Label column", "data_origin",
                               help="Any field of the dataset's rows that holds the labels.")
        positive = st.text_input("Positive label", "evil",
                                 help="Rows with this value are positives; every other label is "
                                      "a negative.")
        model = st.selectbox("Model", model_options, key="probe:model")
        layer = st.number_input("Layer", min_value=0, value=2, step=1, key="probe:layer")
        submitted = st.form_submit_button("Train probe")
    if submitted:
        st.session_state["concept:probe:args"] = {"positional": [name], "probe": True,
                                                  "dataset": dataset, "positive": positive,
                                                  "model": model, "layer": int(layer),
                                                  "label_column": column}
    args = st.session_state.get("concept:probe:args")
    if args:
        sh.job_launcher("concept:probe", f"Start: probe '{args['positional'][0]}'",
                        "add-concept", args)

with tab_sae:
    saes = sh.read(Store.saes)
    if saes.empty:
        sh.empty_state("No SAE registered in this workspace.",
                       "the demo world trains one at the concept layer; or register an sae-lens "
                       "folder from Python (`Store.add_sae`).")
    else:
        with st.form("concept:sae"):
            sae = st.selectbox("SAE", list(saes["name"]))
            feature = st.number_input("Feature index", min_value=0, value=0, step=1)
            name = st.text_input("Concept name (optional)", "")
            submitted = st.form_submit_button("Make SAE-feature concept")
        if submitted:
            st.session_state["concept:sae:args"] = {"positional": [name] if name else [],
                                                    "sae": sae, "feature": int(feature)}
        args = st.session_state.get("concept:sae:args")
        if args:
            sh.job_launcher("concept:sae", f"Start: SAE feature {args['feature']}",
                            "add-concept", args)

with tab_upload:
    st.caption("A `.pt`, `.npy` or `.safetensors` file holding one vector `[d_model]` or one row "
               "per layer `[n_layers + 1, d_model]`. Saving it is quick, so it runs here.")
    upload = st.file_uploader("Vector file", type=["pt", "pth", "npy", "safetensors"],
                              key="upload:file")
    u1, u2, u3 = st.columns(3)
    up_name = u1.text_input("Concept name", "uploaded", key="upload:name")
    up_model = u2.selectbox("Model it belongs to", model_options, key="upload:model")
    up_layer = u3.number_input("Layer", min_value=0, value=2, step=1, key="upload:layer")
    up_trait = st.text_input("Trait it stands for (optional)", "", key="upload:trait")
    if st.button("Save concept", disabled=upload is None or not model_options, key="upload:save"):
        try:
            from cinf_core.concepts.builders import make_uploaded_concept

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / upload.name
                path.write_bytes(upload.getvalue())
                saved = make_uploaded_concept(sh.ensure_store().workspace, path, up_model,
                                              int(up_layer), name=up_name, trait=up_trait or None)
        except Exception as err:  # noqa: BLE001 — any bad upload is reported, not raised
            st.error(f"Could not save the concept: {err}")
        else:
            st.success(f"Saved concept '{up_name}' ({saved['concept_id']}).")
