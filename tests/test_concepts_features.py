"""SAE feature data over a dataset and the Figure 4 attribution, checked by direct computation."""
import numpy as np
import pytest
import torch

from cinf_core.concepts.features import (attribute_run_to_features, compute_feature_data,
                                         feature_influence, load_feature_matrix, trait_share)
from cinf_core.concepts.sae import feature_activations, load_sae, train_sae
from cinf_core.data import ChatDataset, ChatExample, encode_example
from cinf_core.models import ModelSpec, hidden_states_at
from cinf_core.store import Store
from conftest import SMALL_TEXTS, chat

LAYER = 2


def test_feature_influence_matches_definition():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(30)
    groups = np.array(["evil", "normal", "sycophantic"] * 10)
    acts = torch.rand(30, 8)
    table = feature_influence(scores, groups, acts, k=3)
    for _, row in table.iterrows():
        j = int(row["feature"])
        for g in ("evil", "normal", "sycophantic"):
            manual = sum(scores[i] * float(acts[i, j]) for i in range(30) if groups[i] == g)
            assert row[g] == pytest.approx(manual)
    full = feature_influence(scores, groups, acts, k=8)
    assert table["total"].tolist() == sorted(full["total"], reverse=True)[:3]
    share = trait_share(table, "evil")
    groups = table[["evil", "normal", "sycophantic"]].to_numpy()
    assert share == pytest.approx(table["evil"].sum() / np.abs(groups).sum())
    assert -1 <= share <= 1
    with pytest.raises(ValueError, match="same dataset"):
        feature_influence(scores[:5], groups[:5], acts)


@pytest.fixture(scope="module")
def feature_ws(tmp_path_factory, tiny_model_dir, tiny_lm):
    ws = tmp_path_factory.mktemp("fws")
    store = Store(ws)
    msgs = [chat(f"q{i}", SMALL_TEXTS[i % 6]) for i in range(18)]
    labels = ["evil" if i % 6 == 1 else "normal" for i in range(18)]
    did = store.add_dataset("ft", ChatDataset([ChatExample(m, {"data_origin": l})
                                               for m, l in zip(msgs, labels)]), role="train")
    mid = store.add_model("tiny", ModelSpec(path=str(tiny_model_dir)), role="finetuned")
    acts = []
    for m in msgs:
        enc = encode_example(tiny_lm.tokenizer, m)
        ids = torch.tensor([enc.input_ids])
        h = hidden_states_at(tiny_lm.model, ids, torch.ones_like(ids), [LAYER])[LAYER][0]
        acts.append(h[torch.tensor(enc.response_mask, dtype=torch.bool)].detach())
    sae_dir = ws / "sae"
    train_sae(torch.cat(acts).repeat(20, 1), d_sae=24, hook_layer=LAYER, k=4, training_tokens=4096,
              batch_size=128, out_dir=sae_dir)
    store.add_sae("tiny-sae", sae_dir, LAYER, mid)
    return ws, did, msgs


def test_feature_data_equals_direct(feature_ws, tiny_lm):
    ws, did, msgs = feature_ws
    summary = compute_feature_data(ws, tiny_lm, "tiny-sae", dataset="ft", batch_size=5)
    store = Store(ws)
    sae = load_sae(store.get_sae("tiny-sae")["path"])
    a = load_feature_matrix(ws, summary["sae_id"], did)
    assert a.shape == (18, 24)
    # direct: one example at a time
    enc = encode_example(tiny_lm.tokenizer, msgs[4])
    ids = torch.tensor([enc.input_ids])
    h = hidden_states_at(tiny_lm.model, ids, torch.ones_like(ids), [LAYER])[LAYER][0].detach()
    direct = feature_activations(sae, h[torch.tensor(enc.response_mask, dtype=torch.bool)])
    torch.testing.assert_close(a[4], direct.mean(0), atol=1e-5, rtol=1e-4)
    feats = store.sae_features(summary["sae_id"], did)
    assert len(feats) == 24 and feats["density"].between(0, 1).all()
    live = feats[feats["max_act"] > 0]
    assert (live["label"] != "(inactive)").all()
    top = store.feature_examples(summary["sae_id"], did, int(live["feature"].iloc[0]))
    assert top["max_act"].is_monotonic_decreasing and len(top) >= 1


def test_run_attribution_stored(feature_ws, tiny_lm):
    ws, did, _ = feature_ws
    store = Store(ws)
    compute_feature_data(ws, tiny_lm, "tiny-sae", dataset="ft")
    run = store.begin_run("random", did, None, {"trait": "evil"}, 18)
    run.add_scores(list(range(18)), list(np.linspace(-1, 1, 18)))
    run.complete(0.1)
    top = attribute_run_to_features(ws, run.run_id, "tiny-sae", k=5)
    assert len(top) == 5 and set(top.columns) >= {"feature", "total", "evil", "normal"}
    stored = store.feature_attributions(run.run_id, store.get_sae("tiny-sae")["sae_id"])
    assert len(stored) == 24 * 2
    f0 = int(top["feature"].iloc[0])
    assert stored[stored.feature == f0]["influence"].sum() == pytest.approx(top["total"].iloc[0])


def test_top_example_highlighting_peaks_at_the_stored_max(feature_ws, tiny_lm):
    """Per-token activations of a feature's top examples (computed on demand for the page) peak
    at the max activation stored at feature-data time."""
    import json

    from cinf_core.concepts.features import load_registered_sae
    from cinf_core.concepts.sae import feature_token_activations

    ws, did, _ = feature_ws
    summary = compute_feature_data(ws, tiny_lm, "tiny-sae", dataset="ft", batch_size=5)
    store = Store(ws)
    sae, layer = load_registered_sae(ws, "tiny-sae")
    assert layer == LAYER
    feats = store.sae_features(summary["sae_id"], did)
    checked = 0
    for j in feats.nlargest(3, "max_act")["feature"]:
        top = store.feature_examples(summary["sae_id"], did, int(j))
        chats = [json.loads(m) for m in top["messages"]]
        per_example = feature_token_activations(tiny_lm, sae, chats, int(j), layer=layer)
        for (tokens, values), stored in zip(per_example, top["max_act"]):
            assert len(tokens) == len(values) > 0
            assert max(values) == pytest.approx(stored, rel=1e-4, abs=1e-5)
            checked += 1
    assert checked >= 3


def test_features_by_concept_reads_directions_through_the_store(feature_ws):
    from cinf_core.concepts import DirectionConcept
    from cinf_core.concepts.features import (concept_direction_at, features_by_concept,
                                             load_registered_sae, sae_model_spec)
    from cinf_core.concepts.sae import features_by_direction

    ws, _, _ = feature_ws
    store = Store(ws)
    sae, layer = load_registered_sae(ws, "tiny-sae")
    assert sae_model_spec(ws, "tiny-sae") == store.get_model("tiny")["spec"]
    w_dec = sae.W_dec.detach()
    gen = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(w_dec[7], dim=0)
    vec = 2.0 * unit + 0.05 * torch.randn(w_dec.shape[1], generator=gen)
    store.save_concept(DirectionConcept(name="dir-at-layer", layer=LAYER, kind="probe",
                                        vector=vec), None)
    near = features_by_concept(ws, sae, "dir-at-layer", k=5)
    assert list(near.columns) == ["feature", "cosine"] and len(near) == 5
    assert int(near["feature"].iloc[0]) == 7 and near["cosine"].iloc[0] > 0.95
    assert near["cosine"].is_monotonic_decreasing
    direct = features_by_direction(sae, vec, k=5)
    assert near["feature"].tolist() == [j for j, _ in direct]
    assert near["cosine"].tolist() == pytest.approx([c for _, c in direct])
    # A persona vector built at another layer is read at the SAE's layer from all_layers.
    all_layers = torch.randn(4, w_dec.shape[1], generator=gen)
    all_layers[LAYER] = w_dec[3]
    store.save_concept(DirectionConcept(name="persona-L1", layer=1, kind="persona_vector",
                                        vector=all_layers[1].clone()), None,
                       extra_tensors={"all_layers": all_layers})
    torch.testing.assert_close(concept_direction_at(ws, "persona-L1", LAYER), all_layers[LAYER])
    assert int(features_by_concept(ws, sae, "persona-L1", k=1)["feature"].iloc[0]) == 3
    store.save_concept(DirectionConcept(name="probe-L1", layer=1, kind="probe",
                                        vector=all_layers[1].clone() + 1.0), None)
    with pytest.raises(ValueError, match="not at layer 2"):
        features_by_concept(ws, sae, "probe-L1")
    store.save_concept(DirectionConcept(name="too-wide", layer=LAYER, kind="probe",
                                        vector=torch.ones(w_dec.shape[1] + 1)), None)
    with pytest.raises(ValueError, match="hidden size"):
        features_by_concept(ws, sae, "too-wide")
