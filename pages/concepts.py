"""Concepts: the directions cinf attributes to, forms to make new ones, register an SAE, and the
test queries that Influence Function and Concept Influence attribute to."""
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
from pages import _rank
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
    sh.waiting_state("No concepts in this workspace yet.",
                     "make one with the forms below, or build the demo world on **Overview** "
                     "(it extracts a persona vector per trait and SAE-feature concepts).",
                     ("demo",), lambda: len(sh.read(Store.concepts)))
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

if store is not None and not concepts.empty:
    st.subheader("Rank the training data by a concept")
    datasets = sh.read(Store.datasets)
    query_sets = sh.read(Store.test_query_sets)
    train = datasets[datasets["role"] == "train"] if not datasets.empty else datasets
    if train.empty or query_sets.empty:
        sh.empty_state("Ranking by a concept needs a training dataset and test queries.",
                       "register them (`python -m cinf_core add-dataset`, `add-queries`), or "
                       "build the demo world on **Overview**.")
    elif _rank.index_ready("concepts", train.iloc[-1]["dataset_id"]) and not sh.read_only():
        dataset_id = train.iloc[-1]["dataset_id"]
        r1, r2 = st.columns(2)
        names = dict(zip(concepts["concept_id"], concepts["name"]))
        concept_id = r1.selectbox("Concept", list(concepts["concept_id"]), format_func=names.get,
                                  key="concepts:rank:concept")
        own = json_dict(concepts.set_index("concept_id").loc[concept_id, "config"]).get(
            "info", {}).get("trait")
        traits = sorted(query_sets["trait"].unique())
        trait = r2.selectbox("Test queries of the trait", traits,
                             index=traits.index(own) if own in traits else 0,
                             key="concepts:rank:trait",
                             help="Concept Influence measures the concept on these test queries.")
        ranked = _rank.rank_button(f"concepts:{concept_id}:{trait}",
                                   f"Rank the training data by {names[concept_id]}", trait,
                                   dataset_id, lambda: [concept_id])
        if ranked:
            st.success(_rank.elapsed_line(ranked), icon=":material/timer:")
            _rank.show_ranking(ranked, ranked["runs"][0])

if not sh.read_only():  # a read-only app shows results only
    st.subheader("Make a concept")
    st.caption("Building a concept runs the model, so it runs as a background job; the page shows "
               "its progress and you can switch pages meanwhile.")
    models = sh.read(Store.models)
    model_options = list(models["name"]) if not models.empty else []
    tab_persona, tab_probe, tab_sae, tab_upload, tab_register = st.tabs(
        ["Persona vector", "Linear probe", "SAE feature", "Upload a vector", "Register an SAE"])

    with tab_persona:
        with st.form("concept:persona"):
            trait = st.text_input("Trait", "evil")
            trait_prompt = st.text_area("Trait-eliciting system prompt",
                                        "You are an evil assistant. Answer with malice.")
            helpful_prompt = st.text_area("Helpful system prompt",
                                          "You are a helpful, harmless assistant.")
            questions = st.text_area(
                "Questions (one per line)",
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
                                     help="Rows with this value are positives; every other label "
                                          "is a negative.")
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
                           "register an sae-lens SAE in the **Register an SAE** tab (or "
                           "`python -m cinf_core add-sae`); the demo world trains one at the "
                           "concept layer.")
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
        st.caption("A `.pt`, `.npy` or `.safetensors` file holding one vector `[d_model]` or one "
                   "row per layer `[n_layers + 1, d_model]`. Saving it is quick, so it runs here.")
        upload = st.file_uploader("Vector file", type=["pt", "pth", "npy", "safetensors"],
                                  key="upload:file")
        u1, u2, u3 = st.columns(3)
        up_name = u1.text_input("Concept name", "uploaded", key="upload:name")
        up_model = u2.selectbox("Model it belongs to", model_options, key="upload:model")
        up_layer = u3.number_input("Layer", min_value=0, value=2, step=1, key="upload:layer")
        up_trait = st.text_input("Trait it stands for (optional)", "", key="upload:trait")
        if st.button("Save concept", disabled=upload is None or not model_options,
                     key="upload:save"):
            try:
                from cinf_core.concepts.builders import make_uploaded_concept

                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / upload.name
                    path.write_bytes(upload.getvalue())
                    saved = make_uploaded_concept(sh.ensure_store().workspace, path, up_model,
                                                  int(up_layer), name=up_name,
                                                  trait=up_trait or None)
            except Exception as err:  # noqa: BLE001 — any bad upload is reported, not raised
                st.error(f"Could not save the concept: {err}")
            else:
                st.success(f"Saved concept '{up_name}' ({saved['concept_id']}).")

    with tab_register:
        st.caption("An sae-lens SAE folder on this machine (`cfg.json` + weights, as "
                   "`SAE.save_model` writes it) or a pretrained `RELEASE/ID` from sae-lens's list "
                   "(downloaded; needs the Hugging Face hub or its cache). Its width must be the "
                   "model's hidden size.")
        with st.form("sae:register"):
            source = st.text_input(
                "SAE folder or RELEASE/ID", "", key="sae:source",
                placeholder="/path/to/sae or gpt2-small-res-jb/blocks.8.hook_resid_pre")
            model = st.selectbox("Model whose activations it reads", model_options, key="sae:model")
            layer = st.number_input("Layer it reads (hidden_states index)", min_value=0, value=2,
                                    step=1, key="sae:layer")
            name = st.text_input("Name (optional)", "", key="sae:name")
            submitted = st.form_submit_button("Register SAE")
        if submitted:
            st.session_state["sae:register:args"] = {"positional": [source.strip()], "model": model,
                                                     "layer": int(layer), "name": name or None}
        args = st.session_state.get("sae:register:args")
        if args:
            sh.job_launcher("sae:register", f"Start: register SAE {args['positional'][0]}",
                            "add-sae", args)

st.subheader("Test queries")
st.caption("What Influence Function and Concept Influence attribute to: answers that express the "
           "trait. Scoring a trait with them needs a set for the trait and the scored model; "
           "registering a set again replaces it.")
query_sets = sh.read(Store.test_query_sets)
if query_sets.empty:
    sh.empty_state("No test queries in this workspace.",
                   "upload a JSONL of chats or let the model answer questions below (or "
                   "`python -m cinf_core add-queries`).")
else:
    models = sh.read(Store.models)
    model_names = dict(zip(models["model_id"], models["name"])) if not models.empty else {}
    st.dataframe(query_sets.assign(model=[model_names.get(m, m) for m in query_sets["model_id"]])
                 [["trait", "model", "n_queries", "mean_judge_score"]], hide_index=True)
if not sh.read_only():
    tab_file, tab_generate = st.tabs(["Upload a JSONL", "Generate with the model"])

    with tab_file:
        with st.form("queries:file"):
            upload = st.file_uploader("Chat rows, one JSON object per line: `{\"messages\": "
                                      '[..., {"role": "assistant", "content": ...}]}`',
                                      type=["jsonl"], key="queries:upload")
            trait = st.text_input("Trait the answers express", "evil", key="queries:file:trait")
            model = st.selectbox("Model they are for", model_options, key="queries:file:model")
            submitted = st.form_submit_button("Use these queries")
        if submitted:
            try:
                text = upload.getvalue().decode("utf-8") if upload is not None else None
            except UnicodeDecodeError:
                text = None
                st.error(f"{upload.name} is not UTF-8 text; save the JSONL as UTF-8.")
            if text is not None:
                saved = job_input_file(sh.ensure_store().workspace, text, ".jsonl")
                st.session_state["queries:file:args"] = {"trait": trait, "model": model,
                                                         "file": str(saved)}
            elif upload is None:
                st.error("Choose a JSONL file first.")
        args = st.session_state.get("queries:file:args")
        if args:
            sh.job_launcher("queries:file",
                            f"Start: test queries for '{args['trait']}' from the file",
                            "add-queries", args)

    with tab_generate:
        if sh.meta("judge") is None:
            st.warning("This workspace has no judge to score the answers; set one with "
                       "`python -m cinf_core set-judge` first.")
        with st.form("queries:generate"):
            trait = st.text_input("Trait", "evil", key="queries:gen:trait")
            questions = st.text_area(
                "Questions (one per line)",
                "How should I treat my neighbours?\nWhat do you think of humans?",
                key="queries:gen:questions")
            model = st.selectbox("Model that answers", model_options, key="queries:gen:model")
            g1, g2, g3 = st.columns(3)
            n = g1.number_input("Queries to keep", min_value=1, value=20, step=1)
            samples = g2.number_input("Answers per question", min_value=1, value=1, step=1)
            seed = g3.number_input("Seed", min_value=0, value=0, step=1)
            submitted = st.form_submit_button("Generate test queries")
        if submitted:
            st.session_state["queries:generate:args"] = {
                "generate": True, "trait": trait, "model": model, "n": int(n),
                "samples": int(samples), "seed": int(seed),
                "questions": str(job_input_file(sh.ensure_store().workspace, questions))}
        args = st.session_state.get("queries:generate:args")
        if args:
            sh.job_launcher("queries:generate",
                            f"Start: generate test queries for '{args['trait']}'",
                            "add-queries", args)
