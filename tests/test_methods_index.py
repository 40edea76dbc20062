"""The gradient index: exact at full size, unbiased below it, resumable, refusing what it cannot
answer, and its queries stored as ordinary Concept Influence runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cinf_core.concepts import DirectionConcept, SAEFeatureConcept
from cinf_core.curvature import CurvatureConfig, fit_factors
from cinf_core.methods import index as ix
from cinf_core.methods.gradient import concept_influence
from gradient_world import make_world


@pytest.fixture(scope="module")
def world():
    return make_world(n_train=12, n_queries=3, hidden=16, layers=3)


@pytest.fixture(scope="module")
def factors(world):
    return fit_factors(world.lm, world.train, CurvatureConfig(batch_size=4))


def _concepts(d_model: int) -> list:
    gen = torch.Generator().manual_seed(3)
    sae = SAEFeatureConcept(name="sae", layer=3, feature=0, w_enc=torch.randn(d_model, generator=gen),
                            b_enc=0.3, w_dec=torch.randn(d_model, generator=gen),
                            b_dec=torch.randn(d_model, generator=gen))
    return [DirectionConcept(name="v1", layer=1, vector=torch.randn(d_model, generator=gen)),
            DirectionConcept(name="v2", layer=2, vector=torch.randn(d_model, generator=gen)), sae]


def _spec(**kw) -> ix.IndexSpec:
    base = dict(model_id="tiny", weights=None, dataset_id="train", max_length=None,
                curvature=CurvatureConfig(batch_size=4).to_dict(), below_layer=None)
    return ix.IndexSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def exact(world, factors):
    return concept_influence(world.lm, world.train, world.queries, factors, _concepts(16),
                             batch_size=4)


@pytest.mark.parametrize("whiten", [True, False])
def test_index_is_exact_at_full_size(world, factors, exact, tmp_path, whiten):
    """With the dimension at the modules' full size the projection is the identity (after the
    rotation and whitening, which cancel exactly): the index's scores are the unprojected ones."""
    largest = max(max(f.shape) for f in factors.modules.values())  # 33: 32 inputs + the bias
    index = ix.build_index(world.lm, world.train, factors,
                           _spec(dim=largest, dtype="float32", whiten=whiten),
                           tmp_path / "ix", batch_size=4)
    assert index.complete and index.n_done() == len(world.train)
    assert all(s.exact for s in index.slots.values())
    got = ix.query_index(index, world.lm, factors, _concepts(16), world.queries, batch_size=4)
    assert got.shape == exact.shape
    assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max()
    # the rows are the whole per-example gradient, rotated and scaled: sizes add up
    assert index.width == sum(o * i for o, i in (f.shape for f in factors.modules.values()))


def _synthetic_factors(out: int = 12, inp: int = 10, seed: int = 0):
    """EK-FAC factors of one Linear with random eigenbases and a spread of eigenvalues."""
    from cinf_core.curvature import EKFACFactors, ModuleFactors

    gen = torch.Generator().manual_seed(seed)
    q_s = torch.linalg.qr(torch.randn(out, out, generator=gen, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(inp, inp, generator=gen, dtype=torch.float64))[0]
    eig = torch.rand(out, inp, generator=gen, dtype=torch.float64) ** 4 * 10
    return EKFACFactors(config=CurvatureConfig(), modules={"m": ModuleFactors(
        eigvecs_a=q_a.float(), eigvecs_s=q_s.float(), eigvals=eig.float())})


def test_projected_scores_are_unbiased():
    """Below full size each seed's projection gives another estimate of ``<Pre, G_i>``; over many
    seeds their mean agrees with the exact value (an unbiased estimator), the training side
    projected token by token and the query side as a whole matrix."""
    from cinf_core.curvature import precondition

    factors = _synthetic_factors()
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5, 7, 10, generator=gen, dtype=torch.float64)   # 5 examples x 7 tokens
    g = torch.randn(5, 7, 12, generator=gen, dtype=torch.float64)
    grads = torch.einsum("bto,bti->boi", g, a)
    query = torch.randn(2, 12, 10, generator=gen, dtype=torch.float64)
    pre = precondition(factors, {"m": query})["m"]
    exact = torch.einsum("koi,boi->bk", pre, grads).numpy()
    estimates = []
    for seed in range(300):
        slots, proj = ix.make_projections(factors, _spec(dim=4, seed=seed))
        (slot,) = slots
        assert (slot.k_out, slot.k_in) == (4, 4)
        t_out, t_in = proj["m::t_out"].double(), proj["m::t_in"].double()
        u_out, u_in = proj["m::u_out"].double(), proj["m::u_in"].double()
        z = torch.einsum("bto,bti->boi", g @ t_out.T, a @ t_in.T)  # as the build: token by token
        w = u_out @ pre @ u_in.T                                      # as the query
        estimates.append(torch.einsum("boi,koi->bk", z, w).numpy())
    estimates = np.stack(estimates)
    assert np.abs(estimates - exact).mean() > 0.05 * np.abs(exact).max()  # really projected
    # the mean over seeds is within a few standard errors of the exact value, entry by entry
    z = (estimates.mean(0) - exact) / (estimates.std(0) / np.sqrt(len(estimates)))
    assert np.abs(z).max() < 4.5, z


def test_killed_build_resumes(world, factors, tmp_path, monkeypatch):
    """A build that dies mid-chunk keeps the finished chunks; the rerun computes only the rest and
    ends with the same matrix as an uninterrupted build."""
    monkeypatch.setattr(ix, "CHUNK", 4)
    spec = _spec(dim=4)
    clean = ix.build_index(world.lm, world.train, factors, spec, tmp_path / "clean", batch_size=2)
    reference = np.array(clean.matrix())

    calls = {"n": 0, "examples": 0}
    real = ix.response_losses

    def dying(model, batch, *a, **kw):
        calls["n"] += 1
        calls["examples"] += batch["input_ids"].shape[0]
        if calls["n"] == 4:  # second batch of the second chunk: mid-chunk
            raise KeyboardInterrupt
        return real(model, batch, *a, **kw)

    monkeypatch.setattr(ix, "response_losses", dying)
    with pytest.raises(KeyboardInterrupt):
        ix.build_index(world.lm, world.train, factors, spec, tmp_path / "ix", batch_size=2)
    partial = ix.open_index(tmp_path / "ix")
    assert not partial.complete and partial.n_done() == 4
    with pytest.raises(ValueError, match="not complete"):
        ix.query_index(partial, world.lm, factors, _concepts(16)[:1], world.queries)
    calls.update(n=-100, examples=0)  # no more deaths
    resumed = ix.build_index(world.lm, world.train, factors, spec, tmp_path / "ix", batch_size=2)
    assert resumed.complete and calls["examples"] == len(world.train) - 4
    np.testing.assert_array_equal(np.array(resumed.matrix()), reference)
    # another spec in the same folder starts over instead of mixing rows
    other = ix.build_index(world.lm, world.train, factors, _spec(dim=3),
                           tmp_path / "ix", batch_size=2)
    assert other.complete and other.key != resumed.key


def test_refuses_what_it_cannot_answer(world, tmp_path):
    """An index tracking blocks below layer 1 cannot answer a concept at layer 2, and an index
    answers queries about its own model only."""
    low = fit_factors(world.lm, world.train, CurvatureConfig(batch_size=4), below_layer=1)
    index = ix.build_index(world.lm, world.train, low, _spec(dim=4, below_layer=1),
                           tmp_path / "low", batch_size=4)
    concepts = _concepts(16)
    ok = ix.query_index(index, world.lm, low, concepts[:1], world.queries, model_id="tiny")
    assert ok.shape == (len(world.train), 1)
    with pytest.raises(ValueError, match="concept 'v2' is at layer 2, above the modules the "
                                         "gradient index tracks .blocks below layer 1."):
        ix.query_index(index, world.lm, low, concepts[1:2], world.queries)
    with pytest.raises(ValueError, match="built for model tiny, not other-model"):
        ix.query_index(index, world.lm, low, concepts[:1], world.queries, model_id="other-model")


def test_spec_checks():
    with pytest.raises(ValueError, match="whole number >= 1"):
        _spec(dim=0)
    with pytest.raises(ValueError, match="dtype 'int8' is not valid"):
        _spec(dtype="int8")
    assert _spec(dim=8).key != _spec(dim=9).key
    assert _spec(curvature={"batch_size": 1}).key == _spec(curvature={"batch_size": 2}).key
    assert json.loads(json.dumps(ix.run_option(8)))["dim"] == 8
