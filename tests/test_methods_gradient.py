"""Influence Function, Concept Influence and gradient similarity: exact arithmetic against direct
autograd, batch-size invariance, sign by retraining, clear errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cinf_core.concepts import DirectionConcept, SAEFeatureConcept
from cinf_core.curvature import CurvatureConfig, fit_factors, precondition, select_modules
from cinf_core.curvature.lm import response_losses
from cinf_core.data import collate
from cinf_core.methods.gradient import (
    concept_influence,
    grad_sim,
    influence_function,
    prepare_concept_influence,
    train_scores,
)
from cinf_core.models import hidden_states_at, response_mean
from gradient_world import make_world


@pytest.fixture(scope="module")
def world():
    return make_world(n_train=12, n_queries=3, hidden=16, layers=3)


@pytest.fixture(scope="module")
def factors(world):
    return fit_factors(world.lm, world.train, CurvatureConfig(batch_size=4))


def _concepts(d_model: int, seed: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    sae = SAEFeatureConcept(name="sae", layer=3, feature=0, w_enc=torch.randn(d_model, generator=gen),
                            b_enc=0.3, w_dec=torch.randn(d_model, generator=gen),
                            b_dec=torch.randn(d_model, generator=gen))
    return [DirectionConcept(name="v1", layer=1, vector=torch.randn(d_model, generator=gen)),
            DirectionConcept(name="v2", layer=2, vector=torch.randn(d_model, generator=gen)), sae]


# ---------------------------------------------------------------- direct autograd reference


def _param_grads(lm, modules, scalar):
    """``{name: [out, in(+1)]}`` gradient of ``scalar`` by autograd on the parameters."""
    params = [p for m in modules.values() for p in ([m.weight] + ([m.bias] if m.bias is not None else []))]
    gs = iter(torch.autograd.grad(scalar, params, allow_unused=True))
    out = {}
    for name, m in modules.items():
        gw = next(gs)
        gw = torch.zeros_like(m.weight) if gw is None else gw
        if m.bias is not None:
            gb = next(gs)
            gw = torch.cat([gw, (torch.zeros_like(m.bias) if gb is None else gb).unsqueeze(-1)], dim=-1)
        out[name] = gw.double()
    return out


def _dot(a, b):
    return sum(float((a[n] * b[n]).sum()) for n in a)


def _train_grads(lm, modules, train):
    return [_param_grads(lm, modules, response_losses(lm.model, collate([ex], lm.pad_token_id)).sum())
            for ex in train]


def test_influence_function_equals_direct_computation(world, factors):
    lm = world.lm
    modules = factors.tracked_modules(lm.model)
    q_batch = collate(world.queries, lm.pad_token_id)
    g_test = _param_grads(lm, modules, response_losses(lm.model, q_batch).mean())
    pre = precondition(factors, {n: g.unsqueeze(0) for n, g in g_test.items()})
    expected = np.array([_dot({n: p[0] for n, p in pre.items()}, g) for g in _train_grads(lm, modules, world.train)])
    got = influence_function(lm, world.train, world.queries, factors, batch_size=5)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


def test_concept_influence_equals_direct_computation(world, factors):
    """CI for three concepts in one pass == -<(H+lambda)^-1 grad f_c, grad L(z_i)> per concept."""
    lm = world.lm
    concepts = _concepts(lm.hidden_size)
    got = concept_influence(lm, world.train, world.queries, factors, concepts, batch_size=5)
    assert got.shape == (len(world.train), 3)
    batch = collate(world.queries, lm.pad_token_id)
    for k, c in enumerate(concepts):
        modules = {n: m for n, m in factors.tracked_modules(lm.model).items() if int(n.split(".")[2]) < c.layer}
        hidden = hidden_states_at(lm.model, batch["input_ids"], batch["attention_mask"], [c.layer])[c.layer]
        g_f = _param_grads(lm, modules, c.measure(hidden, batch["response_mask"]).mean())
        pre = precondition(factors, {n: g.unsqueeze(0) for n, g in g_f.items()})
        expected = np.array([-_dot({n: p[0] for n, p in pre.items()}, g)
                             for g in _train_grads(lm, modules, world.train)])
        np.testing.assert_allclose(got[:, k], expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
        single = concept_influence(lm, world.train, world.queries, factors, c)
        np.testing.assert_allclose(single, got[:, k], rtol=1e-9)


def test_concept_influence_over_the_answer_start_equals_direct_computation(world, factors):
    """``window=k``: f_c averaged over positions r0-1 .. r0+k-2 of each query (r0 its first response
    token), built here from the collated batch by index arithmetic, not by answer_start_window."""
    lm = world.lm
    concept = _concepts(lm.hidden_size)[1]
    batch = collate(world.queries, lm.pad_token_id)
    modules = {n: m for n, m in factors.tracked_modules(lm.model).items() if int(n.split(".")[2]) < concept.layer}
    for k in (1, 3):
        hidden = hidden_states_at(lm.model, batch["input_ids"], batch["attention_mask"], [concept.layer])[concept.layer]
        mask = torch.zeros_like(batch["response_mask"])
        for q in range(mask.shape[0]):
            r0 = int(batch["response_mask"][q].nonzero()[0])
            mask[q, r0 - 1: r0 - 1 + k] = 1
        g_f = _param_grads(lm, modules, concept.measure(hidden, mask).mean())
        pre = precondition(factors, {n: g.unsqueeze(0) for n, g in g_f.items()})
        expected = np.array([-_dot({n: p[0] for n, p in pre.items()}, g)
                             for g in _train_grads(lm, modules, world.train)])
        got = concept_influence(lm, world.train, world.queries, factors, concept, batch_size=5, window=k)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    whole = concept_influence(lm, world.train, world.queries, factors, concept)
    assert not np.allclose(whole, got)  # the window is a different behaviour
    with pytest.raises(ValueError, match="whole number of tokens >= 1, got 0"):
        concept_influence(lm, world.train, world.queries, factors, concept, window=0)


def test_grad_sim_equals_direct_computation(world):
    lm = world.lm
    cfg = CurvatureConfig(kinds="mlp", block_start=1)
    modules = select_modules(lm.model, cfg)
    g_test = _param_grads(lm, modules, response_losses(lm.model, collate(world.queries, lm.pad_token_id)).mean())
    expected = np.array([_dot(g_test, g) for g in _train_grads(lm, modules, world.train)])
    np.testing.assert_allclose(grad_sim(lm, world.train, world.queries, cfg), expected, rtol=1e-6)


# ---------------------------------------------------------------- batching, subsets, progress


def test_batch_size_does_not_change_scores(world, factors):
    lm, concepts = world.lm, _concepts(world.lm.hidden_size)
    for method in (
        lambda bs: influence_function(lm, world.train, world.queries, factors, batch_size=bs),
        lambda bs: influence_function(lm, world.train, world.queries, factors, batch_size=bs, per_query=True),
        lambda bs: concept_influence(lm, world.train, world.queries, factors, concepts, batch_size=bs),
        lambda bs: grad_sim(lm, world.train, world.queries, CurvatureConfig(), batch_size=bs),
    ):
        one, eight = method(1), method(8)
        np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-5 * np.abs(one).max())


def test_several_behaviours_score_the_same_in_blocks_and_token_by_token(world, factors, monkeypatch):
    """K > 1 behaviours: each example's gradient is formed a block of output rows at a time; any
    block size gives the scores of one behaviour at a time, which are contracted token by token
    without forming the gradient."""
    from cinf_core.methods import gradient

    blocks = influence_function(world.lm, world.train, world.queries, factors, batch_size=8, per_query=True)
    monkeypatch.setattr(gradient, "PRODUCT_CHUNK_BYTES", 1)  # one output row at a time
    rows = influence_function(world.lm, world.train, world.queries, factors, batch_size=8, per_query=True)
    np.testing.assert_allclose(rows, blocks, rtol=1e-9, atol=1e-9 * np.abs(blocks).max())
    for q in range(2):  # one query: K = 1, the token form
        alone = influence_function(world.lm, world.train, world.queries[q:q + 1], factors, batch_size=8)
        np.testing.assert_allclose(blocks[:, q], alone, rtol=1e-9, atol=1e-9 * np.abs(alone).max())


def test_per_query_columns_average_to_the_aggregate(world, factors):
    per_query = influence_function(world.lm, world.train, world.queries, factors, per_query=True)
    assert per_query.shape == (len(world.train), len(world.queries))
    mean = influence_function(world.lm, world.train, world.queries, factors)
    np.testing.assert_allclose(per_query.mean(axis=1), mean, rtol=1e-6)


def test_subset_indices_and_progress(world, factors):
    full = influence_function(world.lm, world.train, world.queries, factors)
    seen = []
    part = influence_function(world.lm, world.train, world.queries, factors, indices=[7, 2, 11],
                              batch_size=2, progress=seen.append)
    np.testing.assert_allclose(part, full[[7, 2, 11]], rtol=1e-6)
    assert seen == [2, 1]


def test_prepared_gradients_score_in_chunks(world, factors):
    """Precondition once, then stream chunks of training examples (how a stored run resumes)."""
    concepts = _concepts(world.lm.hidden_size)
    prepared = prepare_concept_influence(world.lm, world.queries, factors, concepts)
    assert prepared.columns == ["v1", "v2", "sae"]
    chunks = [train_scores(world.lm, prepared, world.train, indices=list(range(s, min(s + 5, 12))))
              for s in range(0, 12, 5)]
    whole = concept_influence(world.lm, world.train, world.queries, factors, concepts)
    np.testing.assert_allclose(np.concatenate(chunks), whole, rtol=1e-9)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21 on transformers 5
def test_lora_adapter_scores(world):
    """lora_only factors on a peft model: scores are finite and CI matches direct autograd."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(world.lm.model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    lm = copy.copy(world.lm)
    lm.model = model
    f = fit_factors(lm, world.train, CurvatureConfig(lora_only=True, batch_size=4))
    assert all(".lora_" in n for n in f.modules)
    concept = _concepts(lm.hidden_size)[1]
    got = concept_influence(lm, world.train, world.queries, f, concept)
    batch = collate(world.queries, lm.pad_token_id)
    modules = {n: m for n, m in f.tracked_modules(model).items() if ".layers.0." in n or ".layers.1." in n}
    hidden = hidden_states_at(model, batch["input_ids"], batch["attention_mask"], [2])[2]
    pre = precondition(f, {n: g.unsqueeze(0) for n, g in
                           _param_grads(lm, modules, concept.measure(hidden, batch["response_mask"]).mean()).items()})
    expected = np.array([-_dot({n: p[0] for n, p in pre.items()}, g) for g in _train_grads(lm, modules, world.train)])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


# ---------------------------------------------------------------- sign by retraining


def _retrain(model, train_batch, weights, below_layer, lr, steps):
    """``steps`` of full-batch SGD on ``sum_j weights_j L(z_j)`` over the tracked Linears only."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in select_modules(model, CurvatureConfig(), below_layer=below_layer).values()
              for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (response_losses(model, train_batch) * weights).sum().backward()
        opt.step()
    return model


@pytest.mark.slow
def test_sign_matches_retraining():
    """Upweight each of the 5 highest and 5 lowest scored examples (weight 1/N -> 1/N + 1e-3), run a
    few SGD steps from the fine-tuned model, compare the behaviour with the same run without the
    upweighting: it must move in the predicted direction for >= 8 of 10, for IF (B = -test loss)
    and CI (B = trait direction measured on the queries). float64, so the tiny upweighting stays
    in the linear regime and above round-off."""
    world = make_world(n_train=16, n_queries=4, hidden=16, layers=3, trait_every=3)
    lm, n, layer = world.lm, len(world.train), 2
    train_batch = collate(world.train, lm.pad_token_id)
    query_batch = collate(world.queries, lm.pad_token_id)
    opt = torch.optim.Adam(lm.model.parameters(), lr=1e-2)  # the "fine-tuning" the scores explain
    for _ in range(100):
        opt.zero_grad()
        response_losses(lm.model, train_batch).mean().backward()
        opt.step()
    trait = torch.tensor([i % 3 == 0 for i in range(n)])
    with torch.no_grad():
        hidden = hidden_states_at(lm.model, train_batch["input_ids"], train_batch["attention_mask"], [layer])[layer]
        acts = response_mean(hidden, train_batch["response_mask"])
    concept = DirectionConcept(name="trait", layer=layer, vector=acts[trait].mean(0) - acts[~trait].mean(0))
    cfg = CurvatureConfig(damping=1.0)
    scores = {
        "IF": influence_function(lm, world.train, world.queries, fit_factors(lm, world.train, cfg)),
        "CI": concept_influence(lm, world.train, world.queries,
                                fit_factors(lm, world.train, cfg, below_layer=layer), concept),
    }

    @torch.no_grad()
    def behaviour(kind, model):
        if kind == "IF":
            return -float(response_losses(model, query_batch).mean())
        h = hidden_states_at(model, query_batch["input_ids"], query_batch["attention_mask"], [layer])[layer]
        return float(concept.measure(h, query_batch["response_mask"]).mean())

    for kind, below in (("IF", None), ("CI", layer)):
        weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
        base = behaviour(kind, _retrain(lm.model, train_batch, weights, below, lr=5e-3, steps=30))
        order = np.argsort(scores[kind])
        agree = 0
        for i in list(order[-5:]) + list(order[:5]):
            up = weights.clone()
            up[i] += 1e-3
            moved = behaviour(kind, _retrain(lm.model, train_batch, up, below, lr=5e-3, steps=30)) - base
            agree += int(np.sign(moved) == np.sign(scores[kind][i]))
        assert agree >= 8, (kind, agree)


def test_grad_sim_pass_does_the_same_work_as_influence_function(world, factors):
    """Gradient similarity's training pass is Influence Function's with the raw test gradient in
    place of the preconditioned one: the same modules, rows and dtype (so never more work), and
    each pass reports its time split."""
    from cinf_core.methods.gradient import prepare_grad_sim, prepare_influence_function

    lm = world.lm
    gs = prepare_grad_sim(lm, world.queries, factors.config)
    inf = prepare_influence_function(lm, world.queries, factors)
    assert list(gs.modules) == list(inf.modules) and gs.columns == inf.columns == ["test_loss"]
    for name in gs.queries:
        assert gs.queries[name].shape == inf.queries[name].shape
        assert gs.queries[name].dtype == inf.queries[name].dtype
    timings = {}
    train_scores(lm, gs, world.train, batch_size=5, timings=timings)
    assert 0 < timings["products_s"] < timings["pass_s"]


def test_sampled_labels_are_drawn_once_and_reused(world):
    """The fit's second pass reuses each example's sampled labels: the same draw as a fresh one
    (same seed, same logits), so the cache changes no factor."""
    from cinf_core.curvature.ekfac import lm_loss_fn

    lm = world.lm
    cfg = CurvatureConfig(fisher="sampled", seed=3)
    batch = collate(world.train[:4], lm.pad_token_id)
    cache = {}
    first = response_losses(lm.model, batch, sample_seeds=[10, 11, 12, 13], sample_cache=cache)
    assert sorted(cache) == [10, 11, 12, 13]
    fresh = response_losses(lm.model, batch, sample_seeds=[10, 11, 12, 13])
    again = response_losses(lm.model, batch, sample_seeds=[10, 11, 12, 13], sample_cache=cache)
    assert torch.equal(first, fresh) and torch.equal(first, again)
    loss = lm_loss_fn(cfg)
    with torch.no_grad():
        a = loss(lm.model, batch, [0, 1, 2, 3])
        b = loss(lm.model, collate(world.train[2:4], lm.pad_token_id), [2, 3])  # rebatched
    torch.testing.assert_close(a[2:], b, rtol=1e-5, atol=1e-6)


def test_output_layer_on_response_positions_only_gives_the_same_losses(world):
    """response_losses applies the output layer to response positions only once the model passed
    check_response_head: the same per-example losses as the model's own forward; a model that
    scales its logits after the output layer keeps its own forward."""
    from types import SimpleNamespace

    from cinf_core.curvature import lm as lm_mod

    model = copy.deepcopy(world.lm.model)
    batch = collate(world.train[:5], world.lm.pad_token_id)
    slow = response_losses(model, batch)  # not checked yet: the model's own forward
    assert lm_mod.check_response_head(model, batch) and lm_mod._HEAD_OK[model]
    fast = response_losses(model, batch)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)

    class Scaled(torch.nn.Module):  # logits x 2 after the output layer (as a softcap would change them)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_decoder(self):
            return self.inner.get_decoder()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kwargs):
            return SimpleNamespace(logits=2 * self.inner(**kwargs).logits)

    scaled = Scaled(model)
    assert not lm_mod.check_response_head(scaled, batch)
    with torch.no_grad():
        logits = 2 * model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    direct = torch.stack([
        sum(torch.nn.functional.cross_entropy(logits[b, t], batch["labels"][b, t + 1], reduction="sum")
            for t in range(logits.shape[1] - 1) if batch["labels"][b, t + 1] != -100)
        for b in range(logits.shape[0])])
    with torch.no_grad():
        torch.testing.assert_close(response_losses(scaled, batch), direct, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(world, factors):
    lm = world.lm
    d = lm.hidden_size
    with pytest.raises(ValueError, match=r"hidden size is 16"):
        concept_influence(lm, world.train, world.queries, factors, DirectionConcept(name="short", layer=1,
                                                                                  vector=torch.randn(d - 3)))
    with pytest.raises(ValueError, match="out of range"):
        concept_influence(lm, world.train, world.queries, factors, DirectionConcept(name="hi", layer=9,
                                                                                  vector=torch.randn(d)))
    with pytest.raises(ValueError, match="layer 0"):
        concept_influence(lm, world.train, world.queries, factors, DirectionConcept(name="emb", layer=0,
                                                                                  vector=torch.randn(d)))
    with pytest.raises(ValueError, match="NaN"):
        DirectionConcept(name="nan", layer=1, vector=torch.full((d,), float("nan")))
    poisoned = DirectionConcept(name="nan", layer=1, vector=torch.randn(d))
    poisoned.vector = torch.full((d,), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        concept_influence(lm, world.train, world.queries, factors, poisoned)
    with pytest.raises(ValueError, match="test-query set is empty"):
        influence_function(lm, world.train, [], factors)
    with pytest.raises(ValueError, match="test-query set is empty"):
        concept_influence(lm, world.train, [], factors, _concepts(d)[0])
    with pytest.raises(ValueError, match="no concepts"):
        concept_influence(lm, world.train, world.queries, factors, [])
    with pytest.raises(ValueError, match="out of range for 12 training examples"):
        influence_function(lm, world.train, world.queries, factors, indices=[12])
    upper = fit_factors(lm, world.train[:4], CurvatureConfig(block_start=2))
    with pytest.raises(ValueError, match="below_layer=2"):
        concept_influence(lm, world.train, world.queries, upper, _concepts(d)[1])
