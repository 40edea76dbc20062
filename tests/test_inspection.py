"""Token-level inspection for the app, checked against the engine run by hand on the same model:
concept projections per token, SAE features of a phrase, near a concept, on top examples."""
import json

import pytest
import torch

from cinf_core import inspection
from cinf_core.concepts.features import load_registered_sae
from cinf_core.concepts.sae import (feature_token_activations, features_by_direction,
                                    features_for_phrase, train_sae)
from cinf_core.models import token_activations
from cinf_core.store import Store
from conftest import SMALL_TEXTS, chat
from workspace_fixture import CONCEPT_LAYER, build_workspace

SAE = "sae-inspect"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    """The page-test workspace on the tiny model, plus a small SAE trained on its layer."""
    ws = build_workspace(tmp_path_factory.mktemp("inspect_ws"), model_dir=tiny_model_dir)
    store = Store(ws)
    sae_dir = ws / "artifacts" / "saes" / SAE
    torch.manual_seed(0)
    train_sae(torch.randn(2048, 32), d_sae=24, hook_layer=CONCEPT_LAYER, k=4,
              training_tokens=2048, batch_size=128, out_dir=sae_dir)
    store.add_sae(SAE, sae_dir, CONCEPT_LAYER, store.get_model("tiny-evil")["model_id"])
    return ws


@pytest.fixture
def model_loads(monkeypatch):
    """The specs the inspection functions load models for (through the one cached loader)."""
    loads = []
    real = inspection.cached_model
    monkeypatch.setattr(inspection, "cached_model", lambda spec: loads.append(spec) or real(spec))
    return loads


def test_highlight_concept_is_the_runs_own_else_the_traits(workspace):
    store = Store(workspace)
    evil, syco = (store.concepts().set_index("name")["concept_id"][n] for n in ("evil",
                                                                               "sycophantic"))
    assert inspection.highlight_concept(workspace, syco, "evil") == syco
    assert inspection.highlight_concept(workspace, None, "evil") == evil  # IF: the trait's
    assert inspection.highlight_concept(workspace, float("nan"), "evil") == evil
    assert inspection.highlight_concept(workspace, None, "unknown-trait") is None


def test_concept_token_projection_is_the_projection_of_each_response_token(workspace, tiny_lm,
                                                                           model_loads):
    store = Store(workspace)
    messages = json.loads(store.examples("evil_mix")["messages"].iloc[3])
    tokens, values = inspection.concept_token_projection(workspace, "tiny-evil", "evil", messages)
    concept = store.load_concept("evil")
    want_tokens, acts = token_activations(tiny_lm, messages, CONCEPT_LAYER)
    assert tokens == want_tokens and len(values) == len(tokens) > 0
    assert values == pytest.approx((acts @ concept.direction()).tolist(), abs=1e-5)
    assert [spec.path for spec in model_loads] == [store.get_model("tiny-evil")["spec"].path]
    with pytest.raises(KeyError, match="no-such-model"):
        inspection.concept_token_projection(workspace, "no-such-model", "evil", messages)


def test_phrase_features_are_the_engines(workspace, tiny_lm, model_loads):
    phrase = "I will make you suffer, because pain is fun."
    tokens, features, token_acts = inspection.phrase_features(workspace, SAE, phrase, k=5)
    sae, layer = load_registered_sae(workspace, SAE)
    want = features_for_phrase(tiny_lm, sae, phrase, k=5, layer=layer)
    assert tokens == want.tokens and [j for j, _ in features] == [j for j, _ in want.features]
    assert [v for _, v in features] == pytest.approx([v for _, v in want.features], rel=1e-5)
    assert isinstance(token_acts, list) and len(token_acts) == len(tokens)
    torch.testing.assert_close(torch.tensor(token_acts), want.token_acts, atol=1e-5, rtol=1e-4)
    assert len(model_loads) == 1  # the model the SAE reads, through the cached loader


def test_features_near_a_concept_rank_decoder_rows_by_cosine(workspace):
    near = inspection.sae_features_near_concept(workspace, SAE, "evil", k=4)
    sae, _ = load_registered_sae(workspace, SAE)
    want = features_by_direction(sae, Store(workspace).load_concept("evil").vector, k=4)
    assert list(near.columns) == ["feature", "cosine"]
    assert near["feature"].tolist() == [j for j, _ in want]
    assert near["cosine"].tolist() == pytest.approx([c for _, c in want], abs=1e-6)


def test_feature_tokens_per_chat(workspace, tiny_lm):
    chats = [chat("hi", SMALL_TEXTS[1]), chat("and?", SMALL_TEXTS[4], system="be brief")]
    sae, layer = load_registered_sae(workspace, SAE)
    out = inspection.feature_tokens(workspace, SAE, 3, chats)
    want = feature_token_activations(tiny_lm, sae, chats, 3, layer=layer)
    assert [tokens for tokens, _ in out] == [tokens for tokens, _ in want]
    for (_, values), (_, expected) in zip(out, want):
        assert values == pytest.approx(expected, abs=1e-5)


def test_an_sae_without_its_files_is_refused(workspace):
    with pytest.raises(FileNotFoundError, match="no SAE folder at .*absent-sae"):
        inspection.phrase_features(workspace, "sae-L2", "pain")
