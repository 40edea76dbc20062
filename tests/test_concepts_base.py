"""Concept records: every kind round-trips through ``to_record``/``from_record``; unknown kinds
are refused on construction and on load."""
import json

import pytest
import torch

from cinf_core.concepts.base import (CONCEPT_KINDS, Concept, DirectionConcept, SAEFeatureConcept,
                                     register_concept_kind)

D = 8


def _direction(kind: str) -> DirectionConcept:
    return DirectionConcept(name=f"c-{kind}", layer=2, kind=kind, vector=torch.randn(D),
                            info={"trait": "evil"})


def _sae_feature() -> SAEFeatureConcept:
    return SAEFeatureConcept(name="f3", layer=1, feature=3, w_enc=torch.randn(D), b_enc=0.25,
                             w_dec=torch.randn(D), b_dec=torch.randn(D), info={"sae": "s"})


def _reload(concept: Concept) -> Concept:
    """Through the record and JSON, as the store keeps it."""
    config, tensors = concept.to_record()
    config = json.loads(json.dumps(config, default=str))
    return Concept.from_record(concept.name, concept.kind, concept.layer, config,
                               {k: v.clone() for k, v in tensors.items()})


@pytest.mark.parametrize("kind", ["direction", "persona_vector", "probe", "uploaded"])
def test_direction_kinds_round_trip(kind):
    concept = _direction(kind)
    back = _reload(concept)
    assert type(back) is DirectionConcept and back.kind == kind and back.layer == 2
    assert back.concept_id == concept.concept_id and back.info == {"trait": "evil"}
    torch.testing.assert_close(back.vector, concept.vector)


def test_sae_feature_round_trips_and_measures_the_same():
    concept = _sae_feature()
    config, tensors = concept.to_record()
    assert list(config) == ["name", "kind", "layer", "digest", "info", "feature", "b_enc"]
    assert sorted(tensors) == ["b_dec", "w_dec", "w_enc"]
    back = _reload(concept)
    assert type(back) is SAEFeatureConcept and back.feature == 3 and back.b_enc == 0.25
    assert back.concept_id == concept.concept_id
    h, mask = torch.randn(2, 5, D), torch.ones(2, 5)
    torch.testing.assert_close(back.measure(h, mask), concept.measure(h, mask))


def test_every_kind_in_the_registry_is_covered():
    assert set(CONCEPT_KINDS) == {"direction", "persona_vector", "probe", "uploaded", "sae_feature"}


def test_unknown_kind_is_refused_on_load_and_on_construction():
    config, tensors = _direction("probe").to_record()
    with pytest.raises(ValueError, match=r"kind 'steering'.*known kinds: direction, persona_vector"):
        Concept.from_record("c", "steering", 2, config, tensors)
    with pytest.raises(ValueError, match="has kind 'steering'"):
        DirectionConcept(name="c", layer=2, kind="steering", vector=torch.randn(D))
    with pytest.raises(ValueError, match="has kind 'probe'"):  # a kind of another class
        SAEFeatureConcept(name="f", layer=1, kind="probe", w_enc=torch.randn(D),
                          w_dec=torch.randn(D), b_dec=torch.randn(D))


def test_a_record_missing_a_tensor_names_it():
    config, _ = _direction("probe").to_record()
    with pytest.raises(ValueError, match="no tensor 'vector'"):
        Concept.from_record("c", "probe", 2, config, {"all_layers": torch.randn(3, D)})


def test_registering_a_kind_twice_or_without_from_record_is_refused():
    with pytest.raises(ValueError, match="already DirectionConcept's"):
        register_concept_kind("probe")(SAEFeatureConcept)

    class NoRecord(DirectionConcept):
        pass

    with pytest.raises(TypeError, match="must define from_record"):
        register_concept_kind("no_record")(NoRecord)
    assert "no_record" not in CONCEPT_KINDS
